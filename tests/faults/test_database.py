"""PostgreSQL going away mid-pass, for real: the worker's sessions terminated by an admin, and
the server itself stopped and started again. The pass reconnects and carries on (or fails
users cleanly); after at most one rerun the database equals the data; no page is ever
half-written and no cursor runs ahead of its rows."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import asyncpg
import pytest

from convsync_tools.pgembed import LocalPostgres
from convsync_tools.simdata import Dataset
from convsync_tools.simulator import Simulator, SimulatorServer
from tests.faults.common import COMMITTED_PAGES, check_cursors, mirror, record
from tests.harness import (
    convsync,
    run_pass,
    scalar,
    settings_for,
    spawn_convsync,
    worker_env,
)
from worker.retry import Backoff

PAGE = 10
# The default lease: a claim or page whose reply is lost with its connection must not leave
# its user leased to nobody until the lease ends, so every pass here ends well within it.
LEASE = "60"
WITHIN = 20.0
PATIENT = Backoff(max_attempts=8, max_seconds=30.0, base=0.01, cap=0.1)
TERMINATE = """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
               WHERE datname = current_database() AND pid <> pg_backend_pid()"""


@pytest.fixture
def server() -> Iterator[SimulatorServer]:
    data = Dataset.generate(
        seed=51, services=1, users_per_service=40, max_conversations_per_user=110
    )
    sim = Simulator(data)
    sim.configure(latency_ms=3, jitter_ms=3)
    with SimulatorServer(sim) as s:
        yield s


def crashed(stderr: str) -> bool:
    """An uncaught exception: a bare traceback (logged ones are inside JSON lines)."""
    return any(line.startswith("Traceback") for line in stderr.splitlines())


async def committed(url: str) -> int:
    """Pages committed so far (0 while the server is unreachable)."""
    try:
        conn = await asyncpg.connect(url, timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return 0
    try:
        return int(await conn.fetchval(COMMITTED_PAGES))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return 0
    finally:
        await conn.close()


async def until_committed(url: str, pages: int, done: object, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = await committed(url)
        if n >= pages or done():  # type: ignore[operator]
            return n
        assert time.monotonic() < deadline, f"no {pages} pages committed in time"
        await asyncio.sleep(0.01)


async def test_terminated_sessions_mid_pass_are_reconnected(
    server: SimulatorServer, db_url: str
) -> None:
    settings = settings_for(
        server,
        db_url,
        CONVSYNC_PAGE_SIZE=str(PAGE),
        CONVSYNC_CONCURRENCY="6",
        CONVSYNC_LEASE_SECONDS=LEASE,
    )
    started = time.monotonic()
    task = asyncio.ensure_future(run_pass(settings, backoff=PATIENT, db_wait_seconds=30))
    admin = await asyncpg.connect(db_url)
    terminated = rounds = 0
    try:
        for threshold in (5, 25, 50, 80, 110):
            await until_committed(db_url, threshold, task.done)
            if task.done():
                break
            terminated += await admin.fetchval(TERMINATE)
            rounds += 1
            await check_cursors(db_url, server, PAGE)
    finally:
        await admin.close()
    summary = await task
    assert time.monotonic() - started < WITHIN, "a claim waited out its lease"
    assert rounds >= 3, "the terminations landed mid-pass"
    assert terminated >= rounds
    assert summary.status in ("succeeded", "partial")
    if summary.status != "succeeded":
        await check_cursors(db_url, server, PAGE)
        summary = await run_pass(settings, backoff=PATIENT)
        assert summary.status == "succeeded"
        record(db_reruns=1)
    await mirror(server, db_url)
    record(
        db_sessions_terminated=terminated,
        db_termination_rounds=rounds,
    )


async def test_terminated_sessions_of_a_child_process_then_rerun(
    server: SimulatorServer, db_url: str
) -> None:
    env = worker_env(
        server,
        db_url,
        CONVSYNC_PAGE_SIZE=str(PAGE),
        CONVSYNC_CONCURRENCY="6",
        CONVSYNC_LEASE_SECONDS=LEASE,
    )
    started = time.monotonic()
    child = spawn_convsync(["sync"], env)
    admin = await asyncpg.connect(db_url)
    terminated = rounds = 0
    try:
        for threshold in (10, 40, 70):
            await until_committed(db_url, threshold, lambda: child.poll() is not None)
            if child.poll() is not None:
                break
            terminated += await admin.fetchval(TERMINATE)
            rounds += 1
        _, stderr = await asyncio.to_thread(child.communicate, timeout=90)
    finally:
        await admin.close()
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            child.communicate()
    assert time.monotonic() - started < WITHIN, "a claim waited out its lease"
    assert rounds >= 2
    assert child.returncode in (0, 1), stderr[-2000:]
    assert not crashed(stderr), stderr[-3000:]
    await check_cursors(db_url, server, PAGE)
    if child.returncode != 0:
        rerun = convsync(["sync"], env)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        record(db_reruns=1)
    await mirror(server, db_url)
    record(
        db_sessions_terminated=terminated,
        db_termination_rounds=rounds,
    )


async def test_server_restart_mid_pass_in_process(
    server: SimulatorServer, pg_restartable: LocalPostgres, restartable_db_url: str
) -> None:
    url = restartable_db_url
    settings = settings_for(
        server,
        url,
        CONVSYNC_PAGE_SIZE=str(PAGE),
        CONVSYNC_CONCURRENCY="6",
        CONVSYNC_LEASE_SECONDS=LEASE,
    )
    task = asyncio.ensure_future(run_pass(settings, backoff=PATIENT, db_wait_seconds=60))
    await until_committed(url, 20, task.done)
    assert not task.done()
    await pg_restartable.astop("fast")
    await asyncio.sleep(0.5)  # a while down: the pass must wait, not give up
    await pg_restartable.astart()
    summary = await task
    await check_cursors(url, server, PAGE)
    if summary.status != "succeeded":
        summary = await run_pass(settings, backoff=PATIENT)
        record(db_reruns=1)
    assert summary.status == "succeeded"
    assert await scalar(url, "SELECT count(*) FROM sync_runs") <= 2
    await mirror(server, url)
    record(db_server_restarts=1)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_server_restart_under_a_child_process_then_rerun(
    server: SimulatorServer, pg_restartable: LocalPostgres, restartable_db_url: str, mode: str
) -> None:
    url = restartable_db_url
    env = worker_env(
        server,
        url,
        CONVSYNC_PAGE_SIZE=str(PAGE),
        CONVSYNC_CONCURRENCY="6",
        CONVSYNC_LEASE_SECONDS=LEASE,
    )
    child = spawn_convsync(["sync"], env)
    try:
        await until_committed(url, 20, lambda: child.poll() is not None)
        assert child.poll() is None
        await pg_restartable.astop(mode)  # type: ignore[arg-type]
        await asyncio.sleep(0.5)
        await pg_restartable.astart()
        _, stderr = await asyncio.to_thread(child.communicate, timeout=90)
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            child.communicate()
    assert child.returncode in (0, 1), stderr[-2000:]
    assert not crashed(stderr), stderr[-3000:]
    await check_cursors(url, server, PAGE)
    if child.returncode != 0:
        rerun = convsync(["sync"], env)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        record(db_reruns=1)
    await mirror(server, url)
    record(db_server_restarts=1)
