"""DATABASE_URL's query, against a real server: what the configuration refuses as libpq's alone
PostgreSQL would refuse at connection (asyncpg sends it as a setting); what it lets through,
the server takes."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.conftest import PgServer
from worker.config import LIBPQ_ONLY_PARAMETERS, validate_database_url
from worker.errors import ConfigError


def with_query(url: str, key: str, value: str) -> str:
    parts = urlsplit(url)
    query = "&".join(filter(None, [parts.query, f"{key}={value}"]))
    return urlunsplit(parts._replace(query=query))


# replication=1 is taken: it opens a walsender, which runs no SQL (refused for that).
@pytest.mark.parametrize("key", sorted(LIBPQ_ONLY_PARAMETERS - {"replication"}))
async def test_a_libpq_parameter_refused_by_the_configuration_is_refused_by_the_server(
    pg_server: PgServer, key: str
) -> None:
    url = with_query(pg_server.url, key, "1")
    with pytest.raises(ConfigError, match=f"DATABASE_URL: {key} is"):
        validate_database_url(url)
    with pytest.raises(asyncpg.PostgresError, match="unrecognized configuration parameter"):
        await asyncpg.connect(url)


async def test_a_server_setting_in_the_query_is_let_through_and_taken(pg_server: PgServer) -> None:
    url = with_query(pg_server.url, "application_name", "convsync-url-test")
    assert validate_database_url(url) == url
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SHOW application_name") == "convsync-url-test"
    finally:
        await conn.close()
