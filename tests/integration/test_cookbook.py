"""Every ``cookbook/*.sql`` query, run as the read-only role ``convsync_reader`` against the real
schema after real passes over the simulator, checked against the simulator's data and against
known upstream changes; and the schema explains itself (a COMMENT on every table and column).

Expected values are computed here from the simulator's dataset (the independent side), never
from the database under test.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from convsync_tools.cookbook import load_cookbook, parse_cookbook_file, run_cookbook_query
from convsync_tools.simdata import Dataset, twilio_date
from convsync_tools.simulator import Simulator, SimulatorServer
from tests.harness import run_pass, settings_for

COOKBOOK = {q.name: q for q in load_cookbook()}
# Each name here has a test below that checks its results; a new file must join this list.
CHECKED = {
    "busiest_conversations",
    "closed_this_week",
    "failed_users",
    "inactive_conversations",
    "membership_changes_since",
    "recent_passes",
    "services",
    "unread_per_user",
    "user_conversations",
}
READER = "convsync_reader"


@pytest.fixture
def server() -> Iterator[SimulatorServer]:
    data = Dataset.generate(seed=7, services=2, users_per_service=30)
    with SimulatorServer(Simulator(data)) as s:
        yield s


async def ask(db_url: str, name: str, **values: object) -> list[dict[str, Any]]:
    """Run cookbook query ``name`` as convsync_reader, in a read-only transaction."""
    conn = await asyncpg.connect(db_url)
    try:
        async with conn.transaction(readonly=True):
            await conn.execute(f"SET LOCAL ROLE {READER}")
            assert await conn.fetchval("SELECT current_user") == READER
            rows = await run_cookbook_query(conn, COOKBOOK[name], values)
    finally:
        await conn.close()
    return [dict(r) for r in rows]


async def db_value(db_url: str, sql: str) -> Any:
    conn = await asyncpg.connect(db_url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def memberships(server: SimulatorServer) -> list[dict[str, Any]]:
    return list(server.sim.dataset.expected_memberships(server.url))


def member_of(server: SimulatorServer, service: str, at_least: int) -> str:
    """The first user of ``service`` with at least ``at_least`` memberships."""
    data = server.sim.dataset
    return next(u for u in data.user_sids(service) if data.membership_count(service, u) >= at_least)


def identities(server: SimulatorServer) -> dict[tuple[str, str], str]:
    return {
        (u["chat_service_sid"], u["sid"]): u["identity"]
        for u in server.sim.dataset.expected_users(server.url)
    }


def when(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def pick(rows: list[dict[str, Any]], *columns: str) -> list[tuple[Any, ...]]:
    return [tuple(r[c] for c in columns) for r in rows]


# --- the files themselves ----------------------------------------------------------------------


def test_every_cookbook_file_is_checked_and_documented() -> None:
    assert set(COOKBOOK) == CHECKED, "a cookbook file without a test here, or a test without one"
    for query in COOKBOOK.values():
        assert query.title, query.name
        assert len(query.answers) > 40, query.name
        assert query.sql.rstrip().endswith(";"), query.name


def test_a_malformed_header_is_rejected(tmp_path: Any) -> None:
    path = tmp_path / "bad.sql"
    path.write_text("-- title: t\n-- answers: a\n-- params: $2 x = 1\nSELECT $2::int;\n")
    with pytest.raises(ValueError, match=r"\$1\.\.\$n"):
        parse_cookbook_file(path)
    path.write_text("-- title: t\nSELECT 1;\n")
    with pytest.raises(ValueError, match="answers, params"):
        parse_cookbook_file(path)


async def test_every_query_runs_with_its_example_params_as_the_reader(
    server: SimulatorServer, db_url: str
) -> None:
    await run_pass(settings_for(server, db_url))
    for name, query in COOKBOOK.items():
        rows = await ask(db_url, name)
        assert isinstance(rows, list), name
        assert len(query.params) == len({p.name for p in query.params}), name


async def test_the_reader_cannot_write(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL ROLE {READER}")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("DELETE FROM memberships")
    finally:
        await conn.close()


# --- each query against the simulator ----------------------------------------------------------


def expected_unread(server: SimulatorServer, min_unread: int) -> list[tuple[Any, ...]]:
    names = identities(server)
    totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for m in memberships(server):
        t = totals[(m["chat_service_sid"], m["user_sid"])]
        unread = m["unread_messages_count"]
        t[0] += unread or 0
        t[1] += 1 if unread else 0
        t[2] += (unread or 0) if m["notification_level"] == "muted" else 0
        t[3] += 1 if m["last_read_message_index"] is None else 0
    rows = [(s, u, names[(s, u)], *t) for (s, u), t in totals.items() if t[0] >= min_unread]
    return sorted(rows, key=lambda r: (-r[3], r[0], r[1]))


UNREAD_COLUMNS = ("chat_service_sid", "user_sid", "identity", "unread_messages",
                  "conversations_with_unread", "muted_unread", "never_read")  # fmt: skip


async def test_unread_per_user(server: SimulatorServer, db_url: str) -> None:
    settings = settings_for(server, db_url)
    await run_pass(settings)
    assert pick(await ask(db_url, "unread_per_user"), *UNREAD_COLUMNS) == expected_unread(server, 1)

    data = server.sim.dataset
    service = data.service_sids()[1]
    user = next(u for u in data.user_sids(service) if data.membership_count(service, u) >= 3)
    conversations = data.memberships(service, user)
    before = sum(c["unread_messages_count"] or 0 for c in conversations)
    data.set_unread(service, user, conversations[0]["conversation_sid"], 0, 10)
    data.set_unread(service, user, conversations[1]["conversation_sid"], 5000, 7)
    await run_pass(settings)

    rows = await ask(db_url, "unread_per_user")
    assert pick(rows, *UNREAD_COLUMNS) == expected_unread(server, 1)
    top = rows[0]
    assert (top["chat_service_sid"], top["user_sid"]) == (service, user)
    expected_total = (
        before
        - (conversations[0]["unread_messages_count"] or 0)
        - (conversations[1]["unread_messages_count"] or 0)
        + 5000
    )
    assert top["unread_messages"] == expected_total
    # the threshold parameter filters
    high = await ask(db_url, "unread_per_user", min_unread=5000)
    assert pick(high, "user_sid", "unread_messages") == [(user, expected_total)]


def expected_busiest(server: SimulatorServer, top: int) -> list[tuple[Any, ...]]:
    groups: dict[tuple[str, str], list[Any]] = {}
    for m in memberships(server):
        g = groups.setdefault((m["chat_service_sid"], m["conversation_sid"]), [0, 0, 0])
        g[0] += 1
        g[1] += m["unread_messages_count"] or 0
        g[2] += 1 if m["notification_level"] == "muted" else 0
    rows = sorted(groups.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return [(s, c, *g) for (s, c), g in rows[:top]]


BUSIEST_COLUMNS = ("chat_service_sid", "conversation_sid", "members", "unread_messages",
                   "muted_by")  # fmt: skip


async def test_busiest_conversations(server: SimulatorServer, db_url: str) -> None:
    settings = settings_for(server, db_url)
    await run_pass(settings)
    rows = await ask(db_url, "busiest_conversations", top=10)
    assert pick(rows, *BUSIEST_COLUMNS) == expected_busiest(server, 10)

    # a quiet conversation gains 20 members and tops the list
    data = server.sim.dataset
    service = data.service_sids()[0]
    quiet = data.memberships(service, member_of(server, service, 1))[0]["conversation_sid"]
    members = {m["user_sid"] for m in memberships(server) if m["conversation_sid"] == quiet}
    assert len(members) < rows[0]["members"]
    joiners = [u for u in data.user_sids(service) if u not in members][:20]
    assert len(joiners) == 20
    for user in joiners:
        data.add_membership(service, user, quiet, unread_messages_count=3)
    await run_pass(settings)

    rows = await ask(db_url, "busiest_conversations", top=3)
    assert pick(rows, *BUSIEST_COLUMNS) == expected_busiest(server, 3)
    assert rows[0]["conversation_sid"] == quiet
    assert rows[0]["members"] == len(members) + 20
    assert len(await ask(db_url, "busiest_conversations", top=1)) == 1


async def test_inactive_conversations(server: SimulatorServer, db_url: str) -> None:
    settings = settings_for(server, db_url)
    await run_pass(settings)
    days = 30
    cutoff = datetime.now(UTC) - timedelta(days=days)
    conversations: dict[tuple[str, str], dict[str, Any]] = {}
    members: dict[tuple[str, str], int] = defaultdict(int)
    for m in memberships(server):
        key = (m["chat_service_sid"], m["conversation_sid"])
        conversations[key] = m
        members[key] += 1
    expected = sorted(
        (
            (
                when(c["date_updated"]),
                s,
                sid,
                members[(s, sid)],
                when(c["timers"].get("date_inactive")),
            )
            for (s, sid), c in conversations.items()
            if c["conversation_state"] != "closed"
            and datetime.fromisoformat(c["date_updated"]) < cutoff
        ),
        key=lambda r: (r[0], r[1], r[2]),
    )
    rows = await ask(db_url, "inactive_conversations", days=days)
    assert pick(rows, "idle_since", "chat_service_sid", "conversation_sid", "members",
                "date_inactive") == expected  # fmt: skip
    assert 0 < len(rows) < len(conversations), "the dataset must have closed conversations too"
    for row in rows[:20]:
        age = (datetime.now(UTC) - row["idle_since"]).total_seconds() / 86400
        assert row["days_idle"] == int(age) or abs(row["days_idle"] - age) < 0.01

    # an update makes a conversation active again; closing one removes it too
    data = server.sim.dataset
    touched, closed = rows[0], rows[1]
    data.update_conversation(touched["chat_service_sid"], touched["conversation_sid"],
                             friendly_name="back to life")  # fmt: skip
    data.update_conversation(closed["chat_service_sid"], closed["conversation_sid"],
                             conversation_state="closed",
                             date_updated=twilio_date(int(time.time()) - 90 * 86400))  # fmt: skip
    await run_pass(settings)
    after = await ask(db_url, "inactive_conversations", days=days)
    gone = {(r["chat_service_sid"], r["conversation_sid"]) for r in (touched, closed)}
    assert pick(after, "chat_service_sid", "conversation_sid") == [
        k for k in pick(rows, "chat_service_sid", "conversation_sid") if k not in gone
    ]
    # a horizon before the dataset's first update: nothing is that old
    assert await ask(db_url, "inactive_conversations", days=365 * 30) == []


async def test_closed_this_week(server: SimulatorServer, db_url: str) -> None:
    settings = settings_for(server, db_url)
    await run_pass(settings)
    assert await ask(db_url, "closed_this_week") == [], "the dataset closes nothing this recent"

    week_start: datetime = await db_value(db_url, "SELECT date_trunc('week', now())")
    now = int(time.time())
    data = server.sim.dataset
    service = data.service_sids()[0]
    convs = [
        c["conversation_sid"] for c in data.memberships(service, member_of(server, service, 4))
    ]
    timers = {
        convs[0]: now - 60,  # closed a minute ago: listed
        convs[1]: int(week_start.timestamp()),  # at the week's first second: listed
        convs[2]: int(week_start.timestamp()) - 3600,  # last week: not listed
        convs[3]: now + 2 * 86400,  # closes later: not listed yet
    }
    for sid, closes in timers.items():
        data.update_conversation(service, sid, conversation_state="closed",
                                 timers={"date_closed": twilio_date(closes)})  # fmt: skip
    await run_pass(settings)

    rows = await ask(db_url, "closed_this_week")
    assert pick(rows, "conversation_sid", "date_closed", "conversation_state") == [
        (convs[0], datetime.fromtimestamp(timers[convs[0]], UTC), "closed"),
        (convs[1], datetime.fromtimestamp(timers[convs[1]], UTC), "closed"),
    ]
    assert all(r["members"] >= 1 for r in rows)


async def test_membership_changes_since(server: SimulatorServer, db_url: str) -> None:
    settings = settings_for(server, db_url)
    start: datetime = await db_value(db_url, "SELECT now()")
    await run_pass(settings)
    first = memberships(server)
    rows = await ask(db_url, "membership_changes_since", since=start)
    assert {r["event"] for r in rows} == {"joined"}
    assert sorted(pick(rows, "chat_service_sid", "user_sid", "conversation_sid")) == sorted(
        (m["chat_service_sid"], m["user_sid"], m["conversation_sid"]) for m in first
    )

    after_first: datetime = await db_value(db_url, "SELECT now()")
    data = server.sim.dataset
    service = data.service_sids()[1]
    users = [u for u in data.user_sids(service) if data.membership_count(service, u) >= 1]
    leaver, joiner, founder = users[0], users[1], users[2]
    left = data.memberships(service, leaver)[0]
    data.remove_membership(service, leaver, left["conversation_sid"])
    theirs = {m["conversation_sid"] for m in data.memberships(service, joiner)}
    joined = next(
        m for m in data.memberships(service, founder) if m["conversation_sid"] not in theirs
    )
    data.add_membership(service, joiner, joined["conversation_sid"])
    new_conversation = data.add_membership(service, founder)
    await run_pass(settings)

    names = identities(server)
    rows = await ask(db_url, "membership_changes_since", since=after_first)
    assert sorted(pick(rows, "event", "user_sid", "identity", "conversation_sid")) == sorted(
        [
            ("left", leaver, names[(service, leaver)], left["conversation_sid"]),
            ("joined", joiner, names[(service, joiner)], joined["conversation_sid"]),
            ("joined", founder, names[(service, founder)], new_conversation),
        ]
    )
    assert [r["at"] for r in rows] == sorted((r["at"] for r in rows), reverse=True)
    assert all(r["at"] >= after_first for r in rows)
    by_conversation = {r["conversation_sid"]: r["friendly_name"] for r in rows}
    assert by_conversation[left["conversation_sid"]] == left["friendly_name"]
    # since the start: every first-pass membership joined, plus the two joins, one leave
    everything = await ask(db_url, "membership_changes_since", since=start)
    events = [r["event"] for r in everything]
    assert (events.count("joined"), events.count("left")) == (len(first) + 2, 1)


async def test_failed_users(server: SimulatorServer, db_url: str) -> None:
    settings = settings_for(server, db_url)
    await run_pass(settings)
    assert await ask(db_url, "failed_users") == []

    data = server.sim.dataset
    service = data.service_sids()[0]
    victim = data.user_sids(service)[4]
    server.sim.fail_next(f"{victim}/Conversations", 500, count=20)
    data.delete_user(service, data.user_sids(service)[5])  # gone is not failed
    failed_pass = await run_pass(settings)
    assert (failed_pass.status, failed_pass.users_failed, failed_pass.users_gone) == (
        "partial",
        1,
        1,
    )

    rows = await ask(db_url, "failed_users")
    assert pick(rows, "chat_service_sid", "user_sid", "identity", "run_id") == [
        (service, victim, identities(server)[(service, victim)], failed_pass.run_id)
    ]
    assert "500" in rows[0]["last_error"]
    assert rows[0]["last_error_at"] is not None
    assert rows[0]["attempts"] >= 1

    server.sim.clear_faults()
    recovered = await run_pass(settings)
    assert recovered.status == "succeeded"
    assert await ask(db_url, "failed_users") == [], "a user that synced again leaves the list"


async def test_recent_passes(server: SimulatorServer, db_url: str) -> None:
    settings = settings_for(server, db_url)
    summaries = [await run_pass(settings) for _ in range(3)]
    rows = await ask(db_url, "recent_passes", passes=2)
    columns = ("run_id", "status", "users_synced", "pages", "rows_inserted", "rows_updated",
               "rows_removed")  # fmt: skip
    expected = [
        (s.run_id, s.status, s.users_synced, s.pages, s.rows_inserted, s.rows_updated,
         s.rows_removed)
        for s in reversed(summaries[1:])
    ]  # fmt: skip
    assert pick(rows, *columns) == expected
    assert all(r["finished_at"] >= r["started_at"] and r["seconds"] >= 0 for r in rows)
    assert len(await ask(db_url, "recent_passes")) == 3


async def test_user_conversations(server: SimulatorServer, db_url: str) -> None:
    await run_pass(settings_for(server, db_url))
    data = server.sim.dataset
    service = data.service_sids()[1]
    heavy = max(data.user_sids(service), key=lambda u: data.membership_count(service, u))
    items = data.memberships(service, heavy, server.url)
    assert len(items) > 100, "a user over two pages"
    expected = sorted(
        (
            (
                datetime.fromisoformat(m["date_updated"]),
                m["conversation_sid"],
                m["unread_messages_count"],
            )
            for m in items
        ),
        key=lambda r: (-r[0].timestamp(), r[1]),
    )
    identity = identities(server)[(service, heavy)]
    for key in (identity, heavy):
        rows = await ask(db_url, "user_conversations", user=key)
        assert pick(rows, "date_updated", "conversation_sid", "unread_messages_count") == expected
    assert await ask(db_url, "user_conversations", user="nobody@example.invalid") == []


async def test_services(server: SimulatorServer, db_url: str) -> None:
    settings = settings_for(server, db_url)
    await run_pass(settings)
    data = server.sim.dataset
    gone_service = data.service_sids()[0]
    data.delete_user(gone_service, data.user_sids(gone_service)[0])
    await run_pass(settings)

    per_service: dict[str, dict[str, Any]] = {}
    for m in memberships(server):
        entry = per_service.setdefault(m["chat_service_sid"], {"conversations": set(), "n": 0})
        entry["conversations"].add(m["conversation_sid"])
        entry["n"] += 1
    rows = await ask(db_url, "services")
    expected = [
        (s["sid"], s["account_sid"], s["friendly_name"], len(data.user_sids(s["sid"])),
         per_service[s["sid"]]["n"])
        for s in data.services(server.url)
    ]  # fmt: skip
    assert sorted(pick(rows, "chat_service_sid", "account_sid", "friendly_name", "users",
                       "memberships")) == sorted(expected)  # fmt: skip
    assert rows[0]["users"] + rows[1]["users"] == 59
    for row in rows:
        # conversations ever seen: at least those with members now
        assert row["conversations"] >= len(per_service[row["chat_service_sid"]]["conversations"])


# --- the schema explains itself ----------------------------------------------------------------

UNDOCUMENTED = """
SELECT c.relname, NULL AS attname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
WHERE c.relkind::text = ANY($1::text[]) AND c.relname <> 'schema_migrations'
  AND obj_description(c.oid, 'pg_class') IS NULL
UNION ALL
SELECT c.relname, a.attname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relkind::text = ANY($1::text[]) AND c.relname <> 'schema_migrations'
  AND col_description(c.oid, a.attnum) IS NULL
ORDER BY 1, 2
"""


async def undocumented(db_url: str, kinds: list[str]) -> list[tuple[str, str | None]]:
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch(UNDOCUMENTED, kinds)
        relations = await conn.fetchval(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind::text = ANY($1::text[])",
            kinds,
        )
    finally:
        await conn.close()
    assert relations > 0, "the check must see the schema"
    return [(r["relname"], r["attname"]) for r in rows]


async def test_every_table_and_column_has_a_comment(db_url: str) -> None:
    # schema_migrations is the migrator's own bookkeeping (worker/migrate.py), not data
    assert await undocumented(db_url, ["r"]) == []


async def test_every_view_column_has_a_comment(db_url: str) -> None:
    assert await undocumented(db_url, ["v"]) == []
