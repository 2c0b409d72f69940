"""Fault tests: the figures of what was injected are written at the end of the session."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from tests.conftest import PgServer
from tests.faults.common import FIGURES, FIGURES_PATH, write_figures


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        line = write_figures()
        terminalreporter.write_line(f"convsync fault figures ({FIGURES_PATH}): {line}")


@pytest.fixture
async def admin(pg_server: PgServer) -> AsyncIterator[asyncpg.Connection]:
    """A superuser session on another database of the server (it outlives the failover)."""
    conn = await asyncpg.connect(pg_server.url)
    try:
        if not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
            message = "a read-only failover needs a superuser"
            if os.environ.get("CI") == "true":
                pytest.fail(f"{message} (CI: never skipped)")
            pytest.skip(message)
        yield conn
    finally:
        await conn.close()
