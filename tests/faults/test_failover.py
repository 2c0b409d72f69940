"""A database failover mid-pass, for real: the database turns read-only (as an old primary
demoted to a standby that is still in DNS: ``ALTER DATABASE ... SET default_transaction_read_only
= on``, then its sessions terminated), and writable again later. The worker's connections are
not terminated a second time: dropping its read-only sessions is the worker's own job.

`convsync sync` rides it out within CONVSYNC_DB_WAIT_SECONDS and exits 0; `convsync run`
outlasting that bound stays alive, says not ready, and continues the pass as soon as writes
return (not an interval later). Either way: 0 rows lost, 0 wrong, 0 false removals.

These need a superuser (ALTER DATABASE, pg_terminate_backend): under CI they run, never skip.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from convsync_tools.pgembed import quote_ident
from convsync_tools.simdata import Dataset
from convsync_tools.simulator import Simulator, SimulatorServer
from tests.faults.common import COMMITTED_PAGES, Failover, check_cursors, mirror, record
from tests.harness import REPO, _base_env, scalar, worker_env

PAGE = 10
READ_ONLY = "ReadOnlySQLTransactionError"


def db_retries(child: Any) -> list[dict[str, Any]]:
    """The child's retries of a database operation refused as read-only."""
    found: list[dict[str, Any]] = child.events(
        "retry_scheduled", target="database", caused_by=READ_ONLY
    )
    return found


HOLD = 2.0  # seconds the database stays read-only at least (and until the worker hit it)


@pytest.fixture
def server() -> Iterator[SimulatorServer]:
    data = Dataset.generate(
        seed=53, services=1, users_per_service=40, max_conversations_per_user=110
    )
    sim = Simulator(data)
    sim.configure(latency_ms=3, jitter_ms=3)
    with SimulatorServer(sim) as s:
        yield s


class Child:
    """A convsync child process with its JSON log lines in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "worker", *args],
                env={**_base_env(), **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )

    def events(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name and fields.items() <= event.items():
                    found.append(event)
        return found

    @property
    def output(self) -> str:
        return self.log.read_text()

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


async def until(check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """Poll a condition (sync or async) until truthy; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def committed(db_url: str) -> int:
    return int(await scalar(db_url, COMMITTED_PAGES))


async def committed_at_least(db_url: str, pages: int) -> bool:
    return await committed(db_url) >= pages


