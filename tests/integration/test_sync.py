"""The core promise, against real PostgreSQL and the simulator over a real socket: a pass
mirrors the API field by field, a second pass rewrites (or locks) nothing, removals are
detected only after complete listings, and an interrupted pass resumes where it stopped."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from typing import TypeVar, cast

import aiohttp
import pytest
from aiohttp import web

from convsync_tools.simdata import Dataset
from convsync_tools.simulator import Simulator, SimulatorServer
from tests.harness import (
    assert_mirrors,
    diff,
    expected_row,
    fetch,
    free_port,
    heavy_user,
    run_pass,
    scalar,
    settings_for,
    until,
    view_rows,
)
from worker.config import pid_namespace
from worker.errors import PassBusy
from worker.listing import Listing
from worker.migrate import apply_migrations
from worker.model import UserRow
from worker.shutdown import Shutdown
from worker.store import PassProgress, PassSummary, Store
from worker.sync import ConversationsListing, Scope, SyncPass

T = TypeVar("T")


@pytest.fixture
def server() -> Iterator[SimulatorServer]:
    with SimulatorServer(
        Simulator(Dataset.generate(seed=11, services=2, users_per_service=60))
    ) as s:
        yield s


async def test_a_pass_mirrors_the_api_and_a_second_pass_rewrites_nothing(
    server: SimulatorServer, db_url: str
) -> None:
    settings = settings_for(server, db_url)
    first = await run_pass(settings)
    rows = await assert_mirrors(server, db_url)
    assert first.status == "succeeded"
    assert first.rows_inserted == rows > 1000
    assert first.users_synced == 120

    # xmax too: an upsert that finds nothing to change still locks the row, and a lock is a
    # write (and WAL) on every row of every pass.
    physical = "SELECT xmin::text, xmax::text, ctid::text FROM {} ORDER BY 1, 3"
    before = {t: await fetch(db_url, physical.format(t)) for t in ("memberships", "conversations")}
    second = await run_pass(settings)
    assert (second.rows_inserted, second.rows_updated, second.rows_removed) == (0, 0, 0)
    assert second.rows_unchanged == rows
    after = {t: await fetch(db_url, physical.format(t)) for t in ("memberships", "conversations")}
    assert before == after, "unchanged rows must be neither rewritten nor locked"
    await assert_mirrors(server, db_url)


async def test_the_users_table_mirrors_the_users_listing_field_by_field(
    server: SimulatorServer, db_url: str
) -> None:
    await run_pass(settings_for(server, db_url))
    stored = {r["user_sid"]: r for r in await fetch(db_url, "SELECT * FROM users")}
    listed = list(server.sim.dataset.expected_users(server.url))
    assert len(stored) == len(listed) == 120
    for user in listed:
        row = stored[user["sid"]]
        assert {
            **{k: row[k] for k in ("chat_service_sid", "account_sid", "role_sid", "identity")},
            **{k: row[k] for k in ("friendly_name", "is_online", "is_notifiable", "url")},
            "attributes": json.loads(row["attributes"]),
            "links": json.loads(row["links"]),
            "date_created": row["date_created"],
            "date_updated": row["date_updated"],
        } == {
            **{k: v for k, v in user.items() if k not in ("sid", "attributes")},
            "attributes": json.loads(user["attributes"]),
            "date_created": datetime.fromisoformat(user["date_created"]),
            "date_updated": datetime.fromisoformat(user["date_updated"]),
        }, user["sid"]


async def test_typed_columns_and_keys(server: SimulatorServer, db_url: str) -> None:
    await run_pass(settings_for(server, db_url))
    types = dict(
        (r["column_name"], r["data_type"])
        for r in await fetch(
            db_url,
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'user_conversations_v'",
        )
    )
    assert types["attributes"] == types["links"] == "jsonb"
    for column in ("date_created", "date_updated", "date_inactive", "date_closed"):
        assert types[column] == "timestamp with time zone"
    assert types["unread_messages_count"] == "bigint"
    # nested attributes are queryable as JSON
    nested = await fetch(
        db_url, "SELECT count(*) AS n FROM conversations WHERE jsonb_typeof(attributes) = 'object'"
    )
    assert nested[0]["n"] > 0


async def test_upstream_changes_and_removals_are_applied(
    server: SimulatorServer, db_url: str
) -> None:
    settings = settings_for(server, db_url)
    await run_pass(settings)
    data = server.sim.dataset
    service = data.service_sids()[0]
    users = [u for u in data.user_sids(service) if data.membership_count(service, u) >= 2]
    left = data.memberships(service, users[0])[0]["conversation_sid"]
    data.remove_membership(service, users[0], left)
    gone_user = users[1]
    gone_count = data.membership_count(service, gone_user)
    data.delete_user(service, gone_user)
    changed = data.memberships(service, users[2])[0]["conversation_sid"]
    data.update_conversation(
        service, changed, friendly_name="renamed ✨", conversation_state="closed"
    )
    data.set_unread(
        service, users[3], data.memberships(service, users[3])[0]["conversation_sid"], 42
    )

    summary = await run_pass(settings)
    await assert_mirrors(server, db_url)
    assert summary.rows_removed == 1 + gone_count
    assert summary.users_gone == 1
    assert summary.rows_updated >= 1
    removed = await fetch(
        db_url,
        "SELECT user_sid, conversation_sid FROM memberships WHERE removed_at IS NOT NULL",
    )
    assert (users[0], left) in {(r["user_sid"], r["conversation_sid"]) for r in removed}
    assert {r["user_sid"] for r in removed} == {users[0], gone_user}
    user_row = await fetch(db_url, "SELECT removed_at FROM users WHERE user_sid = $1", gone_user)
    assert user_row[0]["removed_at"] is not None
    # rejoining clears removed_at, and keeps first_seen_at history
    data.add_membership(service, users[0], left)
    await run_pass(settings)
    await assert_mirrors(server, db_url)
    again = await fetch(
        db_url,
        "SELECT removed_at FROM memberships WHERE user_sid = $1 AND conversation_sid = $2",
        users[0],
        left,
    )
    assert again[0]["removed_at"] is None


async def test_an_interrupted_listing_removes_nothing_until_it_completes(
    server: SimulatorServer, db_url: str
) -> None:
    settings = settings_for(server, db_url, CONVSYNC_MAX_ATTEMPTS="2")
    data = server.sim.dataset
    service = data.service_sids()[0]
    user = heavy_user(server, service)
    await run_pass(settings, Scope(services=(service,), users=(user,)))
    items = data.memberships(service, user)
    early, late = items[0]["conversation_sid"], items[-1]["conversation_sid"]
    data.remove_membership(service, user, early)
    data.remove_membership(service, user, late)

    # Page 2 of this user keeps failing: the listing stops after page 1.
    server.sim.fail_next(f"{user}/Conversations?PageSize=50&Page=1&PageToken", 500, count=10)
    failed = await run_pass(settings, Scope(services=(service,), users=(user,)))
    server.sim.clear_faults()
    assert failed.status == "partial"
    assert failed.users_failed == 1
    removed = await fetch(
        db_url, "SELECT count(*) AS n FROM memberships WHERE removed_at IS NOT NULL"
    )
    assert removed[0]["n"] == 0, "an incomplete listing must not mark anything removed"
    cursor = await fetch(
        db_url, "SELECT listing_pages, last_error FROM sync_cursors WHERE user_sid = $1", user
    )
    assert cursor[0]["listing_pages"] == 1
    assert "500" in cursor[0]["last_error"]

    # The next pass continues the same listing from page 2 and then removes exactly both.
    server.sim.reset_stats()
    done = await run_pass(settings, Scope(services=(service,), users=(user,)))
    assert done.status == "succeeded"
    assert done.rows_removed == 2
    first_page = f"/v1/Services/{service}/Users/{user}/Conversations"
    assert server.sim.stats().pages[(first_page, None)] == 0, "page 1 is not fetched again"
    await assert_mirrors_user(server, db_url, service, user)


async def test_a_rejected_page_token_restarts_the_listing_without_false_removals(
    server: SimulatorServer, db_url: str
) -> None:
    settings = settings_for(server, db_url, CONVSYNC_MAX_ATTEMPTS="2")
    data = server.sim.dataset
    service = data.service_sids()[0]
    user = heavy_user(server, service)
    server.sim.fail_next(f"{user}/Conversations?PageSize=50&Page=1&PageToken", 503, count=10)
    await run_pass(settings, Scope(services=(service,), users=(user,)))
    server.sim.clear_faults()
    # The saved token expires; a membership on page 1 is removed meanwhile.
    server.sim.configure(token_ttl=60)
    server.sim.advance_clock(3600)
    gone = data.memberships(service, user)[0]["conversation_sid"]
    data.remove_membership(service, user, gone)

    summary = await run_pass(settings, Scope(services=(service,), users=(user,)))
    assert summary.status == "succeeded"
    assert summary.rows_removed == 1
    await assert_mirrors_user(server, db_url, service, user)


async def assert_mirrors_user(
    server: SimulatorServer, db_url: str, service: str, user: str
) -> None:
    current = await fetch(
        db_url,
        "SELECT conversation_sid FROM memberships WHERE chat_service_sid = $1 AND user_sid = $2 "
        "AND removed_at IS NULL",
        service,
        user,
    )
    expected = {i["conversation_sid"] for i in server.sim.dataset.memberships(service, user)}
    assert {r["conversation_sid"] for r in current} == expected


async def test_a_user_deleted_mid_pass_is_gone_and_the_rest_commit(
    server: SimulatorServer, db_url: str
) -> None:
    settings = settings_for(server, db_url)
    data = server.sim.dataset
    service = data.service_sids()[1]
    victim = heavy_user(server, service)
    server.sim.fail_next(f"{victim}/Conversations?PageSize=50&Page=1&PageToken", 404, count=1)
    summary = await run_pass(settings)
    assert summary.users_gone == 1
    assert summary.users_failed == 0
    assert summary.users_synced == 119


async def test_users_attributes_of_json_null_are_kept_apart_from_none(db_url: str) -> None:
    service = "IS" + "1" * 32
    users = [UserRow(service, f"US{i:032x}", *([None] * 11)) for i in range(3)]
    users[1] = dataclasses.replace(users[1], attributes="null", links="null")
    users[2] = dataclasses.replace(users[2], attributes='{"a": [1, "\\u00e9"]}')
    await apply_migrations(db_url)
    store = await Store.connect(db_url, 1)
    try:
        await store.ensure_services([service])
        await store.upsert_users(users)
    finally:
        await store.close()
    rows = await fetch(
        db_url,
        "SELECT attributes IS NULL AS none, jsonb_typeof(attributes) AS kind,"
        " links IS NULL AS no_links, attributes -> 'a' ->> 1 AS accented"
        " FROM users ORDER BY user_sid",
    )
    assert [tuple(r) for r in rows] == [
        (True, None, True, None),
        (False, "null", False, None),
        (False, "object", True, "é"),
    ]


async def test_a_pass_ends_with_its_last_listing_not_at_an_idle_poll(db_url: str) -> None:
    """A service of two users: the users listing can close after both users were claimed,
    even after both finished. Neither the feeder nor the idle discovery loop may then sleep
    out a poll (here ten minutes) before the pass sees it has ended."""
    dataset = Dataset.generate(seed=5, services=1, users_per_service=2)
    with SimulatorServer(Simulator(dataset)) as server:
        settings = settings_for(server, db_url)
        for _ in range(3):  # each pass into a fresh race; passes after the first resume nothing
            summary = await asyncio.wait_for(run_pass(settings, idle_poll_seconds=600), 120)
            assert (summary.status, summary.users_synced) == ("succeeded", 2)


async def test_a_stop_while_the_feeder_waits_for_users_held_elsewhere_ends_the_pass(
    db_url: str,
) -> None:
    """Every pending user is held by another replica (forced: this worker's user claims find
    none), so the feeder waits for work with its poll at ten minutes and its user loops wait
    for it. A stop must end the pass at once, not after the poll (nor after the grace, ten
    minutes too, which would cancel the loops)."""
    looked = asyncio.Event()  # the feeder found the pass unfinished after discovery

    class HeldElsewhere(SyncPass):
        async def claim(self, operation: Callable[..., Awaitable[T]]) -> T:
            if isinstance(operation, functools.partial):  # the feeder's user claims
                return cast(T, [])
            return await super().claim(operation)

        async def finished(self) -> bool:
            ended = await super().finished()
            progress = await self.db.call(self.store.pass_progress, self.state.run_id)
            if not ended and not progress.discovery_open:
                looked.set()
            return ended

    dataset = Dataset.generate(seed=5, services=1, users_per_service=2)
    shutdown = Shutdown(600)
    with SimulatorServer(Simulator(dataset)) as server:
        settings = settings_for(server, db_url)
        task = asyncio.ensure_future(
            run_pass(settings, kind=HeldElsewhere, idle_poll_seconds=600, shutdown=shutdown)
        )
        await asyncio.wait_for(looked.wait(), 60)
        shutdown.stop.set()
        summary = await asyncio.wait_for(task, 30)
    assert (summary.status, summary.users_synced) == ("interrupted", 0)


async def three_users_mirrored(db_url: str, kind: type[SyncPass]) -> PassSummary:
    """A pass of ``kind`` over three users, its mirror checked; its summary."""
    dataset = Dataset.generate(seed=5, services=1, users_per_service=3)
    with SimulatorServer(Simulator(dataset)) as server:
        summary = await asyncio.wait_for(run_pass(settings_for(server, db_url), kind=kind), 120)
        await assert_mirrors(server, db_url)
    return summary


async def test_a_worker_between_claims_goes_on_with_a_pass_another_one_left_interrupted(
    db_url: str,
) -> None:
    """Another replica holds every pending user (forced: this worker's user claims find none
    until then), stops, gives them back and, finding no claim live (this worker is between
    claims), records the pass interrupted. This worker is still on it: it resumes the pass and
    lists the users, rather than stop with it and leave them to the next tick."""
    other = "host:9:9"
    handed_back = False

    class Between(SyncPass):
        async def claim(self, operation: Callable[..., Awaitable[T]]) -> T:
            if isinstance(operation, functools.partial) and not handed_back:
                return cast(T, [])  # the users are the other replica's
            return await super().claim(operation)

        async def finished(self) -> bool:
            nonlocal handed_back
            progress = await self.db.call(self.store.pass_progress, self.state.run_id)
            if not handed_back and not progress.discovery_open and progress.users_pending:
                run_id = self.state.run_id
                held = await self.store.claim_users(run_id, other, 60, limit=100)
                assert held, "the other replica holds the pending users"
                assert await self.store.interrupt_pass(run_id, other), "it left it interrupted"
                handed_back = True
            return await super().finished()

    summary = await three_users_mirrored(db_url, Between)
    assert handed_back
    assert (summary.status, summary.users_synced) == ("succeeded", 3)


async def test_a_worker_starting_its_pass_keeps_it_from_other_scopes_and_replicas(
    db_url: str,
) -> None:
    """Until it holds a claim (while it lists the services, then until its first users listing
    is claimed) this worker has nothing live on its pass. Meanwhile a pass of another scope
    finds the pass busy (it does not supersede it), and another replica that stops leaves it
    running; this worker then finishes it."""
    checked: list[str] = []

    async def check(worker: SyncPass, when: str) -> None:
        with pytest.raises(PassBusy):
            await worker.store.begin_or_resume_pass({"services": ["IS" + "0" * 32], "users": None})
        assert not await worker.store.interrupt_pass(worker.state.run_id, "host:9:9"), when
        checked.append(when)

    class Starting(SyncPass):
        async def discover_services(self) -> list[str]:
            services = await super().discover_services()
            await check(self, "listing the services")
            return services

        async def run_loops(self) -> None:
            await check(self, "before its first claim")
            await super().run_loops()

    summary = await three_users_mirrored(db_url, Starting)
    assert checked == ["listing the services", "before its first claim"]
    assert (summary.status, summary.users_synced) == ("succeeded", 3)


async def test_a_pass_a_dead_process_of_this_host_was_starting_does_not_hold_a_restart(
    db_url: str,
) -> None:
    """A process killed while it started a pass leaves its start leased. Restarted on the same
    host with another scope, the worker frees it at once (the process is provably dead), as it
    frees such a process's claims, rather than find the pass busy for a whole lease."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # its pid: a process of this host, dead
    dead = f"{socket.gethostname()}:{pid_namespace()}:{ended.pid}:ab"
    store = await Store.connect(db_url, 2)
    try:
        first = await store.begin_or_resume_pass(
            {"services": None, "users": None}, starter=f"{dead}/1", lease_seconds=600
        )
        assert first is not None
    finally:
        await store.close()
    dataset = Dataset.generate(seed=5, services=1, users_per_service=3)
    with SimulatorServer(Simulator(dataset)) as server:
        scope = Scope(services=tuple(dataset.service_sids()))
        summary = await asyncio.wait_for(run_pass(settings_for(server, db_url), scope), 120)
        await assert_mirrors(server, db_url)
    assert (summary.status, summary.users_synced) == ("succeeded", 3)
    status = "SELECT status FROM sync_runs WHERE run_id = $1"
    assert await scalar(db_url, status, first.run_id) == "failed", "superseded"


