"""The adaptive limiter against a hidden concurrency ceiling, over a real socket."""

from __future__ import annotations

import asyncio
import time

import pytest
import structlog.testing

from convsync_tools.simdata import Dataset
from convsync_tools.simulator import Simulator, SimulatorServer
from tests.harness import assert_mirrors, settings_for
from worker.client import TwilioClient
from worker.limiter import AdaptiveLimiter
from worker.metrics import Metrics
from worker.retry import Backoff
from worker.store import Store
from worker.sync import SyncPass

CEILING = 8
BOUND = 32


async def test_concurrency_settles_under_a_hidden_ceiling(db_url: str) -> None:
    sim = Simulator(Dataset.generate(seed=3, services=1, users_per_service=300))
    sim.configure(concurrency_ceiling=CEILING, latency_ms=50)
    with SimulatorServer(sim) as server:
        settings = settings_for(server, db_url, CONVSYNC_CONCURRENCY=str(BOUND))
        store = await Store.connect(db_url)
        metrics = Metrics()
        try:
            async with TwilioClient(
                settings, backoff=Backoff(max_attempts=20, base=0.01, cap=0.2), metrics=metrics
            ) as client:
                limits = _note_limits(client.limiter)
                with structlog.testing.capture_logs() as events:
                    cpu = time.process_time()
                    summary = await SyncPass(settings, store, client, metrics=metrics).run()
                    cpu = time.process_time() - cpu
                limiter = client.limiter
        finally:
            await store.close()
        assert summary is not None
        assert summary.status == "succeeded"
        await assert_mirrors(server, db_url)
        stats = sim.stats()
    rejected = stats.by_status[429]
    # The first round starts BOUND requests, of which BOUND - CEILING are turned away; the
    # limit drops to the ceiling at once (not halving, not creeping down a 429 at a time) and
    # holds there: from then on only a probe one above it may be answered 429. A few more are
    # allowed for a request that started as a reply left the simulator but not yet our client.
    assert limiter.decreases >= 1, "the limiter backed off"
    assert CEILING - 1 <= limiter.limit <= CEILING + 1, f"settled at {limiter.limit}, not {CEILING}"
    assert rejected <= (BOUND - CEILING) + limiter.probes + 3, (
        f"{rejected} requests answered 429 ({rejected / stats.requests:.1%}), "
        f"{limiter.probes} probes"
    )
    # Once cut, it does not crawl: the requests after the first 429 start under a limit at the
    # ceiling (a count of the limiter's own states, whatever the machine's speed; the requests
    # actually in flight also depend on how fast this process's CPU serves both sides).
    after_cut = [limit for limit, decreases in limits if decreases]
    near = sum(limit >= CEILING - 1 for limit in after_cut)
    assert near >= 0.9 * len(after_cut), f"crawled: {near} of {len(after_cut)} at the ceiling"
    # The pass's last line tells an operator where Twilio's 429s left the limit.
    (finished,) = [e for e in events if e["event"] == "pass_finished"]
    assert finished["concurrency_limit"] == limiter.limit
    assert (finished["limit_decreases"], finished["limit_probes"]) == (
        limiter.decreases,
        limiter.probes,
    )
    # And how busy its group commit was: every page of the pass went through its batches,
    # whose statements ran one after another within the pass.
    assert finished["writer_pages"] == summary.pages
    assert 1 <= finished["writer_batches"] <= summary.pages
    assert 0 < finished["writer_busy_seconds"] <= summary.seconds
    assert metrics.series(
        "convsync_writer_busy_seconds_total", writer="pass"
    ).value == pytest.approx(finished["writer_busy_seconds"], abs=0.001)
    # And how long its slots were held: each request the simulator let in was served within
    # a slot (taken before the request is sent, given back once its body is read), so the
    # simulator counts less slot time than the limiter, never more, and the limiter never
    # holds more than its bound.
    counted = stats.active_avg_in_flight * stats.active_seconds
    assert 0 < counted <= finished["limiter_slot_seconds"] <= BOUND * summary.seconds
    assert finished["limiter_slot_seconds"] == pytest.approx(limiter.slot_seconds, abs=0.001)
    # And what the pass cost this process in CPU: some, and no more than the process spent
    # around it (the simulator's thread included there).
    assert 0 < finished["cpu_seconds"] <= cpu + 0.001


def _note_limits(limiter: AdaptiveLimiter) -> list[tuple[int, int]]:
    """Records, as each request is let through, the limit it started under and the count of
    cuts so far (the limiter's own ``acquire`` does the work)."""
    noted: list[tuple[int, int]] = []
    acquire = limiter.acquire

    async def acquire_noting_the_limit() -> None:
        await acquire()
        noted.append((limiter.limit, limiter.decreases))

    limiter.acquire = acquire_noting_the_limit  # type: ignore[method-assign]
    return noted


async def test_a_request_let_in_by_a_release_starts_before_the_answer_is_decoded() -> None:
    """Answers come in waves: the request a slot goes to is sent before the page that freed
    the slot is decoded, not after every page of the wave."""
    sim = Simulator(Dataset.generate(seed=3, services=1, users_per_service=5))
    sim.configure(latency_ms=20)
    with SimulatorServer(sim) as server:
        settings = settings_for(
            server, "postgresql://unused@127.0.0.1/unused", CONVSYNC_CONCURRENCY="1"
        )
        async with TwilioClient(settings) as client:
            started: list[str] = []  # tasks past the limiter, in order
            acquire = client.limiter.acquire

            async def noting_acquire() -> None:
                await acquire()
                task = asyncio.current_task()
                started.append(task.get_name() if task else "?")

            client.limiter.acquire = noting_acquire  # type: ignore[method-assign]
            at_decode: list[list[str]] = []

            def decode(raw: bytes) -> bytes:
                at_decode.append(list(started))
                return raw

            path = "/v1/Services?PageSize=50"
            first = asyncio.create_task(client._fetch(path, decode), name="first")
            await asyncio.sleep(0)  # the first holds the only slot
            second = asyncio.create_task(client._fetch(path, bytes), name="second")
            await asyncio.gather(first, second)
    assert at_decode == [["first", "second"]], "the waiting request started after the decode"
