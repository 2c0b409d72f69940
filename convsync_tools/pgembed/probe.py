"""Asking a PostgreSQL server something, synchronously, through asyncpg.

The readiness check of a server we start and the probe of a local one run before any event loop
(a session fixture) or while one runs (a test), so each question gets a loop of its own in a
helper thread: ``run_sql`` is safe to call from anywhere. Trust auth only: no password is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import asyncpg

SUPERUSER = "postgres"
LOCAL_PORT = 5432
SOCKET_DIRS = ("/var/run/postgresql", "/tmp")  # noqa: S108 - where servers put sockets
# What a server that is not (yet) usable answers with.
UNUSABLE = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
T = TypeVar("T")


@dataclass(frozen=True)
class Endpoint:
    """Where a server listens: a TCP host, or a unix socket directory (a path), plus port."""

    host: str
    port: int = LOCAL_PORT

    def url(self, user: str, database: str) -> str:
        """A ``postgresql://`` URL for asyncpg (and libpq)."""
        if self.host.startswith("/"):
            return f"postgresql://{quote(user)}@/{quote(database)}?host={quote(self.host)}" + (
                f"&port={self.port}" if self.port != LOCAL_PORT else ""
            )
        return f"postgresql://{quote(user)}@{self.host}:{self.port}/{quote(database)}"


def _on_own_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    with ThreadPoolExecutor(1, thread_name_prefix="pgembed-probe") as pool:
        return pool.submit(asyncio.run, coroutine).result()


async def _run_sql(
    endpoint: Endpoint, user: str, database: str, sql: Sequence[str], seconds: float
) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(
        host=endpoint.host,
        port=endpoint.port,
        user=user,
        database=database,
        timeout=seconds,
        server_settings={"application_name": "pgembed"},
    )
    try:
        rows: list[asyncpg.Record] = []
        for statement in sql:
            rows = await conn.fetch(statement, timeout=seconds)
        return [tuple(row.values()) for row in rows]
    finally:
        await conn.close(timeout=seconds)


def run_sql(
    endpoint: Endpoint, user: str, database: str, *sql: str, timeout: float = 5.0
) -> list[tuple[Any, ...]]:
    """Connect with trust auth, run each statement, return the last one's rows (typed by
    asyncpg). Raises what asyncpg raises: ``asyncpg.PostgresError`` (with its ``sqlstate``),
    ``OSError``, ``TimeoutError``."""
    return _on_own_loop(_run_sql(endpoint, user, database, sql, timeout))


def data_directory(endpoint: Endpoint, timeout: float) -> Path | None:
    """The data directory of the server answering at ``endpoint`` (its readiness), or None
    while nothing usable answers there."""
    try:
        rows = run_sql(endpoint, SUPERUSER, "postgres", "SHOW data_directory", timeout=timeout)
    except UNUSABLE:
        return None
    return Path(rows[0][0]).resolve() if rows and rows[0][0] else None


def quote_ident(name: str) -> str:
    """A SQL identifier, double-quoted."""
    return '"' + name.replace('"', '""') + '"'


def ensure_database(endpoint: Endpoint, user: str, name: str) -> str:
    """Create database ``name`` unless it exists; its URL."""
    with contextlib.suppress(asyncpg.DuplicateDatabaseError):
        run_sql(endpoint, user, "postgres", f"CREATE DATABASE {quote_ident(name)}")
    return endpoint.url(user, name)


# --- a local server of someone else's ---------------------------------------------------------


def current_os_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def local_endpoints() -> list[Endpoint]:
    """127.0.0.1:5432, then the usual unix socket directories that hold a 5432 socket."""
    return [Endpoint("127.0.0.1")] + [
        Endpoint(d) for d in SOCKET_DIRS if Path(d, f".s.PGSQL.{LOCAL_PORT}").exists()
    ]


def find_local_server(
    timeout: float = 1.0, endpoints: Sequence[Endpoint] | None = None
) -> str | None:
    """The admin URL of a reachable server with trust auth and CREATEDB, else None.

    Tries ``endpoints`` (default ``local_endpoints()``) as the current OS user, then as
    ``postgres``, all within ``timeout`` seconds.
    """
    found = probe_local(timeout, endpoints)
    return found[0].url(found[1], "postgres") if found else None


def probe_local(
    timeout: float, endpoints: Sequence[Endpoint] | None = None
) -> tuple[Endpoint, str] | None:
    """The first (endpoint, role) with trust auth whose role may create databases."""
    deadline = time.monotonic() + timeout
    users = list(dict.fromkeys((current_os_user(), SUPERUSER)))
    if endpoints is None:
        endpoints = local_endpoints()
    for endpoint in endpoints:
        for user in users:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                rows = run_sql(
                    endpoint,
                    user,
                    "postgres",
                    "SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = current_user",
                    timeout=remaining,
                )
            except ConnectionRefusedError:
                break  # nothing listens there: the next user will not fare better
            except UNUSABLE:
                continue
            if rows and rows[0][0] is True:
                return endpoint, user
    return None
