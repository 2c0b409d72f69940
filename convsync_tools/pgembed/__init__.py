"""A PostgreSQL for tests, the demo and the benchmark, in four parts, in the order they act:

- ``locate``: which URL to use (``find_or_start``): one the environment names, a local
  trust-auth server, or a server of our own;
- ``probe``: asking a server something through asyncpg, synchronously (readiness, the local
  probe, ``CREATE DATABASE``);
- ``runas`` and ``binaries``: as root, the unprivileged OS user the server runs as (created
  with useradd, handed the data directory); which ``initdb``/``postgres`` to run;
- ``server``: ``LocalPostgres``, our own server's lifecycle (initdb, start, stop, restart).

Nothing of the worker is imported here: the runtime never needs a server of its own.
"""

from convsync_tools.errors import NoPostgresBinaries, PgEmbedError
from convsync_tools.pgembed.binaries import Binaries, find_binaries
from convsync_tools.pgembed.locate import DEMO_DATA_DIR, DEMO_DATABASE, explicit_url, find_or_start
from convsync_tools.pgembed.probe import (
    SUPERUSER,
    Endpoint,
    current_os_user,
    ensure_database,
    find_local_server,
    quote_ident,
    run_sql,
)
from convsync_tools.pgembed.runas import RunAs, server_os_user
from convsync_tools.pgembed.server import LocalPostgres, StopMode

__all__ = [
    "DEMO_DATABASE",
    "DEMO_DATA_DIR",
    "SUPERUSER",
    "Binaries",
    "Endpoint",
    "LocalPostgres",
    "NoPostgresBinaries",
    "PgEmbedError",
    "RunAs",
    "StopMode",
    "current_os_user",
    "ensure_database",
    "explicit_url",
    "find_binaries",
    "find_local_server",
    "find_or_start",
    "quote_ident",
    "run_sql",
    "server_os_user",
]