async def test_a_services_listing_that_outlasts_a_lease_keeps_its_pass_busy(db_url: str) -> None:
    """The start's lease is renewed while the services are listed (retried through an outage,
    that can take minutes): once its first lease is over, the pass is still busy."""
    checked = False

    class Slow(SyncPass):
        async def discover_services(self) -> list[str]:
            nonlocal checked
            services = await super().discover_services()
            run_id = self.state.run_id
            lease = "SELECT lease_until FROM sync_pass_starts WHERE run_id = $1"
            first = await scalar(db_url, lease, run_id)
            over = "SELECT now() > $1::timestamptz"
            await until(lambda: scalar(db_url, over, first), what="the first lease to be over")
            assert await scalar(db_url, lease, run_id) > first, "renewed"
            with pytest.raises(PassBusy):
                await self.store.begin_or_resume_pass({"services": services, "users": None})
            checked = True
            return services

    dataset = Dataset.generate(seed=5, services=1, users_per_service=3)
    with SimulatorServer(Simulator(dataset)) as server:
        # (Renewed every third of a lease: the check below has two thirds of one to spare.)
        settings = settings_for(server, db_url, CONVSYNC_LEASE_SECONDS="3")
        summary = await asyncio.wait_for(run_pass(settings, kind=Slow), 120)
        await assert_mirrors(server, db_url)
    assert checked
    assert (summary.status, summary.users_synced) == ("succeeded", 3)