async def a_pass_succeeded(db_url: str, what: str) -> None:
    """Wait (30 s at most) until a pass is recorded succeeded."""
    await until(
        lambda: scalar(db_url, "SELECT count(*) FROM sync_runs WHERE status = 'succeeded'"),
        what,
        timeout=30,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def no_false_removals(db_url: str) -> int:
    removed: int = await scalar(
        db_url,
        "SELECT (SELECT count(*) FROM memberships WHERE removed_at IS NOT NULL)"
        " + (SELECT count(*) FROM users WHERE removed_at IS NOT NULL)",
    )
    return removed


async def test_sync_rides_out_a_read_only_failover_mid_pass(
    server: SimulatorServer, db_url: str, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    env = worker_env(server, db_url, CONVSYNC_PAGE_SIZE=str(PAGE), CONVSYNC_CONCURRENCY="6")
    failover = Failover(admin, db_url)
    started = time.monotonic()
    child = Child(["sync"], env, tmp_path / "sync.log")
    try:
        await until(
            lambda: child.process.poll() is not None or committed_at_least(db_url, 15),
            "15 pages committed",
        )
        assert child.process.poll() is None, "the pass ended before the failover"
        terminated = await failover.demote()
        try:
            await until(
                lambda: db_retries(child),
                "a refused write",
            )
            before = await committed(db_url)  # every session since is a read-only one
            await until(
                lambda: len(db_retries(child)) >= 3 and time.monotonic() - failover.began >= HOLD,
                "the worker refused writes by the read-only database",
            )
            assert child.process.poll() is None, "the pass survives the read-only database"
            assert await committed(db_url) == before, "nothing was written while read-only"
        finally:
            await failover.promote()
        code = await asyncio.to_thread(child.process.wait, 90)
    finally:
        child.stop()
    seconds = time.monotonic() - started
    assert code == 0, child.output[-3000:]
    assert "Traceback" not in child.output
    assert await scalar(db_url, "SELECT status FROM sync_runs") == "succeeded"
    assert await scalar(db_url, "SELECT count(*) FROM sync_runs") == 1
    await check_cursors(db_url, server, PAGE)
    compared = await mirror(server, db_url)
    removed = await no_false_removals(db_url)
    assert removed == 0
    record(
        failover_sync_read_only_ms=round(failover.seconds * 1000),
        failover_sync_pass_ms=round(seconds * 1000),
        failover_sync_rows_compared=compared,
        failover_sync_rows_lost=0,
        failover_sync_false_removals=removed,
        failover_sync_sessions_terminated=terminated,
    )


async def http_status(url: str) -> tuple[int, dict[str, Any]]:
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status, await response.json()
    except (aiohttp.ClientError, ValueError):
        return 0, {}


def run_env(server: SimulatorServer, db_url: str, port: int) -> dict[str, str]:
    """`convsync run` giving up on the database after 2 s, its HTTP on ``port``."""
    return worker_env(
        server,
        db_url,
        CONVSYNC_PAGE_SIZE=str(PAGE),
        CONVSYNC_CONCURRENCY="6",
        CONVSYNC_DB_WAIT_SECONDS="2",
        CONVSYNC_INTERVAL="3600",
        CONVSYNC_HTTP_HOST="127.0.0.1",
        CONVSYNC_HTTP_PORT=str(port),
    )


async def demoted_mid_pass(child: Child, db_url: str, failover: Failover) -> list[dict[str, Any]]:
    """Once 15 pages are committed, the database turned read-only; the pass's giving up on it
    (its pass_stopped events)."""
    await until(
        lambda: child.process.poll() is not None or committed_at_least(db_url, 15),
        "15 pages committed",
    )
    assert child.process.poll() is None
    await failover.demote()
    stopped: list[dict[str, Any]] = await until(
        lambda: child.events("pass_stopped", error_kind="DatabaseUnavailable"),
        "the pass to give up on the database (CONVSYNC_DB_WAIT_SECONDS=2)",
    )
    return stopped


async def test_run_outlasted_by_a_read_only_database_continues_the_pass_when_it_is_back(
    server: SimulatorServer, db_url: str, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    port = free_port()
    ready = f"http://127.0.0.1:{port}/readyz"
    failover = Failover(admin, db_url)
    child = Child(["run"], run_env(server, db_url, port), tmp_path / "run.log")
    try:
        try:
            stopped = await demoted_mid_pass(child, db_url, failover)
            assert "read-only" in stopped[0]["error"]
            _, body = await until(
                lambda: readyz_says(ready, 503), "/readyz to report the read-only database"
            )
            assert body["status"] == "database read-only", body
            assert (await http_status(f"http://127.0.0.1:{port}/healthz"))[0] == 200
            assert child.process.poll() is None, "run stays alive"
        finally:
            await failover.promote()
        await a_pass_succeeded(db_url, "the pass to continue and finish once writes are back")
        resumed_after = time.monotonic() - failover.ended
        await until(lambda: readyz_says(ready, 200), "/readyz ready again")
    finally:
        code = child.stop()
    assert code == 0, child.output[-3000:]
    assert "Traceback" not in child.output
    assert resumed_after < 10, f"the pass waited {resumed_after:.1f}s, not for the interval"
    assert child.events("pass_continued"), "continued by the same tick, not the next one"
    assert await scalar(db_url, "SELECT count(*) FROM sync_runs") == 1
    compared = await mirror(server, db_url)
    removed = await no_false_removals(db_url)
    assert removed == 0
    record(
        failover_run_read_only_ms=round(failover.seconds * 1000),
        failover_run_finished_after_writable_ms=round(resumed_after * 1000),
        failover_run_rows_compared=compared,
        failover_run_rows_lost=0,
        failover_run_false_removals=removed,
    )


async def test_run_keeps_waiting_for_the_database_whatever_refuses_it_meanwhile(
    server: SimulatorServer, db_url: str, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    # While `run` waits for a read-only database, the database refuses connections outright
    # for a while (ALLOW_CONNECTIONS false: not a connection error, a server's answer). The
    # wait goes on, and the pass continues when writes return; it once ended the pass's task
    # without a word, leaving the service up with no pass until the next tick.
    failover = Failover(admin, db_url)
    child = Child(["run"], run_env(server, db_url, free_port()), tmp_path / "run.log")
    try:
        try:
            await demoted_mid_pass(child, db_url, failover)
            await admin.execute(
                f"ALTER DATABASE {quote_ident(failover.name)} ALLOW_CONNECTIONS false"
            )
            try:
                refused = await until(
                    lambda: child.events("database_not_back"), "a poll refused by the server"
                )
                assert refused[0]["error_kind"] == "ObjectNotInPrerequisiteStateError", refused
                assert child.process.poll() is None, "run stays alive"
            finally:
                await admin.execute(
                    f"ALTER DATABASE {quote_ident(failover.name)} ALLOW_CONNECTIONS true"
                )
        finally:
            await failover.promote()
        await a_pass_succeeded(db_url, "the pass to continue and finish once the database is back")
    finally:
        code = child.stop()
    assert code == 0, child.output[-3000:]
    assert "Traceback" not in child.output
    assert child.events("pass_continued"), "continued by the same tick, not the next one"
    assert await scalar(db_url, "SELECT count(*) FROM sync_runs") == 1
    await mirror(server, db_url)
    assert await no_false_removals(db_url) == 0


async def readyz_says(url: str, status: int) -> tuple[int, dict[str, Any]] | None:
    answer = await http_status(url)
    return answer if answer[0] == status else None
