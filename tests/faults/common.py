"""Plumbing shared by the fault tests: database probes, cursor invariants, fault figures."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from convsync_tools.pgembed import quote_ident
from convsync_tools.simulator import SimulatorServer
from tests.harness import REPO, VIEW_COLUMNS, _base_env, expected_row, view_rows

FIGURES_PATH = Path(os.environ.get("CONVSYNC_FAULT_FIGURES", "/tmp/convsync-fault-figures.json"))
# Everything injected and checked by tests/faults, summed over the session (see conftest.py).
FIGURES: Counter[str] = Counter()


def record(**counts: int) -> None:
    FIGURES.update(counts)


def record_sim_faults(server: SimulatorServer) -> Counter[str]:
    """Add the simulator's injected faults (by kind) to the figures; returns them."""
    faults = server.sim.stats().faults
    FIGURES.update({f"http_fault_{kind}": n for kind, n in faults.items()})
    return faults


def write_figures() -> str:
    summary = {"figures": dict(sorted(FIGURES.items())), "written_at": time.time()}
    FIGURES_PATH.write_text(json.dumps(summary, indent=2, sort_keys=True))
    return " ".join(f"{k}={v}" for k, v in sorted(FIGURES.items()))


async def wait_for(
    conn: asyncpg.Connection,
    sql: str,
    predicate: Callable[[Any], bool],
    timeout: float = 60,
    every: float = 0.01,
) -> Any:
    """Poll ``sql`` on ``conn`` until its value satisfies ``predicate`` (a condition, not a
    guessed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await conn.fetchval(sql)
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting on {sql} (last value {value!r})")
        await asyncio.sleep(every)


COMMITTED_PAGES = "SELECT coalesce(sum(run_pages), 0) FROM sync_cursors"


async def check_cursors(
    db_url: str,
    server: SimulatorServer | None = None,
    page_size: int | None = None,
    *,
    quarantined_ok: bool = False,
) -> int:
    """The committed state is consistent wherever a process stopped; returns cursors checked.

    For every listing under way (``listing_pages > 0``): its cursor is not ahead of its rows
    (every SID seen so far is a current membership), it is unfinished (a next page is saved),
    and, given the simulator and page size (data unchanged since the listing began), the SIDs
    seen are exactly the first pages of the listing and their rows hold the API's values: no
    half-written page.
    """
    conn = await asyncpg.connect(db_url)
    try:
        cursors = await conn.fetch(
            """SELECT chat_service_sid, user_sid, state, listing_pages, next_page_path,
                      seen_conversations FROM sync_cursors WHERE listing_pages > 0"""
        )
        dangling = await conn.fetch(
            """SELECT c.user_sid, s.sid FROM sync_cursors c, unnest(c.seen_conversations) s(sid)
               WHERE c.listing_pages > 0 AND NOT EXISTS (
                   SELECT 1 FROM memberships m WHERE m.chat_service_sid = c.chat_service_sid
                      AND m.user_sid = c.user_sid AND m.conversation_sid = s.sid
                      AND m.removed_at IS NULL)"""
        )
        finished_with_listing = await conn.fetchval(
            "SELECT count(*) FROM sync_cursors WHERE state = 'done' "
            "AND (listing_pages > 0 OR cardinality(seen_conversations) > 0)"
        )
    finally:
        await conn.close()
    if not quarantined_ok:
        assert dangling == [], f"cursor ahead of its rows: {[tuple(r) for r in dangling[:5]]}"
    assert finished_with_listing == 0, "a finished user kept a listing open"
    for c in cursors:
        assert c["next_page_path"] is not None, f"{c['user_sid']}: pages counted, no next page"
        if server is None or page_size is None:
            continue
        seen = list(c["seen_conversations"])
        assert len(seen) == c["listing_pages"] * page_size, f"{c['user_sid']}: short pages"
        upstream = server.sim.dataset.memberships(c["chat_service_sid"], c["user_sid"], server.url)
        prefix = upstream[: len(seen)]
        assert seen == [i["conversation_sid"] for i in prefix], f"{c['user_sid']}: seen != API"
    if server is not None and cursors:
        await check_rows_of_open_listings(db_url, server, cursors)
    return len(cursors)


async def check_rows_of_open_listings(
    db_url: str, server: SimulatorServer, cursors: list[asyncpg.Record]
) -> None:
    """Rows of the pages committed so far hold exactly the API's values."""
    stored = set(await view_rows(db_url))
    for c in cursors:
        seen = set(c["seen_conversations"])
        items = server.sim.dataset.memberships(c["chat_service_sid"], c["user_sid"], server.url)
        for item in items:
            if item["conversation_sid"] in seen:
                assert expected_row(item) in stored, f"half-written page: {item['url']}"


