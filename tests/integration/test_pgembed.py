"""pgembed: our own PostgreSQL for real (start, connect, restart, stop) and the fallback chain."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from convsync_tools import pgembed
from convsync_tools.pgembed import Endpoint, LocalPostgres, NoPostgresBinaries, PgEmbedError
from tests.conftest import PgServer


@pytest.fixture
def pg_dir() -> Iterator[Path]:
    """A scratch directory for data dirs and sockets, reachable by the server's OS user.

    Not pytest's tmp_path: as root the server runs as another user, and every pytest session
    that starts resets /tmp/pytest-of-root to 0700, which would cut off a server under it.
    """
    path = Path(tempfile.mkdtemp(prefix="convsync-pgtest-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


async def _refused(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=5)
    except (OSError, asyncpg.PostgresError):
        return True
    await conn.close()
    return False


async def test_own_server_starts_in_a_temp_dir_serves_and_stops_cleanly() -> None:
    server = LocalPostgres()
    url = await server.astart()
    try:
        assert server.running
        assert url == f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
        conn = await asyncpg.connect(url)
        try:
            data_dir = await conn.fetchval("SELECT current_setting('data_directory')")
            assert Path(data_dir) == server.data_dir
            assert await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = 'postgres'")
        finally:
            await conn.close()
        pid = server.pid
        assert pid is not None
        if os.geteuid() == 0:  # initdb/postgres refuse root: the server runs unprivileged
            assert _uid_of(pid) != 0
        temp_dir = server.data_dir
    finally:
        server.close()
    assert not server.running
    assert not temp_dir.exists()
    assert not Path(f"/proc/{pid}").exists()
    assert await _refused(url)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_restart_keeps_url_and_committed_data(
    pg_restartable: LocalPostgres, mode: pgembed.StopMode
) -> None:
    url = pg_restartable.url
    conn = await asyncpg.connect(url)
    table = f"restart_{mode}"
    await conn.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (v int)")
    await conn.execute(f"INSERT INTO {table} VALUES (42)")
    await pg_restartable.astop(mode)
    assert not pg_restartable.running
    with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError, OSError)):
        await conn.fetchval("SELECT 1")
    await conn.close()
    assert await _refused(url)

    assert await pg_restartable.astart() == url
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval(f"SELECT v FROM {table}") == 42
        await conn.execute(f"DROP TABLE {table}")
    finally:
        await conn.close()


async def test_arestart_returns_the_same_url_and_a_new_postmaster(
    pg_restartable: LocalPostgres,
) -> None:
    before = pg_restartable.pid
    assert await pg_restartable.arestart() == pg_restartable.url
    assert pg_restartable.pid not in (None, before)
    conn = await asyncpg.connect(pg_restartable.url)
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()


async def test_restartable_db_url_is_migrated(restartable_db_url: str) -> None:
    conn = await asyncpg.connect(restartable_db_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") >= 2
    finally:
        await conn.close()


async def test_persistent_data_dir_survives_close_and_is_reused(pg_dir: Path) -> None:
    data_dir = pg_dir / "pgdata"
    url, server = pgembed.find_or_start("demo", data_dir, env={})
    assert server is not None
    assert url.endswith(f"/{pgembed.DEMO_DATABASE}")
    try:
        conn = await asyncpg.connect(url)
        await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('yes')")
        await conn.close()
    finally:
        server.close()
    assert (data_dir / "PG_VERSION").exists()

    url2, server2 = pgembed.find_or_start("demo", data_dir, env={})
    assert server2 is not None
    try:
        assert server2.initdb_seconds is None  # no second initdb
        conn = await asyncpg.connect(url2)
        assert await conn.fetchval("SELECT v FROM kept") == "yes"
        await conn.close()
    finally:
        server2.close()


def test_leftover_postmaster_on_the_data_dir_is_stopped_before_start(pg_dir: Path) -> None:
    data_dir = pg_dir / "pgdata"
    first = LocalPostgres(data_dir)
    first.start()
    assert first._running is not None
    orphan = first._running.process
    first._running = None  # forget it, as if our process had died
    second = LocalPostgres(data_dir)
    try:
        second.start()
        assert orphan.wait(5) == 0  # asked to shut down (fast), not killed
        assert second.pid != orphan.pid
        assert pgembed.run_sql(second.endpoint, "postgres", "postgres", "SELECT 1") == [(1,)]
    finally:
        second.close()
        first.close()
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_a_taken_fixed_port_is_an_error_not_someone_elses_server() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = LocalPostgres(port=busy.getsockname()[1], start_timeout=20)
        try:
            with pytest.raises(PgEmbedError, match="taken"):
                server.start()
            assert not server.running
        finally:
            server.close()


def test_no_binaries_of_the_needed_version_is_a_clear_error() -> None:
    with pytest.raises(NoPostgresBinaries, match="the data needs 999"):
        pgembed.find_binaries(pgembed.server_os_user(), major=999)


# --- the fallback chain ---------------------------------------------------------------------


def test_test_database_url_wins_over_database_url_and_is_used_as_is() -> None:
    env = {"TEST_DATABASE_URL": "postgresql://t@db.invalid/x", "DATABASE_URL": "postgresql://d/y"}
    started = time.monotonic()
    assert pgembed.find_or_start("test", env=env) == ("postgresql://t@db.invalid/x", None)
    assert time.monotonic() - started < 0.5  # nothing probed, nothing started
    assert pgembed.find_or_start("test", env={"DATABASE_URL": "postgresql://d/y"}) == (
        "postgresql://d/y",
        None,
    )


def test_demo_uses_database_url_and_ignores_test_database_url() -> None:
    env = {"TEST_DATABASE_URL": "postgresql://t/x", "DATABASE_URL": "postgresql://d/y"}
    assert pgembed.find_or_start("demo", env=env) == ("postgresql://d/y", None)


async def test_tests_prefer_a_reachable_local_server(pg_restartable: LocalPostgres) -> None:
    url, handle = pgembed.find_or_start("test", env={}, probe=[pg_restartable.endpoint])
    assert handle is None
    assert url == pg_restartable.url
    conn = await asyncpg.connect(url)
    assert await conn.fetchval("SELECT current_user") == "postgres"
    await conn.close()


async def test_without_explicit_or_local_server_tests_start_their_own(pg_dir: Path) -> None:
    url, handle = pgembed.find_or_start("test", pg_dir / "data", env={"CONVSYNC_PG_LOCAL": "0"})
    assert handle is not None
    try:
        conn = await asyncpg.connect(url)
        assert await conn.fetchval("SELECT current_setting('data_directory')") == str(
            (pg_dir / "data").resolve()
        )
        await conn.close()
    finally:
        handle.close()


def test_probe_gives_up_on_refused_and_silent_endpoints_within_its_timeout() -> None:
    with socket.socket() as silent, socket.socket() as closed:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts TCP, never answers the startup packet
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
        endpoints = [
            Endpoint("127.0.0.1", closed.getsockname()[1]),
            Endpoint("127.0.0.1", silent.getsockname()[1]),
        ]
        started = time.monotonic()
        assert pgembed.find_local_server(0.5, endpoints) is None
        assert time.monotonic() - started < 1.5


def test_probe_skips_a_role_that_cannot_create_databases(pg_restartable: LocalPostgres) -> None:
    me = pgembed.current_os_user()
    if me == pgembed.SUPERUSER:
        pytest.skip("the OS user is the server's superuser")
    endpoint = pg_restartable.endpoint
    role = pgembed.quote_ident(me)
    pgembed.run_sql(endpoint, "postgres", "postgres", f"CREATE ROLE {role} LOGIN NOCREATEDB")
    try:
        # The OS user's role exists and logs in, but may not create databases: skipped.
        assert pgembed.run_sql(endpoint, me, "postgres", "SELECT current_user") == [(me,)]
        assert pgembed.find_local_server(1.0, [endpoint]) == pg_restartable.url
        pgembed.run_sql(endpoint, "postgres", "postgres", f"ALTER ROLE {role} CREATEDB")
        assert pgembed.find_local_server(1.0, [endpoint]) == endpoint.url(me, "postgres")
    finally:
        pgembed.run_sql(endpoint, "postgres", "postgres", f"DROP ROLE {role}")


async def test_unix_socket_endpoints_are_probed_and_give_asyncpg_urls(pg_dir: Path) -> None:
    sockets = pg_dir / "sockets"
    sockets.mkdir()
    sockets.chmod(0o777)  # as root, the server runs as another OS user
    with LocalPostgres(settings={"unix_socket_directories": str(sockets)}) as server:
        endpoint = Endpoint(str(sockets), server.port)
        url = pgembed.find_local_server(1.0, [endpoint])
        assert url == f"postgresql://postgres@/postgres?host={sockets}&port={server.port}"
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT inet_server_addr()") is None  # not TCP
        finally:
            await conn.close()


def test_session_server_is_usable(pg_server: PgServer) -> None:
    assert pg_server.url.startswith("postgresql://")
    if pg_server.local is not None:
        assert pg_server.local.running


def test_run_sql_reports_server_errors_with_sqlstate(pg_restartable: LocalPostgres) -> None:
    with pytest.raises(asyncpg.PostgresError) as caught:
        pgembed.run_sql(pg_restartable.endpoint, "postgres", "postgres", "SELECT 1/0")
    assert caught.value.sqlstate == "22012"
    rows = pgembed.run_sql(
        pg_restartable.endpoint, "postgres", "postgres", "SELECT NULL::text, 'é'"
    )
    assert rows == [(None, "é")]
