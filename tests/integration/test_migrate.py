"""The migration runner against real PostgreSQL: once each, in order, safe when concurrent."""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from convsync_tools.pgembed import quote_ident
from tests.conftest import PgServer, drop_database
from tests.harness import until
from worker import migrate
from worker.errors import MigrationError
from worker.migrate import (
    MIGRATIONS_DIR,
    apply_migrations,
    load_migrations,
    pending_migrations,
)

ALL = [m.name for m in load_migrations()]
TABLES = {"services", "users", "conversations", "memberships", "sync_runs", "sync_cursors"}


@pytest.fixture
async def empty_db(empty_db_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(empty_db_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def migrations_copy(tmp_path: Path) -> Path:
    """A private copy of the real migrations, free to edit."""
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, directory)
    return directory


async def _applied(conn: asyncpg.Connection) -> list[tuple[str, int]]:
    rows = await conn.fetch(
        "SELECT name, count(*) AS n FROM schema_migrations GROUP BY name ORDER BY name"
    )
    return [(r["name"], r["n"]) for r in rows]


async def _tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r["tablename"] for r in rows}


def test_the_project_ships_ordered_migrations() -> None:
    assert len(ALL) >= 2
    assert sorted(ALL) == ALL
    assert ALL[0].startswith("001_")


async def test_migrations_apply_into_an_empty_database(
    empty_db_url: str, empty_db: asyncpg.Connection
) -> None:
    assert await pending_migrations(empty_db) == ALL
    assert await apply_migrations(empty_db_url) == ALL
    assert await _tables(empty_db) >= TABLES
    assert await _applied(empty_db) == [(name, 1) for name in ALL]
    assert await pending_migrations(empty_db) == []


async def test_rerunning_applies_nothing(empty_db_url: str, empty_db: asyncpg.Connection) -> None:
    await apply_migrations(empty_db_url)
    first = await empty_db.fetch("SELECT name, checksum, applied_at FROM schema_migrations")
    assert await apply_migrations(empty_db_url) == []
    again = await empty_db.fetch("SELECT name, checksum, applied_at FROM schema_migrations")
    assert sorted(map(tuple, again)) == sorted(map(tuple, first))


async def test_concurrent_runs_both_succeed_and_apply_each_file_once(
    empty_db_url: str, empty_db: asyncpg.Connection
) -> None:
    results = await asyncio.gather(*(apply_migrations(empty_db_url) for _ in range(3)))
    applied = [name for result in results for name in result]
    assert sorted(applied) == ALL  # every file applied by exactly one runner
    assert await _applied(empty_db) == [(name, 1) for name in ALL]


async def test_a_changed_migration_is_refused(
    empty_db_url: str, empty_db: asyncpg.Connection, migrations_copy: Path
) -> None:
    await apply_migrations(empty_db_url, migrations_copy)
    first = migrations_copy / ALL[0]
    first.write_text(first.read_text() + "\n-- edited after it was applied\n")
    with pytest.raises(MigrationError, match=f"{ALL[0]} changed after it was applied"):
        await apply_migrations(empty_db_url, migrations_copy)
    # The advisory lock was released: another runner is not stuck behind the failed one.
    assert await asyncio.wait_for(apply_migrations(empty_db_url), 10) == []


async def test_a_new_file_is_pending_then_applied(
    empty_db_url: str, empty_db: asyncpg.Connection, migrations_copy: Path
) -> None:
    await apply_migrations(empty_db_url, migrations_copy)
    (migrations_copy / "999_extra.sql").write_text("CREATE TABLE extra (id int PRIMARY KEY);")
    assert await pending_migrations(empty_db, migrations_copy) == ["999_extra.sql"]
    assert await apply_migrations(empty_db_url, migrations_copy) == ["999_extra.sql"]
    assert await pending_migrations(empty_db, migrations_copy) == []
    assert "extra" in await _tables(empty_db)


async def test_a_failing_migration_is_rolled_back_and_not_recorded(
    empty_db_url: str, empty_db: asyncpg.Connection, migrations_copy: Path
) -> None:
    (migrations_copy / "999_broken.sql").write_text(
        "CREATE TABLE half_done (id int); SELECT no_such_function();"
    )
    with pytest.raises(asyncpg.UndefinedFunctionError):
        await apply_migrations(empty_db_url, migrations_copy)
    assert await pending_migrations(empty_db, migrations_copy) == ["999_broken.sql"]
    assert "half_done" not in await _tables(empty_db)
    assert await _applied(empty_db) == [(name, 1) for name in ALL]


async def test_an_empty_directory_is_an_error(empty_db_url: str, tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="no migrations found"):
        await apply_migrations(empty_db_url, tmp_path)


async def test_the_template_clone_is_fully_migrated(db: asyncpg.Connection) -> None:
    assert await pending_migrations(db) == []
    assert await _tables(db) >= TABLES


@pytest.mark.parametrize("run", [1, 2])
async def test_each_test_gets_its_own_database(db: asyncpg.Connection, run: int) -> None:
    # Both runs insert the same key: the second would fail on a shared database.
    await db.execute("INSERT INTO services (chat_service_sid) VALUES ($1)", "IS" + "0" * 32)
    assert await db.fetchval("SELECT count(*) FROM services") == 1


def test_migrations_dir_honours_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CONVSYNC_MIGRATIONS_DIR", str(tmp_path))
    assert migrate._default_migrations_dir() == tmp_path
    monkeypatch.delenv("CONVSYNC_MIGRATIONS_DIR")
    assert migrate._default_migrations_dir() == MIGRATIONS_DIR