def conversation_pages_fetched_twice(server: SimulatorServer) -> int:
    return sum(
        1 for (path, _), n in server.sim.stats().pages.items() if "/Conversations" in path and n > 1
    )


_KEY = tuple(VIEW_COLUMNS.index(c) for c in ("chat_service_sid", "user_sid", "conversation_sid"))


async def mirror(server: SimulatorServer, db_url: str) -> int:
    """Compare the view with the simulator row by row, record the figures, then require
    equality: rows lost (expected, absent) and wrong rows (a value differs, or a row that
    should not be there) are both 0. Returns the rows compared."""
    expected = {
        tuple(row[i] for i in _KEY): row
        for row in map(expected_row, server.sim.dataset.expected_memberships(server.url))
    }
    actual = {tuple(row[i] for i in _KEY): row for row in await view_rows(db_url)}
    lost = [k for k in expected if k not in actual]
    wrong = [k for k, row in actual.items() if expected.get(k) != row]
    record(rows_compared=len(expected), rows_lost=len(lost), wrong_rows=len(wrong))
    assert not lost, f"{len(lost)} rows lost, e.g. {lost[:3]}"
    assert not wrong, f"{len(wrong)} wrong rows, e.g. {[(k, actual[k]) for k in wrong[:2]]}"
    return len(expected)


@dataclass(frozen=True)
class Measured:
    """A finished child process: exit code, output, wall seconds and peak RSS (ru_maxrss)."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mb: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


# Forks and reaps `python -m worker ...` with os.wait4. On Linux a child's ru_maxrss starts
# from its parent's RSS at the fork (execve keeps the high-water mark), so the worker is forked
# from this small process, not from the test process (whose RSS says nothing about it).
_REAPER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "worker", *sys.argv[2:]])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    json.dump({"maxrss_kb": usage.ru_maxrss, "code": os.waitstatus_to_exitcode(status)}, out)
"""


def run_measured(args: list[str], env: Mapping[str, str], timeout: float = 90) -> Measured:
    """Run the real CLI as a child and reap it with ``os.wait4`` for its own peak RSS (output
    goes to files: a pipe could fill and block it). Killed, and the test failed, past
    ``timeout``."""
    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        tempfile.NamedTemporaryFile("r") as usage,
    ):
        started = time.monotonic()
        reaper = subprocess.Popen(
            [sys.executable, "-c", _REAPER, usage.name, *args],
            env={**_base_env(), **env},
            stdout=out,
            stderr=err,
            cwd=REPO,
            start_new_session=True,
        )
        try:
            reaper.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(reaper.pid, signal.SIGKILL)
            reaper.wait()
            raise AssertionError(f"convsync {' '.join(args)} still ran after {timeout}s") from None
        seconds = time.monotonic() - started
        measured = json.loads(usage.read())
        out.seek(0)
        err.seek(0)
        return Measured(
            measured["code"], out.read(), err.read(), seconds, measured["maxrss_kb"] / 1024
        )


class Failover:
    """Turns one database read-only (sessions terminated) and writable again."""

    def __init__(self, admin: asyncpg.Connection, db_url: str) -> None:
        self.admin = admin
        self.name = urlsplit(db_url).path.lstrip("/")
        self.began = self.ended = 0.0

    async def demote(self) -> int:
        await self.admin.execute(
            f"ALTER DATABASE {quote_ident(self.name)} SET default_transaction_read_only = on"
        )
        self.began = time.monotonic()
        terminated: int = await self.admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            self.name,
        )
        return terminated

    async def promote(self) -> None:
        await self.admin.execute(
            f"ALTER DATABASE {quote_ident(self.name)} RESET default_transaction_read_only"
        )
        self.ended = time.monotonic()

    @property
    def seconds(self) -> float:
        return self.ended - self.began