async def test_a_worker_that_did_the_last_user_records_a_pass_another_left_interrupted(
    db_url: str,
) -> None:
    """Another replica stops once every user is listed (by this worker), finds no claim live
    and records the pass interrupted: this worker, still on it, records it finished, rather than
    end with it interrupted (exit 1) for the next tick to finish with nothing to do."""
    other = "host:9:9"
    stopped_by_the_other = False

    class Last(SyncPass):
        async def progress(self) -> PassProgress:
            # The other replica stops on the very look that first finds every user listed; this
            # worker then looks again. (Hooked on its own look, in ``finished``, the last user
            # could commit between that look and the pass's: the pass ended with the other never
            # stopping, once in about 40 runs.)
            nonlocal stopped_by_the_other
            progress = await super().progress()
            idle = not progress.discovery_open and not progress.users_pending
            if not stopped_by_the_other and idle:
                assert await self.store.interrupt_pass(self.state.run_id, other)
                stopped_by_the_other = True
                progress = await super().progress()
            return progress

    summary = await three_users_mirrored(db_url, Last)
    assert stopped_by_the_other
    assert (summary.status, summary.users_synced) == ("succeeded", 3)


async def test_a_pass_interrupted_by_another_after_its_last_user_is_still_recorded_finished(
    db_url: str,
) -> None:
    """Another replica stops just after this worker found every user listed and before it
    records the pass: finding no claim live, it records the pass interrupted. This worker,
    whose pass is complete, records it finished all the same, rather than end with it
    interrupted (exit 1) for the next tick to finish with nothing to do."""
    other = "host:9:9"
    stopped_by_the_other = False

    class Late(SyncPass):
        async def finished(self) -> bool:
            nonlocal stopped_by_the_other
            done = await super().finished()
            if done and not stopped_by_the_other:
                assert await self.store.interrupt_pass(self.state.run_id, other)
                stopped_by_the_other = True
            return done

    summary = await three_users_mirrored(db_url, Late)
    assert stopped_by_the_other
    assert (summary.status, summary.users_synced) == ("succeeded", 3)


