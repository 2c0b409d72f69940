"""Group commit on real PostgreSQL: pages of many users in one statement, each still guarded by
its own claim, a refused page isolated from the rest of its batch, and conversations written
once per version."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from convsync_tools.pgembed import LocalPostgres
from tests.conftest import create_database, drop_database
from tests.harness import fetch, scalar, until
from worker.database import PIN_FROM_POOL_SIZE, RetryingStore
from worker.errors import DatabaseUnavailable, LeaseLost
from worker.metrics import Metrics
from worker.migrate import apply_migrations
from worker.model import ENVELOPES, MEMBER_FIELDS, decode_conversations_page
from worker.store import _PAGES_SQL, PageWrite, Store, UserClaim
from worker.writer import PageWriter

SERVICE = "IS" + "1" * 32
USERS = [f"US{i:032x}" for i in range(1, 13)]
SHARED = "CH" + "c" * 32  # one conversation every user is in


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    store = await Store.connect(db_url, 4)
    yield store
    await store.close()


async def claim_everyone(store: Store) -> dict[str, UserClaim]:
    info = await store.begin_or_resume_pass({"services": None, "users": None})
    assert info is not None
    await store.pool.execute("INSERT INTO services (chat_service_sid) VALUES ($1)", SERVICE)
    await store.enqueue_users(info.run_id, SERVICE, USERS)
    claims = await store.claim_users(info.run_id, "host:1:aa", 60, limit=len(USERS))
    return {c.user_sid: c for c in claims}


def item(user: str, conversation: str, **fields: Any) -> dict[str, Any]:
    return {
        "conversation_sid": conversation,
        "chat_service_sid": SERVICE,
        "user_sid": user,
        "participant_sid": "MB" + conversation[2:],
        "friendly_name": "shared" if conversation == SHARED else "own",
        "unread_messages_count": 1,
        "date_updated": "2024-01-02T03:04:05Z",
        **fields,
    }


def page_of(claim: UserClaim, *items: dict[str, Any]) -> PageWrite:
    body = json.dumps({"conversations": list(items), "meta": {"next_page_url": None}}).encode()
    envelope = ENVELOPES["conversations"].decode(body)
    page = decode_conversations_page(body, envelope.conversations, SERVICE, claim.user_sid)
    return PageWrite(claim, 0, "/page", page, None)


def writer_for(store: Store) -> PageWriter:
    return PageWriter(RetryingStore(store, 0.0, Metrics()), 60, max_pages=64)


async def test_pages_of_many_users_commit_in_few_statements(store: Store, db_url: str) -> None:
    claims = await claim_everyone(store)
    writer = writer_for(store)
    runner = asyncio.create_task(writer.run())
    try:
        writes = [page_of(c, item(u, SHARED), item(u, "CH" + u[2:])) for u, c in claims.items()]
        outcomes = await asyncio.gather(*(writer.write(w) for w in writes))
    finally:
        runner.cancel()
    assert [o.inserted for o in outcomes] == [2] * len(USERS)
    assert writer.pages == len(USERS)
    assert writer.batches <= 2, f"{writer.batches} statements for {len(USERS)} pages"
    assert await scalar(db_url, "SELECT count(*) FROM memberships") == 2 * len(USERS)
    assert await scalar(db_url, "SELECT count(*) FROM conversations") == len(USERS) + 1
    done = "SELECT count(*) FROM sync_cursors WHERE state = 'done' AND claimed_by IS NULL"
    assert await scalar(db_url, done) == len(USERS)


async def test_a_batch_that_fills_while_it_lingers_commits_at_once(store: Store) -> None:
    claims = await claim_everyone(store)
    writer = PageWriter(RetryingStore(store, 0.0, Metrics()), 60, max_pages=2, max_wait=60)
    runner = asyncio.create_task(writer.run())
    try:
        first, second = (page_of(claims[u], item(u, "CH" + u[2:])) for u in USERS[:2])
        waiting = asyncio.create_task(writer.write(first))
        for _ in range(100):  # every ready callback runs: the writer takes it and lingers
            await asyncio.sleep(0)
        assert not waiting.done()
        # The second page fills the batch: it commits now, not after the 60 s linger.
        outcomes = await asyncio.wait_for(asyncio.gather(waiting, writer.write(second)), 20)
    finally:
        runner.cancel()
    assert [o.inserted for o in outcomes] == [1, 1]
    assert (writer.batches, writer.pages) == (1, 2)


async def test_a_users_second_page_waits_for_the_next_batch(store: Store, db_url: str) -> None:
    # Both pages of one claim at once (they never come so from a listing, which waits for its
    # page's commit): in one statement the second would find the cursor not yet at its page.
    claims = await claim_everyone(store)
    user = USERS[0]
    claim = claims[user]
    writer = writer_for(store)
    runner = asyncio.create_task(writer.run())
    try:
        one = dataclasses.replace(page_of(claim, item(user, SHARED)), next_page_path="/page2")
        two = PageWrite(claim, 1, "/page2", page_of(claim, item(user, "CH" + user[2:])).page, None)
        outcomes = await asyncio.gather(writer.write(one), writer.write(two))
    finally:
        runner.cancel()
    assert [o.inserted for o in outcomes] == [1, 1]
    assert writer.batches == 2
    done = "SELECT state FROM sync_cursors WHERE user_sid = $1"
    conn = await asyncpg.connect(db_url)
    try:
        assert await conn.fetchval(done, user) == "done"
        live = "SELECT count(*) FROM memberships WHERE user_sid = $1 AND removed_at IS NULL"
        assert await conn.fetchval(live, user) == 2  # the last page's check removed nothing
    finally:
        await conn.close()


async def test_a_refused_page_fails_alone_and_a_stale_page_writes_nothing(
    store: Store, db_url: str
) -> None:
    claims = await claim_everyone(store)
    writer = writer_for(store)
    good = [page_of(claims[u], item(u, "CH" + u[2:])) for u in USERS[:10]]
    # A value PostgreSQL refuses (a count beyond bigint), put in a validated page by hand:
    # whatever the parser let through, the database's refusal costs that page only.
    refused = page_of(claims[USERS[10]], item(USERS[10], "CH" + "e" * 32))
    (fields,) = json.loads(refused.page.members)
    fields[MEMBER_FIELDS.index("unread_messages_count")] = 99999999999999999999
    members = json.dumps([fields]).encode()
    assert members != refused.page.members
    refused = PageWrite(
        refused.claim,
        0,
        "/page",
        dataclasses.replace(refused.page, members=members),
        None,
    )
    stale_claim = claims[USERS[11]]
    stale = PageWrite(stale_claim, 3, "/page", page_of(stale_claim).page, None)  # not page 3
    runner = asyncio.create_task(writer.run())
    try:
        results = await asyncio.gather(
            *(writer.write(w) for w in [*good, refused, stale]), return_exceptions=True
        )
    finally:
        runner.cancel()
    assert all(not isinstance(r, BaseException) for r in results[:10]), results
    assert isinstance(results[10], asyncpg.DataError)
    assert isinstance(results[11], LeaseLost)
    assert writer.pages == 10  # committed: neither the refused page nor the stale one
    assert writer.busy_seconds > 0
    assert await scalar(db_url, "SELECT count(*) FROM memberships") == 10
    states = "SELECT user_sid, state FROM sync_cursors ORDER BY user_sid"
    conn = await asyncpg.connect(db_url)
    try:
        by_user = {r["user_sid"]: r["state"] for r in await conn.fetch(states)}
    finally:
        await conn.close()
    assert [by_user[u] for u in USERS] == ["done"] * 10 + ["pending", "pending"]


async def test_first_listings_and_known_users_share_a_batch_with_exact_counts(
    store: Store, db_url: str
) -> None:
    # A user without membership rows gets plain inserts, the others upserts, in one statement:
    # each page's counts and rows must come out as if every row had been upserted.
    claims = await claim_everyone(store)
    writer = writer_for(store)
    runner = asyncio.create_task(writer.run())
    new, known, revived = USERS[0], USERS[1], USERS[2]
    x, y, z = ("CH" + c * 32 for c in "abd")
    try:
        first = [
            dataclasses.replace(page_of(claims[known], item(known, x), item(known, y)),
                                next_page_path="/page2"),
            dataclasses.replace(page_of(claims[revived], item(revived, x)),
                                next_page_path="/page2"),
        ]  # fmt: skip
        for write in first:
            assert (await writer.write(write)).inserted == len(write.page.sids)
        removed = await store.pool.execute(
            "UPDATE memberships SET removed_at = now() WHERE user_sid = $1", revived
        )
        assert removed == "UPDATE 1"
        batch = [
            page_of(claims[new], item(new, x), item(new, y)),
            dataclasses.replace(
                page_of(claims[known], item(known, x), item(known, y, unread_messages_count=7),
                        item(known, z)),
                pages_written=1,
            ),
            dataclasses.replace(page_of(claims[revived], item(revived, x)), pages_written=1),
        ]  # fmt: skip
        outcomes = await asyncio.gather(*(writer.write(w) for w in batch))
    finally:
        runner.cancel()
    counts = [(o.inserted, o.updated, o.unchanged) for o in outcomes]
    assert counts == [(2, 0, 0), (1, 1, 1), (0, 1, 0)]
    rows = await store.pool.fetch(
        """SELECT user_sid, conversation_sid, unread_messages_count, removed_at IS NULL AS live
           FROM memberships ORDER BY 1, 2"""
    )
    assert [tuple(r) for r in rows] == [
        (new, x, 1, True), (new, y, 1, True),
        (known, x, 1, True), (known, y, 7, True), (known, z, 1, True),
        (revived, x, 1, True),
    ]  # fmt: skip


async def test_a_conversation_is_written_once_per_version(store: Store, db_url: str) -> None:
    claims = await claim_everyone(store)
    writer = writer_for(store)
    runner = asyncio.create_task(writer.run())
    try:
        first, second, third = USERS[:3]
        await writer.write(page_of(claims[first], item(first, SHARED)))
        # Changed behind the writer's back: a page with the version it committed leaves it be.
        await store.pool.execute("UPDATE conversations SET friendly_name = 'kept'")
        await writer.write(page_of(claims[second], item(second, SHARED)))
        assert await scalar(db_url, "SELECT friendly_name FROM conversations") == "kept"
        # A newer version is written.
        newer = item(third, SHARED, date_updated="2024-02-01T00:00:00Z", friendly_name="newer")
        await writer.write(page_of(claims[third], newer))
    finally:
        runner.cancel()
    assert await scalar(db_url, "SELECT friendly_name FROM conversations") == "newer"
    assert await scalar(db_url, "SELECT count(*) FROM memberships") == 3


async def test_an_undated_conversation_is_written_each_time_beside_remembered_ones(
    store: Store, db_url: str
) -> None:
    claims = await claim_everyone(store)
    writer = writer_for(store)
    runner = asyncio.create_task(writer.run())
    undated = "CH" + "e" * 32
    try:
        first, second = USERS[:2]
        await writer.write(
            page_of(claims[first], item(first, SHARED), item(first, undated, date_updated=None))
        )
        await store.pool.execute("UPDATE conversations SET friendly_name = 'kept'")
        # The same versions again: the dated one is remembered and left out; an undated one
        # overwrites any, so it is written again (not mistaken for one never committed).
        await writer.write(
            page_of(claims[second], item(second, SHARED), item(second, undated, date_updated=None))
        )
    finally:
        runner.cancel()
    rows = await store.pool.fetch("SELECT conversation_sid, friendly_name FROM conversations")
    assert dict(rows) == {SHARED: "kept", undated: "own"}


async def test_a_batch_with_an_undated_version_writes_the_remembered_one_beside_it(
    store: Store, db_url: str
) -> None:
    # In one batch, an undated version and the remembered dated one of a conversation: the
    # batch writes what it would write remembering nothing (the dated version, as undated
    # ones sort last), never the undated one alone.
    claims = await claim_everyone(store)
    writer = writer_for(store)
    runner = asyncio.create_task(writer.run())
    try:
        first, second, third = USERS[:3]
        await writer.write(page_of(claims[first], item(first, SHARED)))
        undated = item(second, SHARED, date_updated=None, friendly_name="undated")
        dated = item(third, SHARED, friendly_name="dated")  # the remembered date_updated
        await asyncio.gather(
            writer.write(page_of(claims[second], undated)),
            writer.write(page_of(claims[third], dated)),
        )
        assert writer.batches == 2
    finally:
        runner.cancel()
    assert await scalar(db_url, "SELECT friendly_name FROM conversations") == "dated"


async def test_a_writer_forgets_what_it_committed_once_a_connection_was_opened_since(
    store: Store, db_url: str
) -> None:
    claims = await claim_everyone(store)
    # Waits out the dropped connections below: its next attempt opens a new one.
    writer = PageWriter(RetryingStore(store, 10.0, Metrics()), 60, max_pages=64, async_commit=True)
    runner = asyncio.create_task(writer.run())
    first, second = USERS[:2]
    try:
        await writer.write(page_of(claims[first], item(first, SHARED)))
        admin = await asyncpg.connect(db_url)
        try:
            # The server went away (every session of the pool ends, as in a crash or a
            # failover), and with it the asynchronous commit of that page: its rows are
            # deleted here, standing in for what the crash lost.
            await admin.execute(
                """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                   WHERE datname = current_database() AND pid <> pg_backend_pid()"""
            )
            await admin.execute("DELETE FROM memberships; DELETE FROM conversations")
        finally:
            await admin.close()
        # Same version as the first page's: remembered, it would be left out, and the
        # membership would point at no conversation row (no foreign key says so: migration 004).
        outcome = await asyncio.wait_for(
            writer.write(page_of(claims[second], item(second, SHARED))), 20
        )
    finally:
        runner.cancel()
    assert outcome.inserted == 1
    assert await scalar(db_url, "SELECT friendly_name FROM conversations") == "shared"


@pytest.fixture(scope="module")
def durable_server() -> Iterator[LocalPostgres]:
    """A server of our own that syncs its WAL to disk (the tests' shared one may not)."""
    with LocalPostgres(fast=False) as server:
        server.start()
        yield server


async def test_batches_commit_without_waiting_for_their_flush_unless_told_to(
    durable_server: LocalPostgres,
) -> None:
    name = f"convsync_test_{secrets.token_hex(4)}"
    url = await create_database(durable_server.url, name)
    try:
        await apply_migrations(url)
        store = await Store.connect(url, 2)
        try:
            claim = (await claim_everyone(store))[USERS[0]]
            per_mode = 12
            syncs: dict[bool, int] = {}
            async with store.pool.acquire() as conn:
                written = 0
                for async_commit in (True, False):
                    before = await wal_syncs(conn)
                    for _ in range(per_mode):
                        write = dataclasses.replace(
                            page_of(claim, item(USERS[0], f"CH{written:032x}")),
                            pages_written=written,
                            next_page_path="/next",
                        )
                        outcomes = await store.save_pages(
                            [write], 60, conn=conn, async_commit=async_commit
                        )
                        assert outcomes[0] is not None
                        written += 1
                    syncs[async_commit] = await wal_syncs(conn) - before
        finally:
            await store.close()
    finally:
        await drop_database(durable_server.url, name)
    # Waiting for the flush is a WAL sync per commit; without it, the WAL writer's own few.
    assert syncs[False] >= per_mode
    assert syncs[True] <= per_mode // 3


async def wal_syncs(conn: asyncpg.Connection) -> int:
    """The server's WAL syncs so far, this session's own counted in."""
    await conn.execute("SELECT pg_stat_force_next_flush()")  # flushed once the session idles
    if conn.get_server_version().major >= 18:  # moved to pg_stat_io
        query = "SELECT coalesce(sum(fsyncs), 0) FROM pg_stat_io WHERE object = 'wal'"
    else:
        query = "SELECT wal_sync FROM pg_stat_wal"
    return int(await conn.fetchval(query))


async def test_the_version_cache_is_bounded_and_forgets_the_oldest_first(
    store: Store, db_url: str
) -> None:
    claims = await claim_everyone(store)
    # Room for 4 versions: two generations of 2; the older is dropped when the newer fills.
    writer = PageWriter(
        RetryingStore(store, 0.0, Metrics()), 60, max_pages=64, known_conversations=4
    )
    runner = asyncio.create_task(writer.run())
    conversations = [f"CH{i:032x}" for i in range(1, 5)]
    try:
        for user, conversation in zip(USERS, conversations, strict=False):
            await writer.write(page_of(claims[user], item(user, conversation)))
        await store.pool.execute("UPDATE conversations SET friendly_name = 'kept'")
        oldest, newest = conversations[0], conversations[-1]
        await writer.write(page_of(claims[USERS[4]], item(USERS[4], oldest)))
        await writer.write(page_of(claims[USERS[5]], item(USERS[5], newest)))
    finally:
        runner.cancel()
    rows = await store.pool.fetch("SELECT conversation_sid, friendly_name FROM conversations")
    names = dict(rows)
    assert names[oldest] == "own"  # forgotten: written again
    assert names[newest] == "kept"  # remembered: left out of the statement


async def test_a_batch_lost_with_the_database_fails_its_pages_and_the_writer_goes_on(
    store: Store, db_url: str
) -> None:
    claims = await claim_everyone(store)
    writer = writer_for(store)  # waits 0 s for the database: one failure is final
    runner = asyncio.create_task(writer.run())
    try:
        first = page_of(claims[USERS[0]], item(USERS[0], "CH" + "d" * 32))
        # The database drops the writer's session mid-statement (a restart, a failover):
        # the statement waits on a lock, and its backend is terminated meanwhile.
        admin = await asyncpg.connect(db_url)
        try:
            await admin.execute("BEGIN; LOCK TABLE sync_cursors IN ACCESS EXCLUSIVE MODE")
            writing = asyncio.ensure_future(writer.write(first))

            async def waiting_backends() -> list[int]:
                rows = await admin.fetch(
                    """SELECT pid FROM pg_stat_activity
                       WHERE datname = current_database() AND wait_event_type = 'Lock'"""
                )
                return [r["pid"] for r in rows]

            blocked = await until(waiting_backends, timeout=10, what="the write to block")
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid", blocked
            )
            with pytest.raises(DatabaseUnavailable):
                await writing
            # The lost batch held the writer while it waited: that time counts as busy.
            assert (writer.batches, writer.pages) == (0, 0)
            assert writer.busy_seconds > 0
        finally:
            await admin.close()
        # The writer survived the lost batch: the same page, written again, commits.
        outcome = await asyncio.wait_for(writer.write(first), 10)
    finally:
        runner.cancel()
    assert outcome.inserted == 1
    assert not runner.done() or runner.cancelled()


