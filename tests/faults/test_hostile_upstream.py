"""A hostile upstream, for real: `convsync sync` as a child process against an aiohttp server on
127.0.0.1 (tests/faults/hostile.py) that loops its paging, leaves its listing, never ends a
listing or a body, offers 200 MB pages, compression bombs, 10,000 items for PageSize=50, a 20 MB
field and SIDs ending in a newline, answers an error whose message holds a NUL and a lone
surrogate or whose body nests 100,000 arrays, links to a next page whose port is not a number,
or echoes the credentials in a 401; and `convsync run`'s HTTP port given 300 half-sent requests.

Every case shows: the pass ends by itself within a bound, with the documented exit code and no
traceback in any output; peak RSS (the child's ru_maxrss) stays under 200 MB, also while a 1 GB
body is offered; every row of every good user is stored and no row is wrong; the bad items are
quarantined or the one bad listing failed, with its reason.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from convsync_tools.pgembed import quote_ident
from convsync_tools.simdata import Dataset
from tests.conftest import PgServer, drop_database
from tests.faults.common import Measured, record, run_measured
from tests.faults.hostile import Hostile, HostileServer, Trick
from tests.harness import REPO, VIEW_COLUMNS, _base_env, expected_row, fetch, scalar, view_rows
from worker.migrate import apply_migrations

PAGE = 50
RSS_LIMIT_MB = 200
WITHIN = 60.0  # seconds a pass may take, whatever the upstream does
AUTH_TOKEN = "hostile-auth-token"
TOKEN_PART = AUTH_TOKEN[:9]  # no part of it may show anywhere either
USER = VIEW_COLUMNS.index("user_sid")


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    # 60 users: a users listing of two pages of 50; one user over 100 conversations.
    return Dataset.generate(seed=91, services=1, users_per_service=60)


@dataclass
class World:
    """The dataset's names the cases aim at."""

    service: str
    users: list[str]
    heavy: str  # more than two pages of conversations
    victim: str  # one page or more
    neighbour: str

    @classmethod
    def of(cls, data: Dataset) -> World:
        service = data.service_sids()[0]
        users = data.user_sids(service)
        heavy = next(u for u in users if data.membership_count(service, u) > 2 * PAGE)
        some = [u for u in users if u != heavy and data.membership_count(service, u) >= 3]
        return cls(service, users, heavy, some[0], some[1])

    def conversations(self, user: str) -> str:
        return Hostile.conversations_path(self.service, user)


@dataclass
class Case:
    """One hostile behaviour: where it is set, what the pass must end with."""

    name: str
    where: Callable[[World], dict[str, Trick]]
    exit_code: int
    # the user whose listing failed, or a users listing that failed, with its error; or the
    # reason an item was quarantined
    failed: Callable[[World], str] | None = None
    listing_failed: bool = False
    pass_failed: bool = False  # the services listing failed: the pass ended with ``error``
    error: str = ""
    quarantined: str = ""
    bad_users: Callable[[World], list[str]] = lambda w: []
    env: dict[str, str] = field(default_factory=dict)
    requests_at_most: int | None = None  # to the tricked path: no retries, no loop followed


def token_at_the_cut(w: World) -> str:
    """The neighbour's listing path, padded so that the auth token starts at character 189."""
    path = w.conversations(w.neighbour) + "/"
    return path + "x" * (189 - len(path)) + AUTH_TOKEN


# The listings a trick can be set on: services, the service's users, the victim's conversations.
PATHS: dict[str, Callable[[World], str]] = {
    "services": lambda w: Hostile.services_path(),
    "users": lambda w: Hostile.users_path(w.service),
    "conversations": lambda w: w.conversations(w.victim),
}

# What a listing's first page refused for the trick's reason fails: the pass (services), the
# users listing, or the victim's listing; and the error each leaves. A NUL and a lone surrogate
# are kept in the error, escaped as PostgreSQL's text can hold them.
REFUSED_BECAUSE = {
    "nul_error": "HTTP 409 code 50000: refused\\x00 here \\ud800 too",
    "nested_error": "HTTP 409",
    "bad_port_next": "its next_page_url is not a valid URL",
}


