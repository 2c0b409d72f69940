"""Pages that break the schema: every good row of a page is kept, what cannot be stored is
quarantined (raw item, reason, source path), the pass goes on, nothing wrong is stored and
nothing still listed is marked removed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from convsync_tools.simdata import Dataset
from convsync_tools.simulator import Simulator, SimulatorServer
from tests.faults.common import check_cursors, mirror, record
from tests.harness import expected_row, fetch, run_pass, scalar, settings_for, view_rows

PAGE = 20
Mutation = Callable[[dict[str, Any]], Any]


@pytest.fixture
def server() -> Iterator[SimulatorServer]:
    data = Dataset.generate(
        seed=21, services=1, users_per_service=30, max_conversations_per_user=120
    )
    with SimulatorServer(Simulator(data)) as s:
        yield s


def a_user(server: SimulatorServer, min_items: int, skip: int = 0) -> str:
    data = server.sim.dataset
    service = data.service_sids()[0]
    found = [u for u in data.user_sids(service) if data.membership_count(service, u) >= min_items]
    return found[skip]


def first_page(user: str) -> str:
    return f"Users/{user}/Conversations?PageSize={PAGE}"


def items_mutation(
    changes: dict[int, Mutation], extra: list[Any] | None = None, key: str = "conversations"
) -> Mutation:
    """A page mutation applying ``changes[i]`` to item ``i`` and appending ``extra`` items."""

    def mutate(body: dict[str, Any]) -> dict[str, Any]:
        items = body[key]
        for index, change in changes.items():
            items[index] = change(items[index])
        items.extend(extra or [])
        return body

    return mutate


def setting(name: str, value: Any) -> Mutation:
    def change(item: dict[str, Any]) -> dict[str, Any]:
        item[name] = value
        return item

    return change


def dropping(name: str) -> Mutation:
    def change(item: dict[str, Any]) -> dict[str, Any]:
        del item[name]
        return item

    return change


async def quarantined(db_url: str) -> list[dict[str, Any]]:
    rows = await fetch(
        db_url,
        "SELECT run_id, chat_service_sid, user_sid, source_path, item, reason FROM quarantine "
        "ORDER BY quarantine_id",
    )
    return [dict(r) for r in rows]


async def current_sids(db_url: str, user: str) -> set[str]:
    rows = await fetch(
        db_url,
        "SELECT conversation_sid FROM memberships WHERE user_sid = $1 AND removed_at IS NULL",
        user,
    )
    return {r["conversation_sid"] for r in rows}


# Membership-level corruptions with a readable conversation_sid: (field, bad value, reason).
READABLE = [
    ("unread_messages_count", "7", "unread_messages_count must be an integer"),
    ("conversation_state", "archived", "conversation_state has an unknown value"),
    ("attributes", "{not json", "attributes is not valid JSON"),
    ("notification_level", 5, "notification_level must be a string"),
    ("date_updated", "yesterday", "date_updated is not an ISO 8601 date-time"),
    ("last_read_message_index", 3.0, "last_read_message_index must be an integer"),
    ("unread_messages_count", 2**70, "unread_messages_count is out of the 64-bit range"),
    ("friendly_name", "bad \ud800 surrogate", "friendly_name is not valid Unicode"),
    ("friendly_name", "nul \x00 byte", "friendly_name contains a NUL character"),
    ("links", "not-an-object", "links must be an object"),
    ("links", {"conversation": float("nan")}, "links holds NaN"),
    ("attributes", '{"score": NaN}', "attributes is not valid JSON"),
    ("attributes", '{"name": "\\ud800"}', "attributes is not valid Unicode"),
    ("date_created", "0001-01-01T00:00:00+01:00", "date_created is out of range"),
    ("date_updated", "9999-12-31T23:59:59-01:00", "date_updated is out of range"),
]


async def test_bad_items_are_quarantined_good_rows_kept_nothing_listed_removed(
    server: SimulatorServer, db_url: str
) -> None:
    settings = settings_for(server, db_url, CONVSYNC_PAGE_SIZE=str(PAGE))
    await run_pass(settings)
    await mirror(server, db_url)
    data = server.sim.dataset
    service = data.service_sids()[0]
    user = a_user(server, min_items=PAGE + 8)
    before = data.memberships(service, user, server.url)
    assert len(READABLE) < PAGE
    bad = {i: setting(field, value) for i, (field, value, _) in enumerate(READABLE)}
    # Upstream meanwhile: a good row of the same page changes, a later row is removed.
    late = before[PAGE + 3]["conversation_sid"]
    data.remove_membership(service, user, late)
    changed = before[len(READABLE)]["conversation_sid"]
    data.set_unread(service, user, changed, 4242, 17)
    server.sim.corrupt_next(
        first_page(user),
        items_mutation({**bad, PAGE - 1: setting("future_field", {"new": ["api", "field"]})}),
    )

    summary = await run_pass(settings)
    assert summary.status == "succeeded"
    assert summary.rows_quarantined == len(READABLE)
    assert summary.rows_removed == 1
    rows = await quarantined(db_url)
    assert len(rows) == len(READABLE)
    for row, (item, (field, value, reason)) in zip(
        rows, zip(before, READABLE, strict=False), strict=True
    ):
        assert row["run_id"] == summary.run_id
        assert (row["chat_service_sid"], row["user_sid"]) == (service, user)
        assert (
            row["source_path"]
            == f"/v1/Services/{service}/Users/{user}/Conversations?PageSize={PAGE}"
        )
        assert reason in row["reason"], (row["reason"], reason)
        raw = json.loads(row["item"])
        assert raw["conversation_sid"] == item["conversation_sid"]
        assert json.dumps(raw[field]) == json.dumps(value), "the raw item, as served"
    # Quarantined items with a readable SID are still members: not marked removed, old values.
    stored = set(await view_rows(db_url))
    for item in before[: len(READABLE)]:
        assert expected_row(item) in stored, f"{item['conversation_sid']} lost or overwritten"
    assert late not in await current_sids(db_url, user)
    # The good rows of the same page are stored, new values included; extra fields accepted.
    now = data.memberships(service, user, server.url)
    for item in now[len(READABLE) : PAGE]:
        assert expected_row(item) in stored
    record(bad_items_quarantined=len(rows), corrupt_pages=1)

    clean = await run_pass(settings)
    assert clean.rows_quarantined == 0
    await mirror(server, db_url)


async def test_items_without_a_readable_sid_are_quarantined_and_remove_nothing(
    server: SimulatorServer, db_url: str
) -> None:
    """An item whose conversation cannot be identified might be any membership: the listing
    keeps its good rows but proves nothing gone; the next clean listing removes."""
    settings = settings_for(server, db_url, CONVSYNC_PAGE_SIZE=str(PAGE))
    await run_pass(settings)
    data = server.sim.dataset
    service = data.service_sids()[0]
    user = a_user(server, min_items=PAGE + 8)
    before = data.memberships(service, user, server.url)
    late = before[PAGE + 2]["conversation_sid"]
    data.remove_membership(service, user, late)
    unreadable: dict[int, Mutation] = {
        0: dropping("conversation_sid"),
        1: setting("conversation_sid", "CH-not-a-sid"),
        2: setting("conversation_sid", 12345),
        3: lambda item: "not an object",
        4: lambda item: None,
        5: lambda item: [item],
        6: lambda item: {},
    }
    # (replaced, not appended: a page of more items than its PageSize is malformed)
    server.sim.corrupt_next(first_page(user), items_mutation(unreadable))

    summary = await run_pass(settings)
    assert summary.status == "succeeded"
    assert summary.rows_quarantined == len(unreadable)
    assert summary.rows_removed == 0, "a listing with unidentified items must not remove"
    rows = await quarantined(db_url)
    reasons = [r["reason"] for r in rows]
    assert reasons[0] == "conversation_sid is missing"
    assert reasons[1] == reasons[2].replace("must be a string, got int", "is not a valid CH SID")
    assert "item must be an object, got str" in reasons
    assert "item must be an object, got NoneType" in reasons
    assert "item must be an object, got list" in reasons
    assert json.loads(rows[3]["item"]) == "not an object"
    assert late in await current_sids(db_url, user), "removed on an incomplete proof"
    stored = set(await view_rows(db_url))
    for item in before[len(unreadable) : PAGE]:
        assert expected_row(item) in stored
    await check_cursors(db_url, quarantined_ok=True)
    record(bad_items_quarantined=len(rows), corrupt_pages=1)

    clean = await run_pass(settings)
    assert clean.rows_removed == 1
    await mirror(server, db_url)


BAD_PAGES: list[tuple[str, Mutation | bytes, str]] = [
    ("body is a list", lambda body: [body], "body is JSON but not an object"),
    (
        "items not a list",
        lambda body: {**body, "conversations": {"a": 1}},
        "no 'conversations' list",
    ),
    ("no meta", lambda body: {"conversations": body["conversations"]}, "no 'meta' object"),
    (
        "next_page_url not a string",
        lambda body: {**body, "meta": {**body["meta"], "next_page_url": 7}},
        "non-string next_page_url",
    ),
    (
        "next_page_url elsewhere",
        lambda body: {**body, "meta": {**body["meta"], "next_page_url": "https://evil.example/x"}},
        "outside the configured API",
    ),
]


async def test_malformed_pages_fail_their_user_only_and_keep_its_cursor(
    server: SimulatorServer, db_url: str
) -> None:
    settings = settings_for(server, db_url, CONVSYNC_PAGE_SIZE=str(PAGE), CONVSYNC_MAX_ATTEMPTS="2")
    await run_pass(settings)
    data = server.sim.dataset
    service = data.service_sids()[0]
    victims = [a_user(server, min_items=2 * PAGE + 1, skip=i) for i in range(len(BAD_PAGES) + 1)]
    for victim in victims:  # removals upstream that the failed listings must not apply yet
        data.remove_membership(
            service, victim, data.memberships(service, victim)[-1]["conversation_sid"]
        )
    for victim, (_, mutate, _) in zip(victims, BAD_PAGES, strict=False):
        assert callable(mutate)
        server.sim.corrupt_next(f"Users/{victim}/Conversations?PageSize={PAGE}&Page=1&", mutate)
    # The last victim's second page is not JSON at all: retried (it may be a cut body), then
    # the user fails.
    garbage = victims[-1]
    server.sim.corrupt_next(
        f"Users/{garbage}/Conversations?PageSize={PAGE}&Page=1&", lambda body: b"<html>oops", 10
    )

    summary = await run_pass(settings)
    server.sim.clear_faults()
    assert summary.status == "partial"
    assert summary.users_failed == len(victims)
    assert summary.users_synced == 30 - len(victims)
    failed = {
        r["user_sid"]: r
        for r in await fetch(
            db_url,
            "SELECT user_sid, listing_pages, last_error FROM sync_cursors WHERE state = 'failed'",
        )
    }
    assert set(failed) == set(victims)
    for victim, (name, _, reason) in zip(victims, BAD_PAGES, strict=False):
        assert reason in failed[victim]["last_error"], (name, failed[victim]["last_error"])
        assert failed[victim]["listing_pages"] == 1, "the cursor stays after page 1"
    assert "not valid JSON" in failed[garbage]["last_error"]
    assert summary.rows_removed == 0
    await check_cursors(db_url, server, PAGE)
    record(corrupt_pages=len(BAD_PAGES) + 2, users_failed_cleanly=len(victims))

    again = await run_pass(settings)
    assert again.status == "succeeded"
    assert again.rows_removed == len(victims)
    await mirror(server, db_url)


async def test_dates_with_milliseconds_and_offsets_are_stored_exactly(
    server: SimulatorServer, db_url: str
) -> None:
    data = server.sim.dataset
    service = data.service_sids()[0]
    user = a_user(server, min_items=3)
    conversations = [i["conversation_sid"] for i in data.memberships(service, user)[:3]]
    stamps = [
        ("2030-03-01T12:34:56.789Z", {"date_inactive": "2030-03-02T00:00:00.5+05:30"}),
        ("2030-03-01T12:34:56.123456+02:00", {"date_closed": "2030-03-01T23:59:59.999-08:00"}),
        ("2030-03-01T12:34:56.1Z", {}),
    ]
    for sid, (updated, timers) in zip(conversations, stamps, strict=True):
        data.update_conversation(service, sid, date_updated=updated, timers=timers)
    # unexpected extra fields are accepted and ignored
    server.sim.corrupt_next(
        first_page(user),
        items_mutation({0: setting("brand_new_field", {"nested": [1, 2]}), 1: setting("x", None)}),
    )
    settings = settings_for(server, db_url, CONVSYNC_PAGE_SIZE=str(PAGE))
    summary = await run_pass(settings)
    assert summary.rows_quarantined == 0
    rows = await fetch(
        db_url,
        "SELECT conversation_sid, date_updated, date_inactive, date_closed FROM conversations "
        "WHERE conversation_sid = ANY($1::text[]) ORDER BY conversation_sid",
        conversations,
    )
    by_sid = {r["conversation_sid"]: r for r in rows}
    for sid, (updated, timers) in zip(conversations, stamps, strict=True):
        row = by_sid[sid]
        assert row["date_updated"] == datetime.fromisoformat(updated)
        for field in ("date_inactive", "date_closed"):
            want = timers.get(field)
            assert row[field] == (datetime.fromisoformat(want) if want else None)
    first = by_sid[conversations[0]]["date_updated"]
    assert first.astimezone(UTC) == datetime(2030, 3, 1, 12, 34, 56, 789000, tzinfo=UTC)
    second = by_sid[conversations[1]]["date_updated"]
    assert second == datetime(2030, 3, 1, 10, 34, 56, 123456, tzinfo=UTC)
    assert by_sid[conversations[0]]["date_inactive"] == datetime(
        2030, 3, 2, 0, 0, 0, 500000, tzinfo=timezone(timedelta(hours=5, minutes=30))
    )
    await mirror(server, db_url)
    record(corrupt_pages=1)


async def test_a_bad_user_item_is_quarantined_and_its_user_not_marked_gone(
    server: SimulatorServer, db_url: str
) -> None:
    settings = settings_for(server, db_url, CONVSYNC_PAGE_SIZE=str(PAGE))
    await run_pass(settings)
    data = server.sim.dataset
    service = data.service_sids()[0]
    users = data.user_sids(service)
    readable = next(u for u in users[:PAGE] if data.membership_count(service, u) > 0)
    index = users.index(readable)
    changed = data.memberships(service, readable)[0]["conversation_sid"]
    data.set_unread(service, readable, changed, 777)
    server.sim.corrupt_next(
        f"/Users?PageSize={PAGE}",
        items_mutation({index: setting("is_online", "yes")}, key="users"),
    )
    summary = await run_pass(settings)
    assert summary.rows_quarantined == 1
    assert summary.users_gone == 0, "a user listed with a bad field still exists"
    rows = await quarantined(db_url)
    assert rows[0]["user_sid"] is None
    assert "is_online must be a boolean" in rows[0]["reason"]
    assert json.loads(rows[0]["item"])["sid"] == readable
    gone = await scalar(db_url, "SELECT removed_at FROM users WHERE user_sid = $1", readable)
    assert gone is None
    # its memberships are still synced this pass (its own record is what was bad)
    await mirror(server, db_url)
    record(bad_items_quarantined=1)


async def test_a_user_listed_twice_in_a_page_is_stored_once_and_discovery_goes_on(
    server: SimulatorServer, db_url: str
) -> None:
    settings = settings_for(server, db_url, CONVSYNC_PAGE_SIZE=str(PAGE))
    data = server.sim.dataset
    users = data.user_sids(data.service_sids()[0])

    def twice(body: dict[str, Any]) -> dict[str, Any]:
        body["users"].append({**body["users"][0], "friendly_name": "listed again"})
        return body

    # The second (last) page holds 10 users of 30: one more stays within its PageSize.
    server.sim.corrupt_next(f"/Users?PageSize={PAGE}&Page=1", twice)
    summary = await run_pass(settings)
    assert server.sim.stats().faults["corrupt"] == 1
    assert summary.status == "succeeded", "one user listed twice costs nothing of the pass"
    assert summary.users_synced == len(users)
    name = await scalar(db_url, "SELECT friendly_name FROM users WHERE user_sid = $1", users[PAGE])
    assert name == "listed again", "the last occurrence is kept"
    await mirror(server, db_url)


async def test_a_user_item_without_a_readable_sid_marks_nobody_gone(
    server: SimulatorServer, db_url: str
) -> None:
    settings = settings_for(server, db_url, CONVSYNC_PAGE_SIZE=str(PAGE))
    await run_pass(settings)
    data = server.sim.dataset
    service = data.service_sids()[0]
    server.sim.corrupt_next(
        f"/Users?PageSize={PAGE}", items_mutation({2: dropping("sid")}, key="users")
    )
    summary = await run_pass(settings)
    assert summary.rows_quarantined == 1
    assert summary.users_gone == 0
    assert summary.status == "partial", "a user could not be identified: the pass is partial"
    assert await scalar(db_url, "SELECT count(*) FROM users WHERE removed_at IS NOT NULL") == 0
    removed = await scalar(db_url, "SELECT count(*) FROM memberships WHERE removed_at IS NOT NULL")
    assert removed == 0
    assert len(data.user_sids(service)) == 30
    record(bad_items_quarantined=1, corrupt_pages=1)
    clean = await run_pass(settings)
    assert clean.status == "succeeded"
    await mirror(server, db_url)


async def test_a_value_the_database_refuses_fails_that_user_not_the_pass(
    server: SimulatorServer, db_url: str
) -> None:
    """Defence in depth: a value the model accepts but PostgreSQL refuses (here a constraint
    the model does not know) fails one user; the pass goes on."""
    data = server.sim.dataset
    service = data.service_sids()[0]
    victim = a_user(server, min_items=2)
    conn_sql = (
        "ALTER TABLE memberships ADD CONSTRAINT fault_unread_cap "
        "CHECK (unread_messages_count < 1000000)"
    )
    await scalar(db_url, conn_sql)
    data.set_unread(
        service, victim, data.memberships(service, victim)[0]["conversation_sid"], 10**9
    )
    summary = await run_pass(settings_for(server, db_url, CONVSYNC_PAGE_SIZE=str(PAGE)))
    assert summary.status == "partial"
    assert summary.users_failed == 1
    assert summary.users_synced == 29
    error = await scalar(db_url, "SELECT last_error FROM sync_cursors WHERE user_sid = $1", victim)
    assert "fault_unread_cap" in error
    record(users_failed_cleanly=1)


async def test_a_users_page_the_database_refuses_ends_discovery_marking_nobody_gone(
    server: SimulatorServer, db_url: str
) -> None:
    settings = settings_for(server, db_url, CONVSYNC_PAGE_SIZE=str(PAGE))
    await run_pass(settings)
    data = server.sim.dataset
    service = data.service_sids()[0]
    data.delete_user(service, data.user_sids(service)[0])  # would be marked gone at the end
    await scalar(
        db_url,
        "ALTER TABLE users ADD CONSTRAINT fault_name CHECK (friendly_name <> 'Refused Name')",
    )
    data.add_user(service, friendly_name="Refused Name")  # on the last users page
    summary = await run_pass(settings)
    assert summary.status == "partial"
    assert summary.users_gone == 0, "an unfinished users listing proves nobody gone"
    error = await scalar(
        db_url, "SELECT error FROM sync_discovery WHERE run_id = $1", summary.run_id
    )
    assert "fault_name" in error
    assert summary.users_synced >= PAGE, "the users of the stored pages were synced"
    record(users_failed_cleanly=1)


async def test_a_page_whose_next_page_is_itself_fails_its_user_instead_of_looping(
    server: SimulatorServer, db_url: str
) -> None:
    settings = settings_for(server, db_url, CONVSYNC_PAGE_SIZE=str(PAGE))
    victim = a_user(server, min_items=2 * PAGE + 1)
    second = f"Users/{victim}/Conversations?PageSize={PAGE}&Page=1&"

    def loop(body: dict[str, Any]) -> dict[str, Any]:
        body["meta"]["next_page_url"] = body["meta"]["url"]
        return body

    server.sim.corrupt_next(second, loop, count=10_000)
    summary = await asyncio.wait_for(run_pass(settings), 60)
    server.sim.clear_faults()
    assert summary.users_failed == 1
    assert summary.users_synced == 29
    error = await scalar(db_url, "SELECT last_error FROM sync_cursors WHERE user_sid = $1", victim)
    assert "the listing repeats a page it already served" in error
    assert server.sim.stats().faults["corrupt"] <= 3, "the loop was not followed"
    record(corrupt_pages=server.sim.stats().faults["corrupt"], users_failed_cleanly=1)
    again = await run_pass(settings)
    assert again.status == "succeeded"
    await mirror(server, db_url)


async def test_a_bad_service_item_is_quarantined_and_its_service_still_synced(
    db_url: str,
) -> None:
    data = Dataset.generate(seed=21, services=2, users_per_service=5)
    with SimulatorServer(Simulator(data)) as server:
        settings = settings_for(server, db_url)
        await run_pass(settings)
        server.sim.corrupt_next(
            "/v1/Services?PageSize",
            items_mutation({1: setting("date_created", "x")}, key="services"),
        )
        summary = await run_pass(settings)
        assert summary.rows_quarantined == 1
        assert summary.users_synced == 10, "the service's users are synced all the same"