@pytest.fixture
async def pinning_store(db_url: str) -> AsyncIterator[Store]:
    """A pool big enough for its writer to keep its connection."""
    store = await Store.connect(db_url, PIN_FROM_POOL_SIZE)
    yield store
    await store.close()


async def test_a_writer_keeps_its_connection_while_batches_follow_and_gives_it_back_idle(
    pinning_store: Store, db_url: str
) -> None:
    store = pinning_store
    claims = await claim_everyone(store)
    writer = PageWriter(RetryingStore(store, 0.0, Metrics()), 60, max_pages=64, idle_seconds=0.5)
    pool = store.pool

    def in_use() -> int:
        return int(pool.get_size() - pool.get_idle_size())

    async def page_statement_backends() -> int:
        return int(
            await scalar(
                db_url,
                """SELECT count(DISTINCT pid) FROM pg_stat_activity
                   WHERE datname = current_database() AND pid <> pg_backend_pid()
                     AND query LIKE '%WITH page AS%'""",
            )
        )

    runner = asyncio.create_task(writer.run())
    try:
        for user in USERS[:3]:
            await writer.write(page_of(claims[user], item(user, "CH" + user[2:])))
            assert in_use() == 1  # kept for the next batch, not handed back after each one
        assert await page_statement_backends() == 1  # every batch on that one session

        async def given_back() -> bool:
            return in_use() == 0

        await until(given_back, timeout=10, what="the idle writer to give its connection back")
        await writer.write(page_of(claims[USERS[3]], item(USERS[3], "CH" + USERS[3][2:])))
        assert in_use() == 1
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    assert in_use() == 0  # a stopped writer holds nothing: the pool closes at once
    assert await scalar(db_url, "SELECT count(*) FROM memberships") == 4