def test_an_installed_package_finds_the_migrations_it_ships(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CONVSYNC_MIGRATIONS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # the working directory plays no part
    # As installed from a wheel: the migrations are package data beside the module.
    package = tmp_path / "site-packages" / "worker"
    (package / "migrations").mkdir(parents=True)
    monkeypatch.setattr(migrate, "__file__", str(package / "migrate.py"))
    assert migrate._default_migrations_dir() == package / "migrations"
    # A checkout: the top-level migrations/ beside the package.
    monkeypatch.setattr(migrate, "__file__", str(tmp_path / "checkout" / "worker" / "migrate.py"))
    assert migrate._default_migrations_dir() == tmp_path / "checkout" / "migrations"


@pytest.fixture
async def icu_db_url(pg_server: PgServer) -> AsyncIterator[str]:
    """A fresh database whose default collation is ICU's en-US (case-aware, not bytewise)."""
    name = f"convsync_test_{secrets.token_hex(4)}_icu"
    conn = await asyncpg.connect(pg_server.url)
    try:
        await conn.execute(
            f"CREATE DATABASE {quote_ident(name)} TEMPLATE template0"
            " LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        )
    except asyncpg.PostgresError as error:  # a server built without ICU
        pytest.skip(f"no ICU collations on this server: {error}")
    finally:
        await conn.close()
    try:
        yield pg_server.database_url(name)
    finally:
        await drop_database(pg_server.url, name)


async def test_sids_compare_byte_by_byte_after_007_and_the_view_is_kept(
    icu_db_url: str, tmp_path: Path
) -> None:
    before_007 = tmp_path / "before_007"
    before_007.mkdir()
    for migration in MIGRATIONS_DIR.glob("00[1-6]_*.sql"):
        shutil.copy(migration, before_007)
    await apply_migrations(icu_db_url, before_007)
    service = "IS" + "0" * 32
    users = ["US" + "a" * 32, "US" + "B" * 32, "US" + "A" * 32]
    conn = await asyncpg.connect(icu_db_url)
    try:
        await conn.execute("INSERT INTO services (chat_service_sid) VALUES ($1)", service)
        for user in users:
            await conn.execute("INSERT INTO users VALUES ($1, $2)", service, user)
            await conn.execute(
                "INSERT INTO conversations (chat_service_sid, conversation_sid) VALUES ($1, $2)",
                service,
                "CH" + user[2:],
            )
            await conn.execute(
                "INSERT INTO memberships (chat_service_sid, user_sid, conversation_sid)"
                " VALUES ($1, $2, $3)",
                service,
                user,
                "CH" + user[2:],
            )
        ordered = "SELECT user_sid FROM memberships ORDER BY user_sid"
        assert await conn.fetchval(f"SELECT array_agg(user_sid) FROM ({ordered}) o") == [
            "US" + "a" * 32,
            "US" + "A" * 32,
            "US" + "B" * 32,
        ]  # the locale's order: the case is looked at last

        assert "007_sid_collation.sql" in await apply_migrations(icu_db_url)

        assert await conn.fetchval(f"SELECT array_agg(user_sid) FROM ({ordered}) o") == sorted(
            users, key=str.encode
        )  # byte order: A < B < a
        assert await conn.fetchval(
            "SELECT count(*) FROM memberships m JOIN users u USING (chat_service_sid, user_sid)"
        ) == len(users)
        assert (
            await conn.fetchval(
                "SELECT col_description('user_conversations_v'::regclass, attnum) FROM pg_attribute"
                " WHERE attrelid = 'user_conversations_v'::regclass AND attname = 'links'"
            )
            == "The API links (participant, conversation) as jsonb."
        )
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE convsync_reader")
            assert await conn.fetchval("SELECT count(*) FROM user_conversations_v") == len(users)
    finally:
        await conn.close()


async def test_a_migration_behind_a_long_query_steps_aside_and_blocks_nobody(
    empty_db_url: str, empty_db: asyncpg.Connection, migrations_copy: Path
) -> None:
    # A long read (an analyst's query) holds a table a migration must lock exclusively. Queued
    # behind it, the migration's lock request would block every later reader and writer of the
    # table (the live workers') until the read ends. With a lock timeout it steps aside and
    # tries again: a reader meanwhile gets through, and the migration applies once the read ends.
    await apply_migrations(empty_db_url, migrations_copy)
    (migrations_copy / "999_wider.sql").write_text("ALTER TABLE sync_runs ADD COLUMN note text;")
    analyst = await asyncpg.connect(empty_db_url)
    reader = await asyncpg.connect(empty_db_url)
    try:
        async with analyst.transaction():
            await analyst.execute("LOCK TABLE sync_runs IN ACCESS SHARE MODE")
            migrating = asyncio.ensure_future(
                apply_migrations(empty_db_url, migrations_copy, lock_timeout=0.2)
            )

            async def migration_waits_for_its_lock() -> bool:
                waiting = await empty_db.fetchval(
                    "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
                    " WHERE c.relname = 'sync_runs' AND NOT l.granted"
                )
                return bool(waiting)

            await until(migration_waits_for_its_lock, timeout=10, what="the migration queued")
            # The reader is not stuck behind the queued lock for as long as the query runs.
            assert (
                await asyncio.wait_for(reader.fetchval("SELECT count(*) FROM sync_runs"), 10) == 0
            )
            assert not migrating.done(), "the migration waits for the long query"
        assert await asyncio.wait_for(migrating, 30) == ["999_wider.sql"]
    finally:
        await analyst.close()
        await reader.close()
