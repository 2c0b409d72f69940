"""SIGKILL at random points of a pass, trial after trial: the rerun ends equal to the data,
no page is half-written, no cursor runs ahead of its rows, and only the pages that were in
flight are fetched twice. ``CONVSYNC_TRIALS`` sets the number of trials (default 20)."""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import subprocess
from collections.abc import Iterator

import asyncpg
import pytest

from convsync_tools.simdata import Dataset
from convsync_tools.simulator import Simulator, SimulatorServer
from tests.faults.common import (
    check_cursors,
    conversation_pages_fetched_twice,
    mirror,
    record,
    wait_for,
)
from tests.harness import convsync, scalar, spawn_convsync, worker_env

TRIALS = int(os.environ.get("CONVSYNC_TRIALS", "20"))
SEED = int(os.environ.get("CONVSYNC_TRIAL_SEED", "20241124"))
CONCURRENCY = 4
PAGE = 10
USERS = 40
RUNNING_PAGES = (
    "SELECT coalesce(sum(run_pages), 0) FROM sync_cursors WHERE run_id = "
    "(SELECT run_id FROM sync_runs WHERE status = 'running')"
)


@pytest.fixture
def server() -> Iterator[SimulatorServer]:
    data = Dataset.generate(
        seed=41, services=1, users_per_service=USERS, max_conversations_per_user=110
    )
    sim = Simulator(data)
    sim.configure(latency_ms=2, jitter_ms=4)
    with SimulatorServer(sim) as s:
        yield s


def total_pages(server: SimulatorServer) -> int:
    data = server.sim.dataset
    service = data.service_sids()[0]
    return sum(
        max(1, math.ceil(data.membership_count(service, u) / PAGE)) for u in data.user_sids(service)
    )


def mutate(server: SimulatorServer, rng: random.Random, trial: int) -> dict[str, int]:
    """A few upstream changes, so that removals and updates happen across kills."""
    data = server.sim.dataset
    service = data.service_sids()[0]
    users = [u for u in data.user_sids(service) if data.membership_count(service, u) > 0]
    done = {"removed": 0, "added": 0, "updated": 0, "unread": 0, "users_deleted": 0}
    for _ in range(rng.randint(1, 3)):
        user = rng.choice(users)
        items = data.memberships(service, user)
        data.remove_membership(service, user, rng.choice(items)["conversation_sid"])
        done["removed"] += 1
    for _ in range(rng.randint(0, 2)):
        data.add_membership(service, rng.choice(users))
        done["added"] += 1
    user = rng.choice(users)
    if data.membership_count(service, user):
        sid = rng.choice(data.memberships(service, user))["conversation_sid"]
        data.update_conversation(service, sid, friendly_name=f"trial {trial} ✂")
        done["updated"] += 1
        data.set_unread(service, user, sid, rng.randint(0, 99), rng.randint(0, 500))
        done["unread"] += 1
    if trial % 7 == 6:
        data.delete_user(service, rng.choice(users))
        data.add_user(service)
        done["users_deleted"] += 1
    return done


def next_pass(server: SimulatorServer) -> int:
    """Pages fetched twice so far, counting afresh for a new pass (which lists every first
    page again). A child continues the running pass; with none, because the pass ended
    before its kill, the next child starts a new one."""
    twice = conversation_pages_fetched_twice(server)
    server.sim.reset_stats()
    return twice


async def kill_after(
    conn: asyncpg.Connection, env: dict[str, str], pages: int
) -> tuple[bool, subprocess.Popen[str]]:
    """Start a pass in a child and SIGKILL it once ``pages`` more pages are committed; True if
    the kill landed while it was still running."""
    before = await conn.fetchval(RUNNING_PAGES)
    child = spawn_convsync(["sync"], env)
    try:
        await wait_for(
            conn, RUNNING_PAGES, lambda n: n >= before + pages or child.poll() is not None, 60
        )
    finally:
        landed = child.poll() is None
        child.send_signal(signal.SIGKILL)
        await asyncio.to_thread(child.communicate, timeout=30)
    assert child.returncode == (-signal.SIGKILL if landed else 0), child.returncode
    return landed, child


@pytest.mark.timeout(max(120, 8 * TRIALS))
async def test_sigkill_at_random_points_then_rerun_ends_equal(
    server: SimulatorServer, db_url: str
) -> None:
    rng = random.Random(SEED)
    env = worker_env(
        server, db_url, CONVSYNC_CONCURRENCY=str(CONCURRENCY), CONVSYNC_PAGE_SIZE=str(PAGE)
    )
    conn = await asyncpg.connect(db_url)
    expected_runs = 0
    running = "SELECT count(*) FROM sync_runs WHERE status = 'running'"
    try:
        for trial in range(TRIALS):
            context = f"trial {trial} (CONVSYNC_TRIAL_SEED={SEED})"
            if trial:
                record(**{f"mutations_{k}": n for k, n in mutate(server, rng, trial).items()})
            server.sim.reset_stats()
            twice = 0
            kills = 3 if trial % 5 == 4 else 2 if trial % 5 == 2 else 1
            landed = 0
            for _ in range(kills):
                if await conn.fetchval(running) == 0:
                    expected_runs += 1
                    twice += next_pass(server)
                pages = rng.randint(1, max(1, total_pages(server) // kills - 1))
                hit, _ = await kill_after(conn, env, pages)
                landed += hit
                # Whatever the kill interrupted, the committed state is consistent.
                await check_cursors(db_url, server, PAGE)
            if await conn.fetchval(running) == 0:
                expected_runs += 1
                twice += next_pass(server)
            rerun = convsync(["sync"], env)
            assert rerun.returncode == 0, f"{context}: {rerun.stderr[-2000:]}"
            await mirror(server, db_url)
            runs = await scalar(db_url, "SELECT count(*) FROM sync_runs")
            assert runs == expected_runs, f"{context}: a killed pass is continued, not restarted"
            twice += conversation_pages_fetched_twice(server)
            assert twice <= CONCURRENCY * landed, f"{context}: {twice} pages fetched twice"
            record(
                kill_trials=1,
                sigkills=kills,
                sigkills_while_running=landed,
                pages_fetched_twice=twice,
                cli_runs=kills + 1,
            )
    finally:
        await conn.close()
