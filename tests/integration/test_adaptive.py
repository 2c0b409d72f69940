"""The adaptive limiter against a hidden concurrency ceiling, over a real socket."""

from __future__ import annotations

from convsync_tools.simdata import Dataset
from convsync_tools.simulator import Simulator, SimulatorServer
from tests.harness import assert_mirrors, settings_for
from worker.client import Backoff, TwilioClient
from worker.metrics import Metrics
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
                summary = await SyncPass(settings, store, client, metrics=metrics).run()
                limiter = client.limiter
        finally:
            await store.close()
        assert summary is not None
        assert summary.status == "succeeded"
        await assert_mirrors(server, db_url)
        stats = sim.stats()
    share_429 = stats.by_status[429] / stats.requests
    # AIMD with decrease d cycles every ~K*K*(1-d) successes: at K=8, d=0.9 that is one 429 in
    # ~7 requests; at K=32 about 1% (the benchmark measures that, out of process).
    assert share_429 < 0.25, f"{share_429:.1%} of requests answered 429"
    assert limiter.decreases >= 1, "the limiter backed off"
    assert limiter.limit <= 2 * CEILING, f"limit {limiter.limit} did not come down to the ceiling"
    assert limiter.peak_in_flight <= BOUND
    assert stats.avg_in_flight >= 0.5 * CEILING, f"crawled: {stats.avg_in_flight:.1f} in flight"