async def test_in_a_small_pool_a_writer_lends_its_connection_back_after_each_batch(
    db_url: str,
) -> None:
    # Two connections: one kept by a writer would leave claims and leases waiting for it.
    store = await Store.connect(db_url, 2)
    try:
        claims = await claim_everyone(store)
        writer = writer_for(store)
        runner = asyncio.create_task(writer.run())
        try:
            for user in USERS[:2]:
                await writer.write(page_of(claims[user], item(user, "CH" + user[2:])))
                assert store.pool.get_size() == store.pool.get_idle_size()  # none held
        finally:
            runner.cancel()
    finally:
        await store.close()
    assert await scalar(db_url, "SELECT count(*) FROM memberships") == 2


async def test_a_long_listing_keeps_its_seen_sids_compressed_with_lz4(
    store: Store, db_url: str
) -> None:
    lz4 = "SELECT 'lz4' = ANY (enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
    if not await scalar(db_url, lz4):
        pytest.skip("this PostgreSQL was built without lz4")
    claims = await claim_everyone(store)
    user = USERS[0]
    items = [item(user, f"CH{i:032x}") for i in range(1, 101)]  # 3.5 kB of SIDs: compressed
    first_page = dataclasses.replace(page_of(claims[user], *items), next_page_path="/page?2")
    [outcome] = await store.save_pages([first_page], 60)
    assert outcome is not None
    assert outcome.inserted == 100
    stored = (
        "SELECT pg_column_compression(seen_conversations) FROM sync_cursors WHERE user_sid = $1"
    )
    assert await scalar(db_url, stored, user) == "lz4"


