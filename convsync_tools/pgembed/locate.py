"""Choosing the PostgreSQL URL that tests and the demo use (``find_or_start``).

1. explicit: ``TEST_DATABASE_URL`` then ``DATABASE_URL`` for tests, ``DATABASE_URL`` for the
   demo; used as-is;
2. tests only: a local server with trust auth (127.0.0.1:5432, /var/run/postgresql, /tmp; as
   the current OS user or ``postgres``) whose role may create databases, probed in ~1 s;
3. a server of our own (``LocalPostgres``): a temp data directory for tests,
   ``.convsync/pgdata`` for the demo (kept between runs). The demo falls back to step 2 when
   no PostgreSQL binaries exist.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from convsync_tools.errors import NoPostgresBinaries
from convsync_tools.pgembed.probe import (
    SUPERUSER,
    Endpoint,
    ensure_database,
    find_local_server,
    probe_local,
)
from convsync_tools.pgembed.server import LocalPostgres

Purpose = Literal["test", "demo"]

DEMO_DATA_DIR = Path(".convsync/pgdata")
DEMO_DATABASE = "convsync"


def explicit_url(purpose: Purpose, env: Mapping[str, str] | None = None) -> str | None:
    """The URL the environment names for ``purpose``, if any."""
    env = os.environ if env is None else env
    names = ("TEST_DATABASE_URL", "DATABASE_URL") if purpose == "test" else ("DATABASE_URL",)
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


# How long the local endpoints may take to answer, in all. Found at once where a server
# listens, refused at once where none does; on a busy 2-core machine the probe took over a
# second, and with 1 s the tests started a server of their own (one built without ICU and lz4,
# so two tests skipped) beside the machine's.
PROBE_SECONDS = 5.0


def find_or_start(
    purpose: Purpose,
    data_dir: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    probe: Sequence[Endpoint] | None = None,
    probe_timeout: float = PROBE_SECONDS,
) -> tuple[str, LocalPostgres | None]:
    """A URL to use and, when we started the server, its handle (the caller closes it).

    Tests get an admin URL (a role that may create databases); the demo gets the URL of
    database ``convsync`` (created if missing) unless ``DATABASE_URL`` names one. ``probe``:
    the local endpoints to try (default ``local_endpoints()``; none when the environment
    has ``CONVSYNC_PG_LOCAL=0``, which makes tests start their own server).
    """
    env = os.environ if env is None else env
    url = explicit_url(purpose, env)
    if url is not None:
        return url, None
    if probe is None and env.get("CONVSYNC_PG_LOCAL", "").strip() == "0":
        probe = ()
    if purpose == "test":
        url = find_local_server(probe_timeout, probe)
        if url is not None:
            return url, None
        server = LocalPostgres(data_dir)
        return server.start(), server
    server = LocalPostgres(data_dir if data_dir is not None else DEMO_DATA_DIR)
    try:
        server.start()
    except NoPostgresBinaries:
        found = probe_local(probe_timeout, probe)
        if found is None:
            raise
        return ensure_database(*found, DEMO_DATABASE), None
    try:
        return ensure_database(server.endpoint, SUPERUSER, DEMO_DATABASE), server
    except BaseException:
        server.close()
        raise
