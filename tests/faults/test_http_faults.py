"""Twilio misbehaving for real, over a socket: 429 storms with and without Retry-After, 5xx
bursts, dropped connections, truncated bodies, answers slower than the timeout, the whole API
down for a while, expired page tokens, users deleted mid-listing. Retries stay bounded, the
affected users fail while the rest commit, and moderate rates still end equal to the data."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from convsync_tools.simdata import Dataset
from convsync_tools.simulator import Simulator, SimulatorServer
from tests.faults.common import (
    COMMITTED_PAGES,
    check_cursors,
    mirror,
    record,
    record_sim_faults,
    wait_for,
)
from tests.harness import (
    convsync,
    failure,
    fetch,
    run_pass,
    scalar,
    settings_for,
    spawn_convsync,
    worker_env,
)
from worker.retry import Backoff
from worker.store import PassSummary

PAGE = 10
USERS = 40
PATIENT_ATTEMPTS, FEW_ATTEMPTS = 12, 3
PATIENT = Backoff(max_attempts=PATIENT_ATTEMPTS, max_seconds=30.0, base=0.01, cap=0.1)
FEW = Backoff(max_attempts=FEW_ATTEMPTS, max_seconds=5.0, base=0.01, cap=0.05)


@pytest.fixture
def server() -> Iterator[SimulatorServer]:
    data = Dataset.generate(
        seed=31, services=1, users_per_service=USERS, max_conversations_per_user=110
    )
    with SimulatorServer(Simulator(data)) as s:
        yield s


def env_settings(server: SimulatorServer, db_url: str, **extra: str) -> Any:
    return settings_for(server, db_url, CONVSYNC_PAGE_SIZE=str(PAGE), **extra)


def conversation_keys(server: SimulatorServer) -> dict[tuple[str, str | None], int]:
    return {k: n for k, n in server.sim.stats().pages.items() if "/Conversations" in k[0]}


async def assert_done_users_complete(server: SimulatorServer, db_url: str) -> int:
    """Every user the pass finished holds exactly its upstream memberships."""
    done = await fetch(
        db_url, "SELECT chat_service_sid, user_sid FROM sync_cursors WHERE state = 'done'"
    )
    rows = await fetch(
        db_url,
        "SELECT user_sid, conversation_sid FROM memberships WHERE removed_at IS NULL",
    )
    stored: dict[str, set[str]] = {}
    for r in rows:
        stored.setdefault(r["user_sid"], set()).add(r["conversation_sid"])
    for d in done:
        items = server.sim.dataset.memberships(d["chat_service_sid"], d["user_sid"])
        assert stored.get(d["user_sid"], set()) == {i["conversation_sid"] for i in items}
    return len(done)


async def pass_under(
    server: SimulatorServer,
    db_url: str,
    backoff: Backoff,
    *,
    after_discovery: dict[str, Any] | None = None,
    **settings: str,
) -> PassSummary:
    """A pass in this process; ``after_discovery`` knobs are set once users discovery ended
    (so that the storm hits the listings, which is where per-user failure applies)."""
    task = asyncio.ensure_future(
        run_pass(env_settings(server, db_url, **settings), backoff=backoff)
    )
    if after_discovery:
        conn = await asyncpg.connect(db_url)
        try:
            await wait_for(
                conn,
                "SELECT count(*) FROM sync_discovery WHERE completed_at IS NOT NULL "
                "AND run_id = (SELECT max(run_id) FROM sync_runs)",
                lambda n: n >= 1 or task.done(),
            )
        finally:
            await conn.close()
        server.sim.configure(**after_discovery)
    return await task


async def test_429_storm_without_retry_after_fails_some_users_boundedly_then_heals(
    server: SimulatorServer, db_url: str
) -> None:
    storm = await pass_under(server, db_url, FEW, after_discovery={"rate_429": 0.8})
    faults = record_sim_faults(server)
    server.sim.configure(rate_429=0.0)
    assert faults["429"] > 50
    assert storm.status == "partial"
    assert storm.users_failed > 0
    assert storm.users_synced > 0, "users whose pages got through committed"
    assert max(conversation_keys(server).values()) <= FEW_ATTEMPTS, "retries are bounded"
    errors = await fetch(db_url, "SELECT last_error FROM sync_cursors WHERE state = 'failed'")
    assert all("RateLimited" in e["last_error"] for e in errors)
    assert await assert_done_users_complete(server, db_url) == storm.users_synced
    assert storm.rows_removed == 0
    await check_cursors(db_url, server, PAGE)

    server.sim.reset_stats()
    healed = await pass_under(server, db_url, FEW)
    assert healed.status == "succeeded"
    await mirror(server, db_url)
    # the failed listings continued from their cursors: no page committed before is refetched
    assert max(conversation_keys(server).values()) == 1


async def test_429_storm_with_retry_after_is_waited_out_and_ends_equal(
    server: SimulatorServer, db_url: str
) -> None:
    """A high 429 rate for a while, every 429 saying Retry-After: 1; the retry budget (30 s)
    outlasts it and nobody fails. Retries come no sooner than asked: backoff alone would
    retry within 0.1 s."""
    server.sim.configure(retry_after=1, latency_ms=5)
    task = asyncio.ensure_future(
        pass_under(server, db_url, PATIENT, after_discovery={"rate_429": 0.8})
    )
    assert await asyncio.to_thread(server.sim.wait_until, lambda s: s.faults["429"] >= 24, 30)
    server.sim.configure(rate_429=0.0)
    summary = await task
    faults = record_sim_faults(server)
    assert faults["429"] >= 24
    assert summary.status == "succeeded"
    await mirror(server, db_url)
    # Every request answered 429 came again (the pass succeeded), and never sooner than the
    # Retry-After it was given after its answer left the simulator.
    waited: list[float] = []
    answered_429: dict[tuple[str, str | None], float] = {}
    for served in sorted(server.sim.served(), key=lambda s: s.arrived):
        if served.key in answered_429:
            waited.append(served.arrived - answered_429.pop(served.key))
        if served.status == 429:
            answered_429[served.key] = served.answered
    assert not answered_429, "a request answered 429 was never retried"
    assert len(waited) >= 24
    assert min(waited) >= 0.999, f"retried {min(waited):.3f} s after a 429 saying Retry-After: 1"


async def test_5xx_bursts_fail_their_users_and_moderate_rates_end_equal(
    server: SimulatorServer, db_url: str
) -> None:
    data = server.sim.dataset
    service = data.service_sids()[0]
    victims = [u for u in data.user_sids(service) if data.membership_count(service, u) > PAGE][:3]
    for victim, status in zip(victims, (500, 503, 502), strict=True):
        server.sim.fail_next(f"Users/{victim}/Conversations?PageSize={PAGE}&Page=1&", status, 50)
    server.sim.configure(rate_500=0.08, rate_503=0.08, retry_after=None)
    summary = await pass_under(server, db_url, PATIENT)
    faults = record_sim_faults(server)
    server.sim.clear_faults()
    server.sim.configure(rate_500=0.0, rate_503=0.0)
    assert faults["500"] + faults["503"] + faults["502"] > 3 * PATIENT_ATTEMPTS
    assert summary.users_failed == len(victims)
    assert summary.users_synced == USERS - len(victims)
    failed = await fetch(
        db_url,
        "SELECT user_sid, listing_pages, last_error FROM sync_cursors WHERE state = 'failed'",
    )
    assert {r["user_sid"] for r in failed} == set(victims)
    assert all(r["listing_pages"] == 1 and "ServerError" in r["last_error"] for r in failed)
    await assert_done_users_complete(server, db_url)
    await check_cursors(db_url, server, PAGE)
    again = await pass_under(server, db_url, FEW)
    assert again.status == "succeeded"
    await mirror(server, db_url)


async def test_dropped_connections_and_truncated_bodies_are_retried_to_equal(
    server: SimulatorServer, db_url: str
) -> None:
    server.sim.configure(drop_rate=0.1, truncate_rate=0.1)
    summary = await pass_under(server, db_url, PATIENT)
    faults = record_sim_faults(server)
    assert faults["drop"] > 5
    assert faults["truncate"] > 5
    assert summary.status == "succeeded"
    # aiohttp resends an idempotent request once when a reused connection drops
    assert max(conversation_keys(server).values()) <= 2 * PATIENT_ATTEMPTS
    await mirror(server, db_url)


async def test_answers_slower_than_the_timeout_are_abandoned_and_retried(
    server: SimulatorServer, db_url: str
) -> None:
    server.sim.configure(slow_rate=0.1, slow_seconds=3.0)
    started = time.monotonic()
    summary = await pass_under(server, db_url, PATIENT, CONVSYNC_REQUEST_TIMEOUT="0.3")
    faults = record_sim_faults(server)
    assert faults["slow"] > 5
    assert summary.status == "succeeded"
    assert time.monotonic() - started < 3.0 * faults["slow"], "slow answers were not awaited"
    await mirror(server, db_url)


async def test_api_down_for_a_while_mid_pass_is_waited_out(
    server: SimulatorServer, db_url: str
) -> None:
    server.sim.configure(latency_ms=5)
    task = asyncio.ensure_future(run_pass(env_settings(server, db_url), backoff=PATIENT))
    conn = await asyncpg.connect(db_url)
    try:
        await wait_for(conn, COMMITTED_PAGES, lambda n: n >= 15)
        server.sim.configure(api_down=True)
        # down until at least 30 requests were turned away (a condition, not a guess)
        await asyncio.to_thread(server.sim.wait_until, lambda s: s.faults["down"] >= 30, 20)
        server.sim.configure(api_down=False)
    finally:
        await conn.close()
    summary = await task
    record_sim_faults(server)
    assert summary.status == "succeeded"
    await mirror(server, db_url)


async def test_api_down_past_the_retry_budget_fails_the_rest_exit_1_then_resumes(
    server: SimulatorServer, db_url: str
) -> None:
    server.sim.configure(latency_ms=5)
    env = worker_env(
        server,
        db_url,
        CONVSYNC_PAGE_SIZE=str(PAGE),
        CONVSYNC_MAX_ATTEMPTS="3",
        CONVSYNC_MAX_RETRY_SECONDS="2",
    )
    child = spawn_convsync(["sync"], env)
    conn = await asyncpg.connect(db_url)
    try:
        await wait_for(conn, COMMITTED_PAGES, lambda n: n >= 20)
        server.sim.configure(api_down=True)
        _, stderr = await asyncio.to_thread(child.communicate, timeout=60)
    finally:
        await conn.close()
        if child.poll() is None:
            child.kill()
    record_sim_faults(server)
    server.sim.configure(api_down=False)
    assert child.returncode == 1, stderr[-2000:]
    summary = await fetch(db_url, "SELECT status, users_synced, users_failed FROM sync_runs")
    assert summary[0]["status"] == "partial"
    assert summary[0]["users_failed"] > 0
    synced = await assert_done_users_complete(server, db_url)
    assert synced == summary[0]["users_synced"]
    await check_cursors(db_url, server, PAGE)
    assert (
        await scalar(db_url, "SELECT count(*) FROM memberships WHERE removed_at IS NOT NULL") == 0
    )

    rerun = convsync(["sync"], env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    await mirror(server, db_url)
    record(cli_runs=2)


async def test_an_expired_page_token_restarts_the_listing_in_the_cli_without_false_removals(
    server: SimulatorServer, db_url: str
) -> None:
    data = server.sim.dataset
    service = data.service_sids()[0]
    user = next(u for u in data.user_sids(service) if data.membership_count(service, u) > 4 * PAGE)
    env = worker_env(server, db_url, CONVSYNC_PAGE_SIZE=str(PAGE), CONVSYNC_MAX_ATTEMPTS="2")
    assert convsync(["sync"], env).returncode == 0
    # The user's listing stops after two pages (page 3 keeps failing): its token is saved.
    server.sim.fail_next(f"{user}/Conversations?PageSize={PAGE}&Page=2&", 503, count=10)
    stopped = convsync(["sync"], env)
    server.sim.clear_faults()
    assert stopped.returncode == 1
    cursor = await fetch(
        db_url, "SELECT listing_pages, next_page_path FROM sync_cursors WHERE user_sid = $1", user
    )
    assert cursor[0]["listing_pages"] == 2
    assert "PageToken" in cursor[0]["next_page_path"]
    # Meanwhile: memberships leave on page 1 and on a later page, one joins; tokens expire.
    items = data.memberships(service, user)
    early, late = items[1]["conversation_sid"], items[3 * PAGE + 2]["conversation_sid"]
    data.remove_membership(service, user, early)
    data.remove_membership(service, user, late)
    joined = data.add_membership(service, user)
    server.sim.configure(token_ttl=60)
    server.sim.advance_clock(3600)
    server.sim.reset_stats()

    resumed = convsync(["sync", "--user", user], env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert any(
        '"page_token_rejected"' in line and '"listing": "conversations"' in line
        for line in resumed.stderr.splitlines()
    ), resumed.stderr[-2000:]
    stats = server.sim.stats()
    assert stats.by_status[400] == 1, "one rejected token, then the listing restarted"
    first = f"/v1/Services/{service}/Users/{user}/Conversations"
    assert stats.pages[(first, None)] == 1
    removed = await fetch(
        db_url, "SELECT conversation_sid FROM memberships WHERE removed_at IS NOT NULL"
    )
    assert {r["conversation_sid"] for r in removed} == {early, late}
    current = await fetch(
        db_url,
        "SELECT conversation_sid FROM memberships WHERE user_sid = $1 AND removed_at IS NULL",
        user,
    )
    assert {r["conversation_sid"] for r in current} == {
        i["conversation_sid"] for i in data.memberships(service, user)
    }
    assert joined in {r["conversation_sid"] for r in current}
    await mirror(server, db_url)
    record(tokens_expired=1, cli_runs=3)


async def test_a_user_deleted_mid_listing_is_gone_and_the_rest_unaffected(
    server: SimulatorServer, db_url: str
) -> None:
    settings = env_settings(server, db_url, CONVSYNC_REQUEST_TIMEOUT="10")
    await run_pass(settings)
    data = server.sim.dataset
    service = data.service_sids()[0]
    user = next(u for u in data.user_sids(service) if data.membership_count(service, u) > 3 * PAGE)
    server.sim.configure(slow_seconds=1.0)
    # Its third page answers late: the user is deleted while the listing is half done.
    server.sim.fail_next(f"{user}/Conversations?PageSize={PAGE}&Page=2&", "slow", 1)
    task = asyncio.ensure_future(run_pass(settings))
    conn = await asyncpg.connect(db_url)
    try:
        await wait_for(
            conn,
            f"SELECT listing_pages FROM sync_cursors WHERE user_sid = '{user}' "
            "AND run_id = (SELECT max(run_id) FROM sync_runs)",
            lambda n: n == 2,
        )
        data.delete_user(service, user)
    finally:
        await conn.close()
    summary = await task
    assert summary.status == "succeeded"
    assert summary.users_gone == 1
    assert summary.users_synced == USERS - 1
    state = await scalar(db_url, "SELECT state FROM sync_cursors WHERE user_sid = $1", user)
    assert state == "gone"
    assert await scalar(db_url, "SELECT removed_at FROM users WHERE user_sid = $1", user)
    assert summary.rows_removed == await scalar(
        db_url, "SELECT count(*) FROM memberships WHERE user_sid = $1", user
    )
    await mirror(server, db_url)
    record(users_deleted_mid_listing=1)


async def test_api_down_from_the_start_exits_1_with_one_message_and_writes_nothing(
    server: SimulatorServer, db_url: str
) -> None:
    server.sim.configure(api_down=True, retry_after=None)
    env = worker_env(server, db_url, CONVSYNC_MAX_ATTEMPTS="3", CONVSYNC_MAX_RETRY_SECONDS="2")
    result = convsync(["sync"], env)
    faults = record_sim_faults(server)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "gave up after 3 attempts" in failure(result.stderr)["error"]
    assert not any(line.startswith("Traceback") for line in result.stderr.splitlines())
    assert faults["down"] == 3, "bounded: three attempts at the services listing"
    assert await scalar(db_url, "SELECT count(*) FROM memberships") == 0
    server.sim.configure(api_down=False)
    assert convsync(["sync"], env).returncode == 0
    await mirror(server, db_url)
    record(cli_runs=2)


async def test_a_pass_cancelled_from_outside_stops_promptly(
    server: SimulatorServer, db_url: str
) -> None:
    server.sim.configure(latency_ms=100)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(run_pass(env_settings(server, db_url)), 0.3)
    assert time.monotonic() - started < 1.0, "the pass ran on after its cancellation"
