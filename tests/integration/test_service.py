"""`convsync run` as real processes: replicas sharing a pass through PostgreSQL, SIGKILL and
lease takeover, SIGTERM within the grace, probes and metrics."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from convsync_tools.simdata import Dataset
from convsync_tools.simulator import Simulator, SimulatorServer
from tests.harness import (
    Replica,
    assert_mirrors,
    convsync,
    fetch,
    scalar,
    until,
    worker_env,
)

CONCURRENCY = 8


@pytest.fixture
def server() -> Iterator[SimulatorServer]:
    sim = Simulator(Dataset.generate(seed=21, services=2, users_per_service=120))
    with SimulatorServer(sim) as s:
        yield s


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Callable[..., Replica]]:
    started: list[Replica] = []

    def start(env: dict[str, str]) -> Replica:
        replica = Replica(env, tmp_path / f"replica-{len(started)}.log")
        started.append(replica)
        return replica

    yield start
    for replica in started:
        replica.stop(signal.SIGKILL)


def service_env(server: SimulatorServer, db_url: str, **overrides: str) -> dict[str, str]:
    defaults = {
        "CONVSYNC_CONCURRENCY": str(CONCURRENCY),
        "CONVSYNC_INTERVAL": "3600",
        "CONVSYNC_LOG_LEVEL": "debug",
    }
    return worker_env(server, db_url, **{**defaults, **overrides})


async def get(url: str) -> tuple[int, str]:
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status, await response.text()
    except aiohttp.ClientError:
        return 0, ""


def pass_status(db_url: str) -> Callable[[], Any]:
    async def check() -> Any:
        return await scalar(db_url, "SELECT status FROM sync_runs WHERE status <> 'running'")

    return check


def pages_fetched_twice(server: SimulatorServer) -> int:
    pages = server.sim.stats().pages
    return sum(1 for (path, _), n in pages.items() if "/Conversations" in path and n > 1)


async def test_two_replicas_share_one_pass_without_fetching_a_page_twice(
    server: SimulatorServer, db_url: str, replicas: Callable[..., Replica]
) -> None:
    server.sim.configure(latency_ms=20)
    server.sim.hold()  # both replicas' first requests wait: both start the pass together
    env = service_env(server, db_url)
    first, second = replicas(env), replicas(env)
    both_waiting = await asyncio.to_thread(
        server.sim.wait_until, lambda stats: stats.in_flight >= 2, 60
    )
    assert both_waiting
    server.sim.release()
    assert await until(pass_status(db_url), what="the pass to end") == "succeeded"
    await assert_mirrors(server, db_url)
    assert await scalar(db_url, "SELECT count(*) FROM sync_runs") == 1, "one pass per tick"
    assert pages_fetched_twice(server) == 0
    assert first.stop() == 0
    assert second.stop() == 0
    synced = [
        sum(1 for e in r.events() if e.get("event") == "user_synced") for r in (first, second)
    ]
    assert sum(synced) == 240
    assert min(synced) > 0, f"both replicas did work: {synced}"


async def test_a_killed_replicas_users_are_taken_over_after_its_lease(
    server: SimulatorServer, db_url: str, replicas: Callable[..., Replica]
) -> None:
    server.sim.configure(latency_ms=20, jitter_ms=10)
    env = service_env(server, db_url, CONVSYNC_LEASE_SECONDS="2")
    doomed = replicas(env)
    await until(
        lambda: scalar(db_url, "SELECT coalesce(sum(run_pages), 0) > 40 FROM sync_cursors"),
        what="pages to flow",
    )
    survivor = replicas(env)
    await until(
        lambda: scalar(
            db_url, "SELECT count(DISTINCT split_part(claimed_by, '/', 1)) = 2 FROM sync_cursors"
        ),
        what="both replicas to hold claims",
    )
    assert doomed.stop(signal.SIGKILL) == -signal.SIGKILL
    assert await until(pass_status(db_url), what="the pass to end") == "succeeded"
    await assert_mirrors(server, db_url)
    twice = pages_fetched_twice(server)
    assert twice <= CONCURRENCY, f"{twice} pages fetched twice; {_troubles(doomed, survivor)}"
    assert survivor.stop() == 0


def _troubles(*replicas: Replica) -> dict[str, list[str]]:
    """Each replica's retries and warnings, by event name (what a failure needs to explain)."""
    return {
        str(r.log_path.name): [
            f"{e.get('event')} {e.get('caused_by') or e.get('error') or ''}".strip()
            for e in r.events()
            if e.get("level") in ("warning", "error") or e.get("event") == "retry_scheduled"
        ]
        for r in replicas
    }


def conversation_pages(server: SimulatorServer) -> int:
    """Conversation pages the simulator answered whole (200)."""
    pages = server.sim.stats().pages_ok
    return sum(n for (path, _), n in pages.items() if "/Conversations" in path)


