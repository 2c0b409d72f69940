"""The 'interrupted' status in the store, on real PostgreSQL: a stopped worker records its pass
interrupted only when no other worker still works it, and the next pass of the same scope
continues it (a pass of another scope supersedes it)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.harness import fetch, scalar
from worker.store import Store, UserClaim

SERVICE = "IS" + "1" * 32
USERS = ["US" + str(i) * 32 for i in (2, 3)]
SCOPE: dict[str, list[str] | None] = {"services": None, "users": None}


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    store = await Store.connect(db_url, 4)
    yield store
    await store.close()


async def queue_users(store: Store) -> int:
    info = await store.begin_or_resume_pass(SCOPE)
    assert info is not None
    await store.pool.execute("INSERT INTO services (chat_service_sid) VALUES ($1)", SERVICE)
    await store.enqueue_users(info.run_id, SERVICE, USERS)
    return info.run_id


async def test_the_last_worker_to_stop_records_the_pass_interrupted_and_frees_its_claims(
    store: Store, db_url: str
) -> None:
    run_id = await queue_users(store)
    assert await store.claim_user(run_id, "host:1:10", 60) is not None
    assert await store.interrupt_pass(run_id, "host:1:10") is True
    assert await scalar(db_url, "SELECT status FROM sync_runs") == "interrupted"
    assert (
        await scalar(db_url, "SELECT count(*) FROM sync_cursors WHERE claimed_by IS NOT NULL") == 0
    )
    assert await scalar(db_url, "SELECT finished_at FROM sync_runs") is None, "not finished"
    assert not (await store.pass_progress(run_id)).running
    assert await store.claim_user(run_id, "host:1:11", 60) is None, "nobody works it meanwhile"


async def test_a_pass_another_worker_still_works_stays_running(store: Store, db_url: str) -> None:
    run_id = await queue_users(store)
    mine = await store.claim_user(run_id, "host:1:10", 60)
    theirs = await store.claim_user(run_id, "host:2:20", 60)
    assert mine is not None
    assert theirs is not None
    assert await store.interrupt_pass(run_id, "host:1:10") is False
    assert await scalar(db_url, "SELECT status FROM sync_runs") == "running"
    held = await scalar(
        db_url, "SELECT array_agg(claimed_by) FROM sync_cursors WHERE claimed_by IS NOT NULL"
    )
    assert held == [theirs.token], "only the stopping worker's claims are given back"


async def test_the_next_pass_of_the_same_scope_continues_an_interrupted_one(
    store: Store, db_url: str
) -> None:
    run_id = await queue_users(store)
    assert await store.interrupt_pass(run_id, "host:1:10") is True
    info = await store.begin_or_resume_pass(SCOPE)
    assert info is not None
    assert (info.run_id, info.resumed) == (run_id, True)
    assert await scalar(db_url, "SELECT status FROM sync_runs") == "running"
    assert await store.claim_user(run_id, "host:1:11", 60) is not None


async def test_a_pass_of_another_scope_supersedes_an_interrupted_one(
    store: Store, db_url: str
) -> None:
    run_id = await queue_users(store)
    assert await store.interrupt_pass(run_id, "host:1:10") is True
    info = await store.begin_or_resume_pass({"services": [SERVICE], "users": None})
    assert info is not None
    assert info.run_id != run_id
    statuses = await scalar(db_url, "SELECT array_agg(status ORDER BY run_id) FROM sync_runs")
    assert statuses == ["failed", "running"]


async def test_at_most_one_pass_is_unfinished(store: Store) -> None:
    run_id = await queue_users(store)
    assert await store.interrupt_pass(run_id, "host:1:10") is True
    with pytest.raises(asyncpg.UniqueViolationError):
        await store.pool.execute("INSERT INTO sync_runs (status) VALUES ('running')")


async def test_a_finished_users_listing_holds_no_claim(store: Store, db_url: str) -> None:
    # The worker that listed a service's users (its last page saved) and holds nothing else
    # is the pass's last worker: stopping, it records the pass interrupted. The finished
    # listing's claim once lived on for a lease: the pass stayed 'running' with nobody on it.
    info = await store.begin_or_resume_pass(SCOPE)
    assert info is not None
    await store.pool.execute("INSERT INTO services (chat_service_sid) VALUES ($1)", SERVICE)
    await store.open_discovery(info.run_id, [SERVICE])
    claim = await store.claim_discovery(info.run_id, "host:1:10", 60)
    assert claim is not None
    await store.save_users_page(claim, 60, 0, "/v1/Services/x/Users", [], [], None)
    assert await scalar(
        db_url, "SELECT claimed_by IS NULL AND lease_until IS NULL FROM sync_discovery"
    )
    assert await store.interrupt_pass(info.run_id, "host:1:10") is True
    assert await scalar(db_url, "SELECT status FROM sync_runs") == "interrupted"


async def test_a_relists_claim_is_no_pass_work_when_the_last_worker_stops(
    store: Store, db_url: str
) -> None:
    # A webhook's re-list holds one of the pass's users (its cursor filed under the pass): the
    # pass's last worker stopping still records the pass interrupted, not running with nobody.
    run_id = await queue_users(store)
    await store.pool.execute(
        "UPDATE sync_cursors SET claimed_by = $2, lease_until = now() + interval '60 s'"
        " WHERE user_sid = $1",
        USERS[0],
        "host:1:10~relist/0123abcd.ef",
    )
    assert await store.interrupt_pass(run_id, "host:1:10") is True
    assert await scalar(db_url, "SELECT status FROM sync_runs") == "interrupted"


async def test_a_relist_failing_under_an_interrupted_pass_leaves_the_user_to_it(
    store: Store, db_url: str
) -> None:
    # The pass resumes later and lists only its pending users: a re-list's failure meanwhile
    # gives the user back pending (from page one), never failed under the pass.
    run_id = await queue_users(store)
    assert await store.interrupt_pass(run_id, "host:1:10") is True
    claim = UserClaim(run_id, SERVICE, USERS[0], None, 0, "host:1:10~relist/0123abcd.ef")
    await store.pool.execute(
        "UPDATE sync_cursors SET claimed_by = $2, next_page_path = '/p2', listing_pages = 1"
        " WHERE user_sid = $1",
        USERS[0],
        claim.token,
    )
    await store.relist_failed(claim, "HTTP 500")
    (cursor,) = await fetch(
        db_url,
        "SELECT state, claimed_by, next_page_path, listing_pages, last_error"
        " FROM sync_cursors WHERE user_sid = $1",
        USERS[0],
    )
    assert tuple(cursor) == ("pending", None, None, 0, "HTTP 500")
    await store.pool.execute("UPDATE sync_runs SET status = 'succeeded'")
    await store.pool.execute(
        "UPDATE sync_cursors SET claimed_by = $2 WHERE user_sid = $1", USERS[0], claim.token
    )
    await store.relist_failed(claim, "HTTP 500")
    assert (
        await scalar(db_url, "SELECT state FROM sync_cursors WHERE user_sid = $1", USERS[0])
        == "failed"
    ), "after its pass, the failure shows until the next one"
