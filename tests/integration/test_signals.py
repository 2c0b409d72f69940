"""SIGTERM and SIGINT reach every command at once, whatever it waits on (real signals to real
processes): a database that accepts connections and never answers, the migrations lock held
by someone else, a migration half-way through its transaction. Each stops within a second,
exit 1, no traceback, nothing half-applied. (A pass's grace: test_service.py.)"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.harness import scalar, spawn_convsync, until
from worker.migrate import MIGRATION_LOCK_KEY, MIGRATIONS_DIR, load_migrations

STOP_WITHIN = 1.0  # seconds from the signal to the process's exit
CREDENTIALS = {
    "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
    "TWILIO_AUTH_TOKEN": "not-used-here",
    "CONVSYNC_LOG_FORMAT": "json",
}


class Unresponsive:
    """A TCP server that accepts connections and never answers (a hung database)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    @property
    def url(self) -> str:
        return f"postgresql://convsync@127.0.0.1:{self.port}/convsync"

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def hung_db() -> Iterator[Unresponsive]:
    server = Unresponsive()
    yield server
    server.close()


def stop(child: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[float, str]:
    """Send ``sig``; (seconds until the process exited, its stderr)."""
    started = time.monotonic()
    child.send_signal(sig)
    try:
        _, stderr = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    return time.monotonic() - started, stderr


async def waiting_on_lock(db_url: str) -> bool:
    return bool(
        await scalar(
            db_url,
            "SELECT count(*) > 0 FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("command", ["migrate", "sync", "status"])
async def test_a_command_stops_at_once_while_the_database_never_answers(
    hung_db: Unresponsive, command: str, sig: int
) -> None:
    child = spawn_convsync([command], {**CREDENTIALS, "DATABASE_URL": hung_db.url})
    await until(lambda: _true(bool(hung_db.accepted)), timeout=30, what="a connection")
    seconds, stderr = stop(child, sig)
    assert seconds < STOP_WITHIN, f"{command}: {seconds:.2f} s"
    assert child.returncode == 1, stderr
    assert f"stopped by {signal.Signals(sig).name}" in stderr
    assert "Traceback" not in stderr


async def test_migrate_waiting_on_the_migrations_lock_stops_at_once_applying_nothing(
    empty_db_url: str,
) -> None:
    holder = await asyncpg.connect(empty_db_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        child = spawn_convsync(["migrate"], {"DATABASE_URL": empty_db_url, **CREDENTIALS})
        await until(lambda: waiting_on_lock(empty_db_url), timeout=30, what="migrate to wait")
        seconds, stderr = stop(child)
    finally:
        await holder.close()
    assert seconds < STOP_WITHIN, f"{seconds:.2f} s"
    assert child.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert await scalar(empty_db_url, "SELECT to_regclass('sync_runs')") is None


async def test_migrate_stopped_inside_a_migration_leaves_it_unapplied(
    empty_db_url: str, tmp_path: Path
) -> None:
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, directory)
    (directory / "999_slow.sql").write_text(
        "CREATE TABLE half_applied (id int);\nSELECT pg_sleep(60);\n", encoding="utf-8"
    )
    env = {"DATABASE_URL": empty_db_url, "CONVSYNC_MIGRATIONS_DIR": str(directory), **CREDENTIALS}
    child = spawn_convsync(["migrate"], env)

    async def sleeping() -> bool:
        return bool(
            await scalar(
                empty_db_url,
                "SELECT count(*) > 0 FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%' "
                "AND pid <> pg_backend_pid()",
            )
        )

    async def ended() -> bool:
        return not await sleeping()

    await until(sleeping, timeout=30, what="the slow migration to run")
    seconds, stderr = stop(child)
    assert seconds < STOP_WITHIN, f"{seconds:.2f} s"
    assert child.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert await scalar(empty_db_url, "SELECT to_regclass('half_applied')") is None
    applied = await scalar(
        empty_db_url, "SELECT array_agg(name ORDER BY name) FROM schema_migrations"
    )
    assert applied == [m.name for m in load_migrations()], "the earlier ones stay applied"
    await until(ended, timeout=10, what="the server to end the statement")


async def _true(value: bool) -> bool:
    return value