async def test_a_last_user_finishing_while_the_feeder_looks_still_ends_the_pass(
    db_url: str,
) -> None:
    """The feeder's look at the pass (a query) can find a user pending that finishes before
    the answer is acted on. Forced here: the users wait to be listed until the feeder looks
    with every user claimed, and that look's answer is held until every user has finished.
    The finished users' wake-ups must outlive the stale answer, or the feeder sleeps out its
    poll (ten minutes). (A look is held only once both users are claimed: held before, it
    would wait for users that only the feeder itself can hand out.)"""
    looked = asyncio.Event()  # the feeder looked with every user claimed
    everyone = asyncio.Event()  # both users listed
    counts = {"claimed": 0, "synced": 0, "held": 0}

    class StaleLook(SyncPass):
        async def claim(self, operation: Callable[..., Awaitable[T]]) -> T:
            claims = await super().claim(operation)
            if isinstance(claims, list):
                counts["claimed"] += len(claims)
            return claims

        async def walk(self, listing: Listing) -> None:
            if isinstance(listing, ConversationsListing):
                await looked.wait()
            await super().walk(listing)
            if isinstance(listing, ConversationsListing) and listing.outcome == "done":
                counts["synced"] += 1
                if counts["synced"] == 2:
                    everyone.set()

        async def finished(self) -> bool:
            ended = await super().finished()
            if not ended and counts["claimed"] == 2 and not looked.is_set():
                counts["held"] += 1
                looked.set()
                await everyone.wait()
            return ended

    dataset = Dataset.generate(seed=5, services=1, users_per_service=2)
    with SimulatorServer(Simulator(dataset)) as server:
        settings = settings_for(server, db_url)
        summary = await asyncio.wait_for(
            run_pass(settings, kind=StaleLook, idle_poll_seconds=600), 60
        )
    assert (summary.status, summary.users_synced) == ("succeeded", 2)
    assert counts["held"] == 1, "the feeder looked while both users were pending"