def _scans_of(plan: dict[str, Any], relation: str) -> list[tuple[str, str | None]]:
    """(node type, index) of every node of an EXPLAIN (FORMAT JSON) plan reading ``relation``."""
    found = []
    if plan.get("Relation Name") == relation and "Scan" in plan["Node Type"]:
        found.append((plan["Node Type"], plan.get("Index Name")))
    for child in plan.get("Plans", []):
        found += _scans_of(child, relation)
    return found


@pytest.mark.parametrize("pending", [12, 100, 1000])
async def test_the_page_statement_reads_each_cursor_by_primary_key_in_any_cached_plan(
    store: Store, db_url: str, pending: int
) -> None:
    # asyncpg's statements get a generic plan after five runs, made from the table's size at
    # the time; with about 100 cursors listed and no statistics yet, PostgreSQL 15 read each
    # page's cursor out of the partial index of the pass's pending cursors, a cost that grew
    # with every user discovered (20,000 rows read a page at 40,000 users).
    info = await store.begin_or_resume_pass({"services": None, "users": None})
    assert info is not None
    await store.pool.execute("INSERT INTO services (chat_service_sid) VALUES ($1)", SERVICE)
    users = [f"US{i:032x}" for i in range(1, pending + 1)]
    await store.enqueue_users(info.run_id, SERVICE, users)
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute(f"PREPARE page_write (jsonb, text, float8, bool) AS {_PAGES_SQL}")
        plan = await conn.fetchval("EXPLAIN (FORMAT JSON) EXECUTE page_write ('[]', '', 60, true)")
    finally:
        await conn.close()
    scans = _scans_of(json.loads(plan)[0]["Plan"], "sync_cursors")
    assert scans  # the guard's lookup and the cursor's update
    assert all(index == "sync_cursors_pkey" for _, index in scans), scans


