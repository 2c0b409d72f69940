"""The real CLI in child processes: exit codes, SIGKILL and resume, secrets kept out."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from convsync_tools.simdata import Dataset
from convsync_tools.simulator import Simulator, SimulatorServer
from tests.harness import (
    assert_mirrors,
    convsync,
    failure,
    scalar,
    sigkill_when,
    spawn_convsync,
    worker_env,
)
from worker.store import Store

CONCURRENCY = 8
SERVICE = "IS" + "1" * 32
USER = "US" + "2" * 32


@pytest.fixture
def server() -> Iterator[SimulatorServer]:
    sim = Simulator(Dataset.generate(seed=5, services=2, users_per_service=150))
    with SimulatorServer(sim) as s:
        yield s


def conversation_pages_fetched_twice(server: SimulatorServer) -> int:
    return sum(
        1 for (path, _), n in server.sim.stats().pages.items() if "/Conversations" in path and n > 1
    )


async def test_sigkill_mid_pass_then_resume_ends_equal_with_few_pages_refetched(
    server: SimulatorServer, db_url: str
) -> None:
    server.sim.configure(latency_ms=15, jitter_ms=10)
    env = worker_env(server, db_url, CONVSYNC_CONCURRENCY=str(CONCURRENCY))
    await sigkill_when(
        env, db_url, "SELECT coalesce(sum(run_pages), 0) >= 60 FROM sync_cursors", "pages to flow"
    )
    assert await scalar(db_url, "SELECT status FROM sync_runs") == "running"

    result = convsync(["sync"], env)
    assert result.returncode == 0, result.stderr[-2000:]
    await assert_mirrors(server, db_url)
    assert await scalar(db_url, "SELECT count(*) FROM sync_runs") == 1, "the pass was continued"
    assert await scalar(db_url, "SELECT status FROM sync_runs") == "succeeded"
    twice = conversation_pages_fetched_twice(server)
    assert twice <= CONCURRENCY, f"{twice} pages fetched twice"


async def test_wrong_credentials_exit_2_fast_without_leaking(
    server: SimulatorServer, db_url: str
) -> None:
    secret = "wrong-token-0123456789abcdef"
    env = worker_env(server, db_url, TWILIO_AUTH_TOKEN=secret)
    started = time.monotonic()
    result = convsync(["sync"], env)
    elapsed = time.monotonic() - started
    assert result.returncode == 2
    assert "rejected the credentials" in result.stderr
    assert secret not in result.stdout + result.stderr
    assert server.sim.stats().requests <= 3
    assert elapsed < 15


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"CONVSYNC_SERVICES": "IS-not-a-sid"}, "CONVSYNC_SERVICES"),
        ({"DATABASE_URL": "postgresql://u:pw@host:port/db"}, "DATABASE_URL"),
        ({"CONVSYNC_PAGE_SIZE": "500"}, "CONVSYNC_PAGE_SIZE"),
        ({"TWILIO_AUTH_TOKEN": ""}, "TWILIO_AUTH_TOKEN"),
    ],
)
def test_bad_configuration_exits_2_before_any_request(
    server: SimulatorServer, db_url: str, override: dict[str, str], named: str
) -> None:
    result = convsync(["sync"], worker_env(server, db_url, **override))
    assert result.returncode == 2
    assert named in result.stderr
    assert server.sim.stats().requests == 0


def test_unknown_user_scope_is_a_clear_error(server: SimulatorServer, db_url: str) -> None:
    user = "US" + "0" * 32
    result = convsync(["sync", "--user", user], worker_env(server, db_url))
    assert result.returncode == 2
    assert f"--user {user}" in result.stderr


async def test_failed_users_exit_1_and_show_in_status(server: SimulatorServer, db_url: str) -> None:
    data = server.sim.dataset
    service = data.service_sids()[0]
    victim = data.user_sids(service)[3]
    server.sim.fail_next(f"Users/{victim}/Conversations", 500, count=50)
    env = worker_env(server, db_url, CONVSYNC_MAX_ATTEMPTS="2")
    result = convsync(["sync"], env)
    assert result.returncode == 1, result.stderr[-2000:]
    assert await scalar(db_url, "SELECT status FROM sync_runs") == "partial"
    assert await scalar(db_url, "SELECT count(*) FROM memberships") > 1000, "the rest committed"

    status = convsync(["status", "--json"], env)
    assert status.returncode == 0
    report = json.loads(status.stdout)
    assert report["passes"][0]["users_failed"] == 1
    assert [u["user_sid"] for u in report["users"] if u["state"] == "failed"] == [victim]
    table = convsync(["status"], env)
    assert "partial" in table.stdout
    assert victim in table.stdout


def test_status_before_any_pass_and_before_any_migration(db_url: str, empty_db_url: str) -> None:
    fresh = convsync(["status"], {"DATABASE_URL": db_url})
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "(no passes yet)" in fresh.stdout
    bare = convsync(["status"], {"DATABASE_URL": empty_db_url})
    assert bare.returncode == 2, bare.stderr[-2000:]
    assert "run convsync migrate" in failure(bare.stderr)["error"]
    negative = convsync(["status", "--limit", "-1"], {"DATABASE_URL": db_url})
    assert negative.returncode == 2
    assert "Traceback" not in negative.stderr


async def test_status_shows_control_characters_of_an_error_escaped(db_url: str) -> None:
    # A stored error quotes upstream text: printed raw, an escape sequence would act on the
    # operator's terminal (here: clear it, retitle it, and fake a line).
    store = await Store.connect(db_url, 2)
    try:
        info = await store.begin_or_resume_pass({"services": None, "users": None})
        assert info is not None
        await store.pool.execute("INSERT INTO services (chat_service_sid) VALUES ($1)", SERVICE)
        await store.enqueue_users(info.run_id, SERVICE, [USER])
        claim = await store.claim_user(info.run_id, "host:1:aa", 60)
        assert claim is not None
        await store.mark_user_failed(
            claim, "HTTP 409: \x1b[2J\x1b]0;owned\x07\nfake\u2028\u202eexe"
        )
    finally:
        await store.close()
    table = convsync(["status"], {"DATABASE_URL": db_url})
    assert table.returncode == 0, table.stderr[-2000:]
    assert "\x1b" not in table.stdout
    assert "\x07" not in table.stdout
    assert "\u2028" not in table.stdout
    assert "\u202e" not in table.stdout
    assert "HTTP 409: \\x1b[2J\\x1b]0;owned\\x07\\x0afake\\u2028\\u202eexe" in table.stdout


def test_two_migrations_at_once_both_succeed(empty_db_url: str) -> None:
    env = {"DATABASE_URL": empty_db_url}
    children = [spawn_convsync(["migrate"], env) for _ in range(2)]
    for child in children:
        child.communicate(timeout=60)
        assert child.returncode == 0


def test_python_dash_m_and_console_script_agree() -> None:
    result = convsync(["--help"], {})
    assert result.returncode == 0
    for command in ("migrate", "sync", "status", "simulate", "run", "demo"):
        assert command in result.stdout
    script = Path(sys.executable).with_name("convsync")
    assert script.exists(), "the console script is installed beside the interpreter"


def test_an_unreachable_database_is_transient_exit_1(server: SimulatorServer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://nobody:hunter2-db-pass@127.0.0.1:{port}/nowhere"
    result = convsync(["sync"], worker_env(server, url))
    assert result.returncode == 1
    assert "cannot reach the database" in result.stderr
    assert "hunter2-db-pass" not in result.stdout + result.stderr
    assert server.sim.stats().requests == 0


def test_the_api_down_at_start_exits_1_with_one_message(
    server: SimulatorServer, db_url: str
) -> None:
    server.sim.configure(api_down=True)
    result = convsync(["sync"], worker_env(server, db_url, CONVSYNC_MAX_ATTEMPTS="2"))
    assert result.returncode == 1
    failed = failure(result.stderr)
    assert failed["error"].startswith("/v1/Services: gave up after 2 attempts")
    assert failed["exit_code"] == 1
    assert "Traceback" not in result.stderr


async def test_a_users_listing_resumed_with_an_expired_token_restarts_and_loses_no_one(
    server: SimulatorServer, db_url: str
) -> None:
    server.sim.configure(latency_ms=20)
    env = worker_env(server, db_url, CONVSYNC_PAGE_SIZE="5")
    await sigkill_when(
        env,
        db_url,
        "SELECT coalesce(max(pages), 0) >= 2 FROM sync_discovery",
        "users listing under way",
    )
    server.sim.configure(token_ttl=60, latency_ms=0)
    server.sim.advance_clock(3600)  # every saved token is now expired

    result = convsync(["sync"], env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert any(
        '"page_token_rejected"' in line and '"listing": "users"' in line
        for line in result.stderr.splitlines()
    ), result.stderr[-2000:]
    await assert_mirrors(server, db_url)
    assert await scalar(db_url, "SELECT users_gone FROM sync_runs") == 0
    assert await scalar(db_url, "SELECT count(*) FROM users WHERE removed_at IS NOT NULL") == 0


async def test_sigterm_during_retries_ends_sync_promptly(
    server: SimulatorServer, db_url: str
) -> None:
    server.sim.configure(api_down=True)
    env = worker_env(server, db_url, CONVSYNC_MAX_RETRY_SECONDS="600", CONVSYNC_MAX_ATTEMPTS="50")
    child = spawn_convsync(["sync"], env)
    await asyncio.to_thread(server.sim.wait_until, lambda stats: stats.requests >= 2, 30)
    started = time.monotonic()
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=30)
    assert time.monotonic() - started < 5, "the backoff ends at shutdown"
    assert child.returncode == 1
    assert "Traceback" not in stderr
    # Stopped while the services' listing waited to retry: an interrupted pass, not a failed
    # command with its pass left running.
    assert '"command_failed"' not in stderr, stderr[-2000:]
    assert '"pass_interrupted"' in stderr, stderr[-2000:]
    assert await scalar(db_url, "SELECT status FROM sync_runs") == "interrupted"


async def test_two_syncs_started_at_once_share_one_pass(
    server: SimulatorServer, db_url: str
) -> None:
    server.sim.configure(latency_ms=10)
    server.sim.hold()  # both processes' first requests wait: both join the pass from the start
    env = worker_env(server, db_url, CONVSYNC_CONCURRENCY=str(CONCURRENCY))
    children = [spawn_convsync(["sync"], env) for _ in range(2)]
    assert await asyncio.to_thread(server.sim.wait_until, lambda s: s.in_flight >= 2, 60)
    server.sim.release()
    for child in children:
        _, stderr = child.communicate(timeout=120)
        assert child.returncode == 0, stderr[-2000:]
    assert await scalar(db_url, "SELECT count(*) FROM sync_runs") == 1
    await assert_mirrors(server, db_url)
    twice = conversation_pages_fetched_twice(server)
    assert twice == 0, f"{twice} conversation pages fetched by both"