async def test_a_base_url_with_a_path_prefix_follows_next_page_urls_below_it(
    server: SimulatorServer, db_url: str
) -> None:
    # An egress proxy serving the API under /twilio, its URLs rewritten to its own: listings
    # of several pages follow next_page_urls below the prefix, never above it.
    upstream = server.url
    proxied = f"http://127.0.0.1:{free_port()}/twilio"
    async with aiohttp.ClientSession() as http:

        async def forward(request: web.Request) -> web.Response:
            path = request.path_qs.removeprefix("/twilio")
            headers = {"Authorization": request.headers.get("Authorization", "")}
            async with http.get(upstream + path, headers=headers) as answer:
                body = (await answer.read()).replace(upstream.encode(), proxied.encode())
                return web.Response(
                    status=answer.status, body=body, content_type="application/json"
                )

        app = web.Application()
        app.router.add_get("/twilio/{tail:.*}", forward)
        runner = web.AppRunner(app)
        await runner.setup()
        port = int(proxied.split(":")[2].split("/")[0])
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            settings = settings_for(server, db_url, TWILIO_CONVERSATIONS_BASE_URL=proxied)
            summary = await run_pass(settings)
        finally:
            await runner.cleanup()
    assert summary.status == "succeeded"
    assert summary.pages > summary.users_synced, "some listings have several pages"
    expected = [expected_row(i) for i in server.sim.dataset.expected_memberships(proxied)]
    assert diff(expected, await view_rows(db_url)) == ""
