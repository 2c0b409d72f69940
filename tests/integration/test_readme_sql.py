"""Every SQL statement shown in README.md is valid against the real, migrated schema."""

from __future__ import annotations

import re

import asyncpg

from tests.harness import REPO


def readme_statements() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    statements = []
    for block in re.findall(r"```sql\n(.*?)```", text, re.S):
        body = "\n".join(line for line in block.splitlines() if not line.startswith("--"))
        statements += [s.strip() for s in body.split(";") if s.strip()]
    return statements


def test_readme_has_sql() -> None:
    assert len(readme_statements()) >= 4


async def test_every_readme_statement_prepares_as_the_reader(db: asyncpg.Connection) -> None:
    async with db.transaction():
        await db.execute("SET LOCAL ROLE convsync_reader")
        for statement in readme_statements():
            await db.prepare(statement)  # parses, resolves every name, checks permissions