def first_page_refused(name: str, where: str, kind: str) -> Case:
    """The first page of the listing ``where`` (a key of PATHS) answers the trick ``kind``."""

    def tricked(w: World) -> dict[str, Trick]:
        return {PATHS[where](w): Trick(kind)}

    def victim(w: World) -> str:
        return w.victim

    def nobody_listed(w: World) -> list[str]:
        return w.users

    user_listing = where == "conversations"
    return Case(
        name,
        tricked,
        exit_code=1,
        failed=victim if user_listing else None,
        listing_failed=where == "users",
        pass_failed=where == "services",
        error=REFUSED_BECAUSE[kind],
        bad_users=nobody_listed if not user_listing else lambda w: [],
        requests_at_most=1,
    )


CASES = [
    Case(
        "users_listing_loop",
        lambda w: {Hostile.users_path(w.service): Trick("loop")},
        exit_code=1,
        listing_failed=True,
        error="the listing repeats a page it already served",
        requests_at_most=2,
    ),
    Case(
        "conversations_listing_loop",
        lambda w: {w.conversations(w.heavy): Trick("loop")},
        exit_code=1,
        failed=lambda w: w.heavy,
        error="the listing repeats a page it already served",
        requests_at_most=2,
    ),
    Case(
        "endless_listing_page_bound",
        lambda w: {w.conversations(w.heavy): Trick("endless_tokens")},
        exit_code=1,
        failed=lambda w: w.heavy,
        error="the listing goes on past CONVSYNC_MAX_PAGES (25) pages",
        env={"CONVSYNC_MAX_PAGES": "25"},
        requests_at_most=25,
    ),
    Case(
        "next_page_url_into_another_listing",
        lambda w: {
            w.conversations(w.victim): Trick("foreign_next", target=w.conversations(w.neighbour))
        },
        exit_code=1,
        failed=lambda w: w.victim,
        error="its next_page_url leaves the listing",
        requests_at_most=1,
    ),
    Case(
        # the error quotes the foreign path cut to 200 characters: the token is redacted
        # before the cut, not split by it into a fragment redaction no longer recognises
        "next_page_url_quoting_the_auth_token_across_the_cut",
        lambda w: {w.conversations(w.victim): Trick("foreign_next", target=token_at_the_cut(w))},
        exit_code=1,
        failed=lambda w: w.victim,
        error="its next_page_url leaves the listing",
        requests_at_most=1,
    ),
    Case(
        "endless_body_1gib",
        lambda w: {w.conversations(w.victim): Trick("endless_body")},
        exit_code=1,
        failed=lambda w: w.victim,
        error="the response body exceeds 16777216 bytes",
        requests_at_most=1,
    ),
    Case(
        "page_of_200mb",
        lambda w: {w.conversations(w.victim): Trick("huge_page")},
        exit_code=1,
        failed=lambda w: w.victim,
        error="the response body declares 200000000 bytes",
        requests_at_most=1,
    ),
    Case(
        "gzip_bomb_1gib",
        lambda w: {w.conversations(w.victim): Trick("gzip_bomb")},
        exit_code=1,
        failed=lambda w: w.victim,
        error="the response body exceeds 16777216 bytes",
        requests_at_most=1,
    ),
    Case(
        "deflate_bomb_1gib",
        lambda w: {w.conversations(w.victim): Trick("deflate_bomb")},
        exit_code=1,
        failed=lambda w: w.victim,
        error="the response body exceeds 16777216 bytes",
        requests_at_most=1,
    ),
    Case(
        "10000_items_for_page_size_50",
        lambda w: {w.conversations(w.victim): Trick("many_items")},
        exit_code=1,
        failed=lambda w: w.victim,
        error="has 10000 items, more than the 50 asked for",
        requests_at_most=1,
    ),
    Case(
        "friendly_name_of_20mb",
        lambda w: {w.conversations(w.victim): Trick("huge_field")},
        exit_code=1,
        failed=lambda w: w.victim,
        error="above CONVSYNC_MAX_RESPONSE_BYTES",
        requests_at_most=1,
    ),
    *(
        first_page_refused(f"error_message_with_nul_and_lone_surrogate_{where}", where, kind)
        for where, kind in (
            ("services", "nul_error"),
            ("users", "nul_error"),
            ("conversations", "nul_error"),
        )
    ),
    *(
        first_page_refused(f"{name}_{where}", where, kind)
        for name, kind in (
            ("error_body_nested_too_deeply", "nested_error"),
            ("next_page_url_with_a_port_not_a_number", "bad_port_next"),
        )
        for where in ("services", "conversations")
    ),
    Case(
        "service_sid_ending_in_newline",
        lambda w: {Hostile.services_path(): Trick("newline_sid", extra=True)},
        exit_code=0,
        quarantined="sid is not a valid IS SID",
    ),
    Case(
        "user_sid_ending_in_newline",
        lambda w: {Hostile.users_path(w.service): Trick("newline_sid", item=3)},
        exit_code=1,  # a user could not be identified: the pass is partial
        quarantined="sid is not a valid US SID",
        bad_users=lambda w: [w.users[3]],
    ),
    Case(
        "conversation_sid_ending_in_newline",
        lambda w: {w.conversations(w.victim): Trick("newline_sid", item=1)},
        exit_code=0,
        quarantined="conversation_sid is not a valid CH SID",
    ),
]


