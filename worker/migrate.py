"""Apply ``migrations/*.sql`` in order, once each, under a PostgreSQL advisory lock.

The files stay at the top of the source tree and ship in the wheel as package data
(``worker/migrations/``): an installed ``convsync migrate`` needs no configuration.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog

from worker.errors import MigrationError
from worker.metrics import metrics
from worker.retry import Backoff, retrying


def _default_migrations_dir() -> Path:
    """$CONVSYNC_MIGRATIONS_DIR, else the migrations the package ships (``worker/migrations/``
    in a wheel), else those of the checkout the package runs from (top-level ``migrations/``)."""
    configured = os.environ.get("CONVSYNC_MIGRATIONS_DIR", "").strip()
    if configured:
        return Path(configured)
    package = Path(__file__).resolve().parent
    shipped = package / "migrations"
    return shipped if shipped.is_dir() else package.parent / "migrations"


MIGRATIONS_DIR = _default_migrations_dir()
# A migration waits this long at most for a table's lock, then steps aside and is tried again
# whole (its transaction rolled back): a lock request waiting in a table's queue blocks every
# later request on that table, the live workers' too, so behind a long query (an analyst's) a
# migration must not stall the service for as long as the query runs. Given up after
# LOCK_WAIT_SECONDS in all.
LOCK_TIMEOUT_SECONDS = 5.0
LOCK_WAIT_SECONDS = 600.0
# pg_advisory_lock key: "convsync" as a 64-bit number, shared by every replica.
MIGRATION_LOCK_KEY = int.from_bytes(hashlib.sha256(b"convsync-migrations").digest()[:8], "big") >> 1

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Migration:
    """One SQL file: its name (which orders it) and content checksum."""

    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files, sorted by name."""
    files = sorted(directory.glob("*.sql"))
    if not files:
        raise MigrationError(f"no migrations found in {directory}")
    return [Migration(f.name, f.read_text(encoding="utf-8")) for f in files]


async def apply_migrations(
    dsn: str, directory: Path = MIGRATIONS_DIR, *, lock_timeout: float = LOCK_TIMEOUT_SECONDS
) -> list[str]:
    """Apply pending migrations; return the names applied now. Safe to run concurrently; a
    migration whose table another session holds waits ``lock_timeout`` at most at a time
    (``LOCK_TIMEOUT_SECONDS``)."""
    migrations = load_migrations(directory)
    conn = await asyncpg.connect(dsn)
    try:
        # A session lock on a dedicated connection: held until we unlock or disconnect.
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       name text PRIMARY KEY,
                       checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            rows = await conn.fetch("SELECT name, checksum FROM schema_migrations")
            applied = {r["name"]: r["checksum"] for r in rows}
            done: list[str] = []
            for migration in migrations:
                if migration.name in applied:
                    if applied[migration.name] != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.name} changed after it was applied"
                        )
                    continue
                await _apply(conn, migration, lock_timeout)
                log.info("migration_applied", migration=migration.name)
                done.append(migration.name)
            return done
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    finally:
        await conn.close()


async def _apply(conn: asyncpg.Connection, migration: Migration, lock_timeout: float) -> None:
    """One migration and its record, in one transaction; tried again while a table it locks
    is held by another session past ``lock_timeout`` (for ``LOCK_WAIT_SECONDS`` at most)."""

    async def attempt() -> None:
        async with conn.transaction():
            await conn.execute(
                "SELECT set_config('lock_timeout', $1, true)", f"{round(lock_timeout * 1000)}ms"
            )
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)",
                migration.name,
                migration.checksum,
            )

    def give_up(error: BaseException, attempts: int, waited: float) -> BaseException:
        return MigrationError(
            f"migration {migration.name}: a table it changes stayed locked by other sessions "
            f"({attempts} attempts, {waited:.0f}s); try again when they are done"
        )

    await retrying(
        attempt,
        target="migration_lock",
        retry_on=(asyncpg.LockNotAvailableError,),
        backoff=Backoff(max_attempts=None, max_seconds=LOCK_WAIT_SECONDS, cap=5.0),
        give_up=give_up,
        metrics=metrics,
        level="warning",
        describe=lambda: {"migration": migration.name},
    )


async def pending_migrations(
    conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR
) -> list[str]:
    """Names of migrations not yet applied (all of them if the table does not exist)."""
    names = [m.name for m in load_migrations(directory)]
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return names
    applied = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
    return [n for n in names if n not in applied]
