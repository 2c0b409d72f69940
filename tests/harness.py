"""Shared test plumbing: settings for a simulator + database, running passes, comparing data."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from convsync_tools.simdata import DEMO_ACCOUNT_SID, DEMO_AUTH_TOKEN
from convsync_tools.simulator import SimulatorServer
from worker.client import TwilioClient
from worker.config import Settings, load_settings
from worker.metrics import Metrics
from worker.retry import Backoff
from worker.store import PassSummary, Store
from worker.sync import Scope, SyncPass

REPO = Path(__file__).resolve().parents[1]
FAST_BACKOFF = Backoff(max_attempts=3, max_seconds=5.0, base=0.01, cap=0.05)


def worker_env(server: SimulatorServer, db_url: str, **overrides: str) -> dict[str, str]:
    """The environment a convsync process needs to sync ``server`` into ``db_url``."""
    env = {
        "DATABASE_URL": db_url,
        "TWILIO_ACCOUNT_SID": server.sim.config.account_sid,
        "TWILIO_AUTH_TOKEN": server.sim.config.auth_token,
        "TWILIO_CONVERSATIONS_BASE_URL": server.url,
        "CONVSYNC_CONCURRENCY": "8",
        "CONVSYNC_LOG_FORMAT": "json",
    }
    env.update(overrides)
    return env


def settings_for(server: SimulatorServer, db_url: str, **overrides: str) -> Settings:
    return load_settings(worker_env(server, db_url, **overrides))


async def run_pass(
    settings: Settings,
    scope: Scope | None = None,
    backoff: Backoff = FAST_BACKOFF,
    kind: type[SyncPass] = SyncPass,
    **kwargs: Any,
) -> PassSummary:
    """One pass in this process, with its own store and client (``kind``: a subclass that
    forces an interleaving)."""
    store = await Store.connect(settings.require_database(), settings.db_pool_size)
    try:
        async with TwilioClient(settings, backoff=backoff, metrics=Metrics()) as client:
            summary = await kind(settings, store, client, scope, metrics=Metrics(), **kwargs).run()
    finally:
        await store.close()
    assert summary is not None
    return summary


def convsync(
    args: list[str], env: Mapping[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env={**_base_env(), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


def spawn_convsync(args: list[str], env: Mapping[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "worker", *args],
        env={**_base_env(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def failure(output: str) -> dict[str, Any]:
    """The one ``command_failed`` line a failed command ends with (JSON logs), parsed."""
    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    failed = [e for e in events if e.get("event") == "command_failed"]
    assert len(failed) == 1, f"{len(failed)} command_failed lines in {output[-2000:]}"
    line: dict[str, Any] = failed[0]
    return line


def _base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if k in keep}


# --- comparing the database with the simulator --------------------------------------------

VIEW_COLUMNS = (
    "account_sid", "chat_service_sid", "conversation_sid", "unread_messages_count",
    "last_read_message_index", "participant_sid", "user_sid", "friendly_name",
    "conversation_state", "date_inactive", "date_closed", "attributes", "date_created",
    "date_updated", "created_by", "notification_level", "unique_name", "url", "links",
)  # fmt: skip


def _date(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def expected_row(item: Mapping[str, Any]) -> tuple[Any, ...]:
    """An API user-conversation item as the view's row should hold it."""
    timers = item.get("timers") or {}
    row = dict(item)
    row["date_inactive"] = _date(timers.get("date_inactive"))
    row["date_closed"] = _date(timers.get("date_closed"))
    row["date_created"] = _date(item.get("date_created"))
    row["date_updated"] = _date(item.get("date_updated"))
    row["attributes"] = _canonical(item.get("attributes"))
    row["links"] = _canonical_obj(item.get("links"))
    return tuple(row.get(c) for c in VIEW_COLUMNS)


def _canonical(text: str | None) -> str | None:
    return None if text is None else json.dumps(json.loads(text), sort_keys=True)


def _canonical_obj(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


async def view_rows(db_url: str) -> list[tuple[Any, ...]]:
    """Every current membership from user_conversations_v, as comparable tuples."""
    conn = await asyncpg.connect(db_url)
    try:
        records = await conn.fetch(f"SELECT {', '.join(VIEW_COLUMNS)} FROM user_conversations_v")
    finally:
        await conn.close()
    rows = []
    for r in records:
        row = dict(r)
        row["attributes"] = _canonical(row["attributes"])
        row["links"] = _canonical(row["links"])
        rows.append(tuple(row[c] for c in VIEW_COLUMNS))
    return rows


def diff(expected: Iterable[tuple[Any, ...]], actual: Iterable[tuple[Any, ...]]) -> str:
    """'' when equal, else a short description of the first differences."""
    want, have = sorted(expected, key=repr), sorted(actual, key=repr)
    if want == have:
        return ""
    have_set, want_set = set(have), set(want)
    missing = [r for r in want if r not in have_set][:3]
    extra = [r for r in have if r not in want_set][:3]
    return f"{len(want)} expected, {len(have)} stored; missing {missing}; unexpected {extra}"


async def assert_mirrors(server: SimulatorServer, db_url: str) -> int:
    """The view equals the simulator's data field by field; returns the row count."""
    expected = [expected_row(i) for i in server.sim.dataset.expected_memberships(server.url)]
    problem = diff(expected, await view_rows(db_url))
    assert problem == "", problem
    return len(expected)


def demo_credentials() -> tuple[str, str]:
    return DEMO_ACCOUNT_SID, DEMO_AUTH_TOKEN


# --- reading the database and waiting on conditions ----------------------------------------


async def fetch(db_url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """Rows of one query on a short-lived connection."""
    conn = await asyncpg.connect(db_url)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows
    finally:
        await conn.close()


async def scalar(db_url: str, sql: str, *args: object) -> Any:
    """The first value of one query on a short-lived connection."""
    conn = await asyncpg.connect(db_url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 60, what: str = "") -> Any:
    """Poll an async condition until it is truthy (a condition, never a guessed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def heavy_user(server: SimulatorServer, service: str, min_pages: int = 3) -> str:
    """A user whose listing spans at least ``min_pages`` pages of 50."""
    for user in server.sim.dataset.user_sids(service):
        if server.sim.dataset.membership_count(service, user) > 50 * (min_pages - 1):
            return user
    raise AssertionError("the dataset has no heavy user")


async def sigkill_when(env: Mapping[str, str], db_url: str, condition_sql: str, what: str) -> None:
    """Start `convsync sync`, wait until ``condition_sql`` holds, then SIGKILL it (for real)."""
    child = spawn_convsync(["sync"], env)
    try:
        await until(lambda: scalar(db_url, condition_sql), what=what)
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, "the child was killed mid-pass, not finished"


# --- `convsync run` as a child process ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Replica:
    """A `convsync run` child process with its logs in a file (a pipe could fill and block)."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None) -> None:
        self.port = free_port() if port is None else port
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            env={**_base_env(), **env, "CONVSYNC_HTTP_PORT": str(self.port)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def events(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self._log.close()
        return code