async def test_sigterm_mid_pass_commits_in_flight_pages_and_records_the_pass_interrupted(
    server: SimulatorServer, db_url: str, replicas: Callable[..., Replica]
) -> None:
    server.sim.configure(latency_ms=300, jitter_ms=20)  # pages are in flight most of the time
    env = service_env(server, db_url, CONVSYNC_SHUTDOWN_GRACE="10")
    replica = replicas(env)
    await until(
        lambda: scalar(db_url, "SELECT coalesce(sum(run_pages), 0) > 30 FROM sync_cursors"),
        what="pages to flow",
    )
    assert await asyncio.to_thread(server.sim.wait_until, lambda s: s.in_flight >= 2, 30)
    started = time.monotonic()
    assert replica.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10, "within the grace"
    # Every page answered before or during the stop was committed: none is dropped.
    committed = await scalar(db_url, "SELECT sum(run_pages) FROM sync_cursors")
    assert committed == conversation_pages(server)
    assert await scalar(db_url, "SELECT status FROM sync_runs") == "interrupted"
    assert (
        await scalar(db_url, "SELECT count(*) FROM sync_cursors WHERE claimed_by IS NOT NULL") == 0
    )
    log = replica.log_path.read_text()
    assert "Traceback" not in log
    assert [e for e in replica.events() if e.get("level") in ("error", "critical")] == []
    events = [e["event"] for e in replica.events()]
    assert events.index("shutdown_started") < events.index("pass_interrupted")
    assert "shutdown_complete" in events

    result = convsync(["sync"], worker_env(server, db_url))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert await scalar(db_url, "SELECT count(*) FROM sync_runs") == 1, "the pass was continued"
    assert await scalar(db_url, "SELECT status FROM sync_runs") == "succeeded"
    await assert_mirrors(server, db_url)
    assert pages_fetched_twice(server) <= CONCURRENCY


async def test_metrics_move_as_pages_flow(
    server: SimulatorServer, db_url: str, replicas: Callable[..., Replica]
) -> None:
    replica = replicas(service_env(server, db_url))
    await until(lambda: _ok(replica.url + "/healthz"), what="the HTTP server")
    assert await until(pass_status(db_url), what="the pass to end") == "succeeded"
    status, text = await get(replica.url + "/metrics")
    assert status == 200
    metrics = parse_metrics(text)
    pages = await scalar(db_url, "SELECT pages FROM sync_runs")
    assert metrics['convsync_pages_total{kind="conversations"}'] == pages
    assert metrics['convsync_requests_total{status="200"}'] >= pages
    assert 1 <= metrics["convsync_concurrency_limit"] <= CONCURRENCY
    assert metrics['convsync_passes_total{status="succeeded"}'] == 1
    assert metrics["convsync_last_success_timestamp_seconds"] > time.time() - 120
    rows = await scalar(db_url, "SELECT rows_inserted FROM sync_runs")
    assert metrics['convsync_rows_total{outcome="inserted"}'] == rows

    # prometheus_client's exposition, as a scraper parses it: the two latency histograms have
    # one observation per request answered and per page committed, and the process is there.
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["convsync_request_duration_seconds"].type == "histogram"
    assert families["convsync_page_commit_seconds"].type == "histogram"
    answered = sum(v for k, v in metrics.items() if k.startswith("convsync_requests_total{"))
    assert metrics["convsync_request_duration_seconds_count"] == answered
    assert metrics['convsync_request_duration_seconds_bucket{le="+Inf"}'] == answered
    assert metrics["convsync_page_commit_seconds_count"] == pages
    assert metrics["convsync_page_commit_seconds_sum"] > 0
    # One writer's statements, one after another within the pass.
    busy = metrics['convsync_writer_busy_seconds_total{writer="pass"}']
    assert 0 < busy <= metrics["convsync_pass_duration_seconds"]
    assert metrics["convsync_pass_seconds_count"] == 1
    assert metrics["process_resident_memory_bytes"] > 0
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            replica.url + "/metrics", headers={"Accept": "application/openmetrics-text"}
        ) as response,
    ):
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await response.text()).endswith("# EOF\n")
    assert replica.stop() == 0


async def test_port_0_serves_on_a_free_port_named_in_the_log(
    server: SimulatorServer, db_url: str, tmp_path: Path
) -> None:
    env = service_env(server, db_url, CONVSYNC_RUN_AT_START="false")
    replica = Replica(env, tmp_path / "replica.log", port=0)
    try:

        async def started() -> Any:
            return next((e for e in replica.events() if e["event"] == "service_started"), None)

        port = (await until(started, what="service_started"))["port"]
        assert isinstance(port, int), port
        assert port > 0
        assert await _ok(f"http://127.0.0.1:{port}/healthz")
    finally:
        assert replica.stop() == 0