def hostile_env(url: str, db_url: str, data: Dataset, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": db_url,
        "TWILIO_ACCOUNT_SID": data.account_sid,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_CONVERSATIONS_BASE_URL": url,
        "CONVSYNC_CONCURRENCY": "8",
        "CONVSYNC_PAGE_SIZE": str(PAGE),
        "CONVSYNC_MAX_ATTEMPTS": "3",
        "CONVSYNC_MAX_RETRY_SECONDS": "5",
        "CONVSYNC_LOG_FORMAT": "json",
        **extra,
    }


def assert_clean(result: Measured, what: str) -> None:
    """No traceback anywhere; every stderr line a JSON log line."""
    assert "Traceback" not in result.output, f"{what}: {result.output[-3000:]}"
    for line in result.stderr.splitlines():
        assert line.startswith("{"), f"{what}: not a log line: {line[:300]}"


async def stored_by_user(db_url: str) -> dict[str, set[tuple[Any, ...]]]:
    rows: dict[str, set[tuple[Any, ...]]] = {}
    for row in await view_rows(db_url):
        rows.setdefault(row[USER], set()).add(row)
    return rows


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_a_hostile_upstream_costs_one_listing_or_item_never_the_pass(
    case: Case, dataset: Dataset, db_url: str
) -> None:
    world = World.of(dataset)
    hostile = Hostile(dataset, AUTH_TOKEN)
    hostile.tricks.update(case.where(world))
    tricked = next(iter(hostile.tricks))
    with HostileServer(hostile) as upstream:
        env = hostile_env(upstream.url, db_url, dataset, **case.env)
        result = await asyncio.to_thread(run_measured, ["sync"], env, WITHIN)
        base = upstream.url
    assert_clean(result, case.name)
    assert TOKEN_PART not in result.output
    assert result.returncode == case.exit_code, (case.name, result.stderr[-3000:])
    assert result.seconds < WITHIN
    assert result.peak_rss_mb < RSS_LIMIT_MB, f"{case.name}: {result.peak_rss_mb:.0f} MB"
    if case.requests_at_most is not None:
        assert hostile.served.requests[tricked] <= case.requests_at_most, hostile.served
    # A body refused as it streamed in was abandoned early, not read to its end.
    assert hostile.served.bytes_sent[tricked] < 64 << 20, hostile.served.bytes_sent

    # Which listing failed, and why; the rest of the pass went on.
    failed_users = await fetch(
        db_url, "SELECT user_sid, last_error FROM sync_cursors WHERE state = 'failed'"
    )
    listing_errors = await fetch(db_url, "SELECT error FROM sync_discovery WHERE error IS NOT NULL")
    assert not [r for r in failed_users if TOKEN_PART in r["last_error"]], failed_users
    failed = case.failed(world) if case.failed else None
    if case.pass_failed:
        passes = await fetch(db_url, "SELECT status, error FROM sync_runs")
        assert [p["status"] for p in passes] == ["failed"], passes
        assert case.error in passes[0]["error"], passes
    if case.listing_failed:
        assert [r["error"] for r in listing_errors if case.error in r["error"]], listing_errors
    else:
        assert listing_errors == [] or case.bad_users(world), listing_errors
    if failed is not None:
        assert [r["user_sid"] for r in failed_users] == [failed]
        assert case.error in failed_users[0]["last_error"], failed_users[0]["last_error"]
    else:
        assert failed_users == []
    if case.quarantined:
        reasons = await fetch(db_url, "SELECT reason, item FROM quarantine")
        assert [r["reason"] for r in reasons] == [case.quarantined], reasons
        assert json.loads(reasons[0]["item"]), "the raw item is kept"

    # Every row of every good user is stored; no stored row is wrong; nothing removed.
    bad = {failed, *case.bad_users(world)}
    if case.name == "next_page_url_into_another_listing":
        # the neighbour's listing was walked by the neighbour alone, page by page
        pages = -(-dataset.membership_count(world.service, world.neighbour) // PAGE)
        assert hostile.served.requests[world.conversations(world.neighbour)] == pages
    stored = await stored_by_user(db_url)
    compared = 0
    for user in world.users:
        items = dataset.memberships(world.service, user, base)
        expected = {expected_row(i) for i in items}
        have = stored.get(user, set())
        assert have <= expected, f"{case.name}: a wrong row for {user}"
        if user in bad:
            continue
        if case.name == "conversation_sid_ending_in_newline" and user == world.victim:
            expected.discard(expected_row(items[1]))  # quarantined, the rest stored
        assert have == expected, f"{case.name}: {len(expected - have)} rows of {user} lost"
        compared += len(expected)
    assert (
        await scalar(db_url, "SELECT count(*) FROM memberships WHERE removed_at IS NOT NULL") == 0
    )
    record(
        hostile_cases=1,
        rows_compared=compared,
        rows_lost=0,
        wrong_rows=0,
        **{
            f"hostile_{case.name}_ms": round(result.seconds * 1000),
            f"hostile_{case.name}_peak_rss_mb": round(result.peak_rss_mb),
        },
    )


async def test_a_listing_refused_for_its_bound_starts_again_at_page_one_next_pass(
    dataset: Dataset, db_url: str
) -> None:
    # Continued from its cursor, a listing refused past CONVSYNC_MAX_PAGES (or for a loop)
    # would be refused again, before any fetch, in every later pass: its user never synced
    # again, whatever the upstream did since.
    world = World.of(dataset)
    hostile = Hostile(dataset, AUTH_TOKEN)
    heavy = world.conversations(world.heavy)
    hostile.tricks[heavy] = Trick("endless_tokens")
    with HostileServer(hostile) as upstream:
        env = hostile_env(upstream.url, db_url, dataset, CONVSYNC_MAX_PAGES="25")
        refused = await asyncio.to_thread(run_measured, ["sync"], env, WITHIN)
        hostile.tricks.clear()  # the upstream mends its paging
        hostile.served.requests.clear()
        mended = await asyncio.to_thread(run_measured, ["sync"], env, WITHIN)
        base = upstream.url
    for result, what in ((refused, "refused"), (mended, "mended")):
        assert_clean(result, what)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert mended.returncode == 0, mended.stderr[-3000:]
    pages = -(-dataset.membership_count(world.service, world.heavy) // PAGE)
    assert hostile.served.requests[heavy] == pages  # from page one, each page once
    stored = await stored_by_user(db_url)
    items = dataset.memberships(world.service, world.heavy, base)
    assert stored[world.heavy] == {expected_row(i) for i in items}


async def test_attributes_are_judged_as_jsonb_will_hold_them(dataset: Dataset, db_url: str) -> None:
    # Attributes are stored as jsonb: a number PostgreSQL's numeric cannot hold would fail the
    # page's batch (and the user's listing, pass after pass) unless quarantined alone; one
    # beyond a float's range that numeric holds, or an escaped backslash before "u0000", is a
    # good row and is stored.
    world = World.of(dataset)
    hostile = Hostile(dataset, AUTH_TOKEN)
    path = world.conversations(world.victim)
    hostile.tricks[path] = Trick("attributes")
    with HostileServer(hostile) as upstream:
        result = await asyncio.to_thread(
            run_measured, ["sync"], hostile_env(upstream.url, db_url, dataset), WITHIN
        )
        base = upstream.url
    assert_clean(result, "attributes")
    assert result.returncode == 0, result.stderr[-3000:]
    assert await fetch(db_url, "SELECT user_sid FROM sync_cursors WHERE state = 'failed'") == []
    reasons = await fetch(db_url, "SELECT reason FROM quarantine")
    assert [r["reason"] for r in reasons] == [
        "attributes is not valid JSON (number 1e-20000 is out of range for PostgreSQL's numeric)"
    ]
    items = dataset.memberships(world.service, world.victim, base)
    stored = await fetch(
        db_url,
        """SELECT conversation_sid, attributes -> 'x' = '1e400'::jsonb AS big,
                  attributes ->> 'path' AS path
           FROM conversations WHERE conversation_sid = ANY($1::text[])""",
        [i["conversation_sid"] for i in items[:3]],
    )
    by_sid = {r["conversation_sid"]: r for r in stored}
    # the victim's versions are the newest: they are the ones stored
    assert by_sid[items[1]["conversation_sid"]]["big"] is True
    assert by_sid[items[2]["conversation_sid"]]["path"] == "C:\\u0000dir"
    memberships = await fetch(
        db_url, "SELECT conversation_sid FROM memberships WHERE user_sid = $1", world.victim
    )
    kept = {i["conversation_sid"] for i in items[1:]}
    assert {m["conversation_sid"] for m in memberships} == kept, "every other row kept"


# --- a 401 that echoes the credentials ----------------------------------------------------------

TAG = secrets.token_hex(4)
KEY_SID = "SK" + "5" * 32
KEY_SECRET = f"key/SECRET:{TAG}%apikey"
DB_PASSWORD = f"pg:SECRET/{TAG}%pw&x"


@pytest.fixture
async def password_db(pg_server: PgServer) -> AsyncIterator[str]:
    """A migrated database owned by a role with a password; its URL carries the password both
    in its user info and as ``?password=`` (%-encoded, as a URL must)."""
    role, name = f"convsync_echo_{TAG}", f"convsync_test_echo_{TAG}"
    admin = await asyncpg.connect(pg_server.url)
    try:
        escaped = DB_PASSWORD.replace("'", "''")
        await admin.execute(f"CREATE ROLE {quote_ident(role)} LOGIN PASSWORD '{escaped}'")
        await admin.execute(f"CREATE DATABASE {quote_ident(name)} OWNER {quote_ident(role)}")
    finally:
        await admin.close()
    parts = urlsplit(pg_server.url)
    encoded = quote(DB_PASSWORD, safe="")
    netloc = f"{role}:{encoded}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    url = urlunsplit(parts._replace(netloc=netloc, path=f"/{name}", query=f"password={encoded}"))
    try:
        await apply_migrations(url)
        yield url
    finally:
        await drop_database(pg_server.url, name)
        admin = await asyncpg.connect(pg_server.url)
        try:
            await admin.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}")
        finally:
            await admin.close()


def every_form(*values: str) -> list[str]:
    forms = set()
    for value in values:
        forms |= {value, quote(value, safe=""), quote(value)}
    return sorted(forms)


async def test_a_401_echoing_every_credential_leaks_none_of_them(
    dataset: Dataset, password_db: str
) -> None:
    secrets_used = [AUTH_TOKEN, KEY_SECRET, DB_PASSWORD]
    basic = [
        base64.b64encode(f"{user}:{secret}".encode()).decode()
        for user, secret in ((KEY_SID, KEY_SECRET), (dataset.account_sid, AUTH_TOKEN))
    ]
    # It echoes the Authorization header, its decoded SID:secret, and (to try every form)
    # the auth token (set beside the API key, so never sent) and the database password.
    hostile = Hostile(dataset, AUTH_TOKEN, echo=(AUTH_TOKEN, DB_PASSWORD))
    hostile.tricks["*"] = Trick("echo_401")
    with HostileServer(hostile) as upstream:
        env = {
            **hostile_env(upstream.url, password_db, dataset),
            "TWILIO_API_KEY_SID": KEY_SID,
            "TWILIO_API_KEY_SECRET": KEY_SECRET,
        }
        synced = await asyncio.to_thread(run_measured, ["sync"], env)
        status = await asyncio.to_thread(run_measured, ["status", "--json"], env)
        table = await asyncio.to_thread(run_measured, ["status"], env)
    assert synced.returncode == 2, synced.stderr[-2000:]
    assert status.returncode == 0, status.stderr[-2000:]
    assert table.returncode == 0, table.stderr[-2000:]
    for result in (synced, status, table):
        assert_clean(result, "echo")
    failed = [json.loads(line) for line in synced.stderr.splitlines()]
    assert [e["exit_code"] for e in failed if e["event"] == "command_failed"] == [2]
    stored = await fetch(
        password_db,
        "SELECT error FROM sync_runs UNION ALL SELECT last_error FROM sync_cursors "
        "UNION ALL SELECT error FROM sync_discovery",
    )
    errors = [r[0] for r in stored if r[0]]
    assert errors
    assert "rejected the credentials" in errors[0]
    assert "[redacted]" in errors[0], errors[0]
    assert "[redacted]" in status.stdout
    texts = {"sync": synced.output, "status --json": status.output, "status": table.output}
    texts["database"] = "\n".join(errors)
    leaks = [
        f"{where}: {form!r}"
        for where, text in texts.items()
        for form in every_form(*secrets_used) + basic
        if form in text
    ]
    record(
        secret_echo_forms_checked=len(every_form(*secrets_used) + basic),
        secrets_leaked=len(leaks),
    )
    assert leaks == []


# --- `convsync run`'s HTTP endpoints -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def spawn_run(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            env={**_base_env(), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )


async def status_of(url: str) -> int:
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status
    except aiohttp.ClientError:
        return 0


async def until_up(url: str, child: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while await status_of(url) != 200:
        assert child.poll() is None, "convsync run exited"
        assert time.monotonic() < deadline, f"{url} never answered"
        await asyncio.sleep(0.05)


def stop(child: subprocess.Popen[bytes]) -> int:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    try:
        return child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        raise


@pytest.fixture
def run_env(dataset: Dataset, db_url: str) -> Iterator[dict[str, str]]:
    with HostileServer(Hostile(dataset, AUTH_TOKEN)) as upstream:
        yield hostile_env(
            upstream.url,
            db_url,
            dataset,
            CONVSYNC_RUN_AT_START="false",
            CONVSYNC_INTERVAL="3600",
            CONVSYNC_HTTP_HEADER_TIMEOUT="1",
        )


async def test_run_drops_300_half_sent_requests_and_binds_the_host_it_is_given(
    run_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "run.log"
    child = spawn_run(
        {**run_env, "CONVSYNC_HTTP_HOST": "127.0.0.1", "CONVSYNC_HTTP_PORT": str(port)}, log
    )
    try:
        await until_up(f"http://127.0.0.1:{port}/healthz", child)
        connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(300)]
        for _, writer in connections:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ")
            await writer.drain()
        started = time.monotonic()
        assert await status_of(f"http://127.0.0.1:{port}/healthz") == 200, "still serving"
        answers = await asyncio.wait_for(
            asyncio.gather(*(reader.read() for reader, _ in connections)), 10
        )
        closed_after = time.monotonic() - started
        for _, writer in connections:
            writer.close()
        assert answers == [b""] * 300, "each half-sent request was closed, unanswered"
        assert closed_after < 1 + 3, closed_after
        # bound to 127.0.0.1 only: another loopback address is refused
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.2", port)
        assert await status_of(f"http://127.0.0.1:{port}/healthz") == 200
    finally:
        code = stop(child)
    output = log.read_text()
    assert code == 0, output[-2000:]
    assert "Traceback" not in output

    # The default host is every interface (containers): 127.0.0.2 answers.
    port = free_port()
    child = spawn_run({**run_env, "CONVSYNC_HTTP_PORT": str(port)}, tmp_path / "default.log")
    try:
        await until_up(f"http://127.0.0.2:{port}/healthz", child)
    finally:
        assert stop(child) == 0
    record(
        http_half_sent_requests=300,
        http_half_sent_closed_ms=round(closed_after * 1000),
    )
