"""The parser's rule for JSON numbers in attributes, checked against PostgreSQL itself: a number
it lets through jsonb stores, one it quarantines jsonb refuses (``worker.model.numeric_holds``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.conftest import PgServer
from worker.model import numeric_holds

# Around each of numeric's bounds (131,072 digits before the point, 16,383 after it, an exponent
# under 2**30 - 1), written the ways JSON allows: signs, points, zeros before and after digits.
LITERALS = [
    "0",
    "-0",
    "12",
    "1e400",
    "-1E+400",
    "1e131071",
    "9.99e131071",
    "1e131072",
    "0.001e131074",
    "0.001e131075",
    "0.0012e131074",
    "0.0012e131075",
    "1" + "0" * 131071,
    "1" + "0" * 131072,
    "1e-16383",
    "1e-16384",
    "0.5e-16382",
    "0.5e-16383",
    "1." + "0" * 16383,
    "1." + "0" * 16384,
    "0e-16383",
    "0e-16384",
    "-0.0e-99999",
    "0e1073741822",
    "0e1073741823",
    "0e99999999999",
    "1e-20000",
    "123.456e-16380",
    "123.456e-16381",
]


@pytest.fixture
async def conn(pg_server: PgServer) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_server.url)
    yield connection
    await connection.close()


@pytest.mark.parametrize("literal", LITERALS, ids=lambda text: text[:24])
async def test_numeric_holds_what_jsonb_stores_and_nothing_else(
    conn: asyncpg.Connection, literal: str
) -> None:
    try:
        await conn.fetchval("SELECT ('{\"x\": ' || $1 || '}')::jsonb IS NOT NULL", literal)
    except asyncpg.NumericValueOutOfRangeError:
        stored = False
    else:
        stored = True
    assert numeric_holds(literal) is stored