async def test_readyz_fails_while_the_database_is_down(
    server: SimulatorServer,
    restartable_db_url: str,
    pg_restartable: Any,
    replicas: Callable[..., Replica],
) -> None:
    replica = replicas(service_env(server, restartable_db_url, CONVSYNC_RUN_AT_START="false"))
    await until(lambda: _ok(replica.url + "/readyz"), what="ready")
    pg_restartable.stop()
    try:
        await until(lambda: _status_is(replica.url + "/readyz", 503), what="not ready")
        assert (await get(replica.url + "/healthz"))[0] == 200, "alive though not ready"
    finally:
        pg_restartable.start()
    await until(lambda: _ok(replica.url + "/readyz"), what="ready again")
    assert replica.stop() == 0


def test_both_schedules_is_a_configuration_error(server: SimulatorServer, db_url: str) -> None:
    env = worker_env(server, db_url, CONVSYNC_SCHEDULE="*/5 * * * *", CONVSYNC_INTERVAL="60")
    result = convsync(["run"], env)
    assert result.returncode == 2
    assert "CONVSYNC_INTERVAL" in result.stderr


def test_a_bad_cron_expression_is_a_configuration_error(
    server: SimulatorServer, db_url: str
) -> None:
    result = convsync(["run"], worker_env(server, db_url, CONVSYNC_SCHEDULE="every tuesday"))
    assert result.returncode == 2
    assert "CONVSYNC_SCHEDULE" in result.stderr


async def _ok(url: str) -> bool:
    return (await get(url))[0] == 200


async def _status_is(url: str, status: int) -> bool:
    return (await get(url))[0] == status


def parse_metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


async def test_a_tick_during_a_running_pass_is_skipped_and_logged(
    server: SimulatorServer, db_url: str, replicas: Callable[..., Replica]
) -> None:
    server.sim.hold()  # the first pass cannot finish until released
    replica = replicas(service_env(server, db_url, CONVSYNC_INTERVAL="1"))
    await until(lambda: _logged(replica, "tick_skipped"), timeout=30, what="a skipped tick")
    server.sim.release()
    assert await scalar(db_url, "SELECT count(*) FROM sync_runs") <= 1
    assert replica.stop() == 0


async def test_run_starts_while_the_database_is_down_and_becomes_ready(
    server: SimulatorServer,
    restartable_db_url: str,
    pg_restartable: Any,
    replicas: Callable[..., Replica],
) -> None:
    pg_restartable.stop()
    try:
        replica = replicas(service_env(server, restartable_db_url, CONVSYNC_RUN_AT_START="false"))
        await until(lambda: _ok(replica.url + "/healthz"), what="alive")
        assert (await get(replica.url + "/readyz"))[0] == 503
    finally:
        pg_restartable.start()
    await until(lambda: _ok(replica.url + "/readyz"), what="ready once the database is up")
    assert replica.stop() == 0


async def _logged(replica: Replica, event: str) -> bool:
    return any(e.get("event") == event for e in replica.events())


def test_run_against_a_refused_database_exits_2(server: SimulatorServer, db_url: str) -> None:
    refused = db_url.rsplit("/", 1)[0] + "/no_such_database_here"
    refused = refused.replace("://", "://root:db-secret-pw@", 1) if "@" not in refused else refused
    result = convsync(["run"], service_env(server, refused), timeout=60)
    assert result.returncode == 2, result.stdout[-1000:] + result.stderr[-1000:]
    assert "DATABASE_URL was refused" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "db-secret-pw" not in result.stdout + result.stderr


async def test_interval_ticks_fall_on_the_epoch_aligned_boundary_after_a_run_at_start(
    server: SimulatorServer, db_url: str, replicas: Callable[..., Replica]
) -> None:
    interval = 4.0

    async def mid_interval() -> bool:  # start well away from a boundary
        return 1.5 <= time.time() % interval <= 2.0

    await until(mid_interval, timeout=10, what="the middle of an interval")
    replica = replicas(service_env(server, db_url, CONVSYNC_INTERVAL=str(int(interval))))
    await until(lambda: scalar(db_url, "SELECT count(*) >= 2 FROM sync_runs"), what="a second pass")
    rows = await fetch(db_url, "SELECT tick, started_at FROM sync_runs ORDER BY run_id")
    for row in rows:
        assert row["tick"].timestamp() % interval == 0, row["tick"]
    # The second pass starts on its boundary, not one interval after the process started.
    late = (rows[1]["started_at"] - rows[1]["tick"]).total_seconds()
    assert 0 <= late < 1.0, f"second pass {late:.2f} s after its boundary"
    assert replica.stop() == 0
