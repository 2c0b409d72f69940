"""Claims, leases and passes in the store, on real PostgreSQL: a stale claim can do nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from tests.harness import scalar
from worker.errors import LeaseLost, PassBusy
from worker.model import ConversationsPage
from worker.store import Store
from worker.targets import Target, TargetQueue

SERVICE = "IS" + "1" * 32
USER = "US" + "2" * 32
OTHER_USER = "US" + "3" * 32


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    store = await Store.connect(db_url, 4)
    yield store
    await store.close()


async def queue_one_user(store: Store) -> int:
    info = await store.begin_or_resume_pass({"services": None, "users": None})
    assert info is not None
    await store.pool.execute("INSERT INTO services (chat_service_sid) VALUES ($1)", SERVICE)
    await store.enqueue_users(info.run_id, SERVICE, [USER])
    return info.run_id


async def expire_leases(store: Store) -> None:
    await store.pool.execute("UPDATE sync_cursors SET lease_until = now() - interval '1 s'")


async def test_a_stale_claim_of_the_same_worker_can_neither_write_nor_fail_the_user(
    store: Store, db_url: str
) -> None:
    run_id = await queue_one_user(store)
    stale = await store.claim_user(run_id, "host:1:aa", 60)
    assert stale is not None
    assert await store.claim_user(run_id, "host:1:aa", 60) is None, "leased: not claimable"
    await expire_leases(store)
    fresh = await store.claim_user(run_id, "host:1:aa", 60)  # same worker, another loop
    assert fresh is not None
    assert fresh.token != stale.token

    page = ConversationsPage(b"[]", [], [])
    with pytest.raises(LeaseLost):
        await store.save_conversations_page(stale, 60, 0, "/p1", page, "/p2")
    await store.mark_user_failed(stale, "should not land")
    await store.release_user(stale)
    assert await scalar(db_url, "SELECT state FROM sync_cursors") == "pending"
    assert await scalar(db_url, "SELECT claimed_by FROM sync_cursors") == fresh.token

    await store.save_conversations_page(fresh, 60, 0, "/p1", page, None)
    assert await scalar(db_url, "SELECT state FROM sync_cursors") == "done"


async def test_heartbeat_renews_only_the_given_claims(store: Store, db_url: str) -> None:
    run_id = await queue_one_user(store)
    claim = await store.claim_user(run_id, "host:1:aa", 1)
    assert claim is not None
    await store.renew_leases([claim.token], 600)
    assert await scalar(db_url, "SELECT lease_until > now() + interval '500 s' FROM sync_cursors")
    await store.renew_leases(["someone/else"], 1)
    assert await scalar(db_url, "SELECT lease_until > now() + interval '500 s' FROM sync_cursors")


async def test_heartbeat_skips_a_cursor_a_page_write_holds_instead_of_waiting(
    store: Store, db_url: str
) -> None:
    run_id = await queue_one_user(store)
    await store.enqueue_users(run_id, SERVICE, [OTHER_USER])
    claims = await store.claim_users(run_id, "host:1:aa", 1, limit=2)
    assert len(claims) == 2
    held, free = sorted(claims, key=lambda c: c.user_sid)
    writer = await asyncpg.connect(db_url)  # stands for a batch: the cursor locked, uncommitted
    try:
        async with writer.transaction():
            await writer.execute(
                "SELECT 1 FROM sync_cursors WHERE user_sid = $1 FOR UPDATE", held.user_sid
            )
            # Waiting for that lock would never end while it is held: the test times out.
            await asyncio.wait_for(store.renew_leases([held.token, free.token], 600), 30)
    finally:
        await writer.close()
    renewed = "SELECT lease_until > now() + interval '500 s' FROM sync_cursors WHERE user_sid = $1"
    assert await scalar(db_url, renewed, free.user_sid)
    assert not await scalar(db_url, renewed, held.user_sid)
    await store.renew_leases([held.token, free.token], 600)  # the next heartbeat gets it
    assert await scalar(db_url, renewed, held.user_sid)


async def test_release_all_frees_every_claim_of_one_worker_only(store: Store, db_url: str) -> None:
    run_id = await queue_one_user(store)
    claim = await store.claim_user(run_id, "host:7:bb", 60)
    assert claim is not None
    await store.release_all("host:7:b")  # a prefix of another owner is not that owner
    assert await scalar(db_url, "SELECT claimed_by FROM sync_cursors") == claim.token
    await store.release_all("host:7:bb")
    assert await scalar(db_url, "SELECT claimed_by FROM sync_cursors") is None


async def test_a_pass_being_started_is_busy_until_its_start_ends_or_lapses(
    store: Store, db_url: str
) -> None:
    """A worker starting a pass (listing its services) holds no claim yet; its start's lease
    keeps the pass from being superseded or recorded interrupted by another replica, until
    the worker ends it (at its first claim), stops, or its lease lapses (the worker is gone)."""
    everything = {"services": None, "users": None}
    one_user = {"services": [SERVICE], "users": [USER]}
    info = await store.begin_or_resume_pass(everything, starter="host:1:aa/1", lease_seconds=60)
    assert info is not None
    assert "host:1:aa" in await store.claim_owners(), "freed at once if found dead"
    with pytest.raises(PassBusy):
        await store.begin_or_resume_pass(one_user)
    assert not await store.interrupt_pass(info.run_id, "host:2:bb"), "another replica's stop"
    assert await store.interrupt_pass(info.run_id, "host:1:aa"), "its own stop gives it back"

    # Resumed (interrupted) by a worker that then ends its start (its first claim): not busy.
    again = await store.begin_or_resume_pass(everything, starter="host:3:cc/1", lease_seconds=60)
    assert again is not None
    assert again.run_id == info.run_id
    with pytest.raises(PassBusy):
        await store.begin_or_resume_pass(one_user)
    await store.end_pass_start(info.run_id, "host:3:cc/1")
    superseding = await store.begin_or_resume_pass(
        one_user, starter="host:4:dd/1", lease_seconds=60
    )
    assert superseding is not None
    assert superseding.run_id != info.run_id
    assert (
        await scalar(db_url, "SELECT count(*) FROM sync_pass_starts WHERE run_id = $1", info.run_id)
        == 0
    )

    # A starter that died: its lease lapses and the pass may be superseded.
    await store.pool.execute("UPDATE sync_pass_starts SET lease_until = now() - interval '1 s'")
    last = await store.begin_or_resume_pass(everything, starter="host:5:ee/1", lease_seconds=60)
    assert last is not None
    assert last.run_id != superseding.run_id
    assert (
        await scalar(db_url, "SELECT status FROM sync_runs WHERE run_id = $1", superseding.run_id)
        == "failed"
    )


async def test_a_start_is_given_back_with_its_worker_s_claims_and_gone_with_its_pass(
    store: Store, db_url: str
) -> None:
    info = await store.begin_or_resume_pass(
        {"services": None, "users": None}, starter="host:6:ff/1", lease_seconds=60
    )
    assert info is not None
    starts = "SELECT count(*) FROM sync_pass_starts WHERE claimed_by IS NOT NULL"
    await store.renew_leases(["host:6:ff/1"], 600)
    assert await scalar(
        db_url, "SELECT lease_until > now() + interval '300 s' FROM sync_pass_starts"
    ), "renewed as a claim"
    await store.release_all("host:6:ff")
    assert await scalar(db_url, starts) == 0, "given back: no longer live"
    await store.finish_pass(info.run_id)
    assert await scalar(db_url, "SELECT count(*) FROM sync_pass_starts") == 0, "gone"


async def test_a_pass_of_another_scope_with_live_claims_is_not_superseded(
    store: Store, db_url: str
) -> None:
    run_id = await queue_one_user(store)
    claim = await store.claim_user(run_id, "host:1:aa", 60)
    assert claim is not None
    with pytest.raises(PassBusy):
        await store.begin_or_resume_pass({"services": [SERVICE], "users": [USER]})
    await expire_leases(store)  # its workers are gone: the new pass may supersede it
    info = await store.begin_or_resume_pass({"services": [SERVICE], "users": [USER]})
    assert info is not None
    assert info.run_id != run_id
    assert await scalar(db_url, "SELECT status FROM sync_runs WHERE run_id = $1", run_id) == (
        "failed"
    )
    # the superseded pass's workers stop claiming
    assert await store.claim_user(run_id, "host:1:aa", 60) is None
    progress = await store.pass_progress(run_id)
    assert not progress.running


async def test_passes_are_one_per_tick(store: Store) -> None:
    from datetime import UTC, datetime

    tick = datetime(2026, 1, 1, tzinfo=UTC)
    first = await store.begin_or_resume_pass({"services": None, "users": None}, tick)
    assert first is not None
    again = await store.begin_or_resume_pass({"services": None, "users": None}, tick)
    assert again is not None
    assert again.run_id == first.run_id, "a running pass is joined"
    await store.finish_pass(first.run_id)
    assert await store.begin_or_resume_pass({"services": None, "users": None}, tick) is None


async def test_claim_tokens_never_hold_a_slash_in_the_owner(store: Store) -> None:
    run_id = await queue_one_user(store)
    claim = await store.claim_user(run_id, "team/replica-1", 60)
    assert claim is not None
    assert claim.token.count("/") == 1
    await store.release_all("team/replica-1")
    assert await store.pool.fetchval("SELECT claimed_by FROM sync_cursors") is None


async def test_one_identity_due_in_two_services_gets_two_relist_claims(store: Store) -> None:
    # A claim token stands for one target: the re-lister's held claims are a set, so two
    # targets sharing a token would lose the second's lease renewal when the first ends.
    other_service = "IS" + "4" * 32
    for service in (SERVICE, other_service):
        await store.pool.execute(
            """INSERT INTO relist_targets (chat_service_sid, user_ref, due_at)
               VALUES ($1, $2, now())""",
            service,
            "alice",
        )
    targets = await TargetQueue(store.pool).claim_due("replica-1", 60, 10)
    assert sorted(t.chat_service_sid for t in targets) == [SERVICE, other_service]
    assert len({t.token for t in targets}) == 2


async def test_a_relist_target_counts_its_failures_not_its_waits(store: Store) -> None:
    # Waiting behind another walker (a pass holding the user) is no failed attempt: a target
    # that waited a few seconds still gets its retries after a failure.
    await store.pool.execute(
        "INSERT INTO relist_targets (chat_service_sid, user_ref, due_at) VALUES ($1, $2, now())",
        SERVICE,
        USER,
    )
    queue = TargetQueue(store.pool)
    for _ in range(6):
        [busy] = await queue.claim_due("replica-1", 60, 10)
        await queue.postpone(busy, 0.0)
    [target] = await queue.claim_due("replica-1", 60, 10)
    assert target.attempts == 0
    await queue.postpone(target, 0.0, "HTTP 500", failed=True)
    [target] = await queue.claim_due("replica-1", 60, 10)
    assert target.attempts == 1


async def test_a_relist_failing_after_a_new_pass_queued_its_user_gives_it_back(
    store: Store,
) -> None:
    # A re-list holds the user's cursor when a new pass queues the user (the claim is kept for
    # it); the re-list then fails: the user is the new pass's to list, not failed in it.
    first = await queue_one_user(store)
    await store.pool.execute("UPDATE sync_cursors SET state = 'done'")
    await store.finish_pass(first)
    target = Target(SERVICE, USER, "replica-1~relist.t", datetime.now(UTC), 0)
    relist = await TargetQueue(store.pool).claim_cursor(target, USER, 60)
    assert relist is not None
    info = await store.begin_or_resume_pass({"services": None, "users": None})
    assert info is not None
    await store.enqueue_users(info.run_id, SERVICE, [USER])
    await store.mark_user_failed(relist, "HTTP 500")
    cursor = await store.pool.fetchrow(
        "SELECT run_id, state, claimed_by, last_error FROM sync_cursors"
    )
    assert dict(cursor or {}) == {
        "run_id": info.run_id,
        "state": "pending",
        "claimed_by": None,
        "last_error": None,
    }
    assert await store.claim_user(info.run_id, "host:1:bb", 60) is not None