async def test_a_relists_page_writes_its_rows_but_not_into_its_pass_s_figures(
    store: Store, db_url: str
) -> None:
    # A webhook's re-list of a user the running pass listed (its cursor filed under the pass):
    # its rows are written, the pass's pages and row counts stay the pass's own work.
    claims = await claim_everyone(store)
    user = USERS[0]
    own = "CH" + "1" * 32
    (listed,) = await store.save_pages([page_of(claims[user], item(user, own))], 60)
    assert listed is not None
    relist = dataclasses.replace(claims[user], token="host:1:aa~relist/0123abcd.ef")
    await store.pool.execute(
        "UPDATE sync_cursors SET claimed_by = $2, state = 'pending' WHERE user_sid = $1",
        user,
        relist.token,
    )
    changed = item(user, own, unread_messages_count=7, date_updated="2024-02-03T04:05:06Z")
    write = dataclasses.replace(page_of(relist, changed), counts=False)
    (relisted,) = await store.save_pages([write], 60)
    assert relisted is not None
    assert relisted.updated == 1
    assert await scalar(db_url, "SELECT unread_messages_count FROM memberships") == 7
    (figures,) = await fetch(
        db_url,
        "SELECT run_pages, run_rows_inserted, run_rows_updated, state FROM sync_cursors"
        " WHERE user_sid = $1",
        user,
    )
    assert tuple(figures) == (1, 1, 0, "done"), "the pass's figures: its own page alone"
