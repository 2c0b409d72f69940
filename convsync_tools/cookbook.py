"""The SQL cookbook: ``cookbook/*.sql``, documentation SQL each answering one question.

A file starts with a header (``-- title:``, ``-- answers:``, ``-- params: $1 name = example,
...``), then its SQL. This module parses the headers and runs a query with its examples bound,
typed by the server (the demo shows a few; the tests run every one as ``convsync_reader``).
The files stay at the top of the source tree and ship in the wheel as package data
(``convsync_tools/cookbook/``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

import asyncpg

_PARAM = re.compile(r"^\$(\d+)\s+([a-z_][a-z0-9_]*)\s*=\s*(.+)$")


@dataclasses.dataclass(frozen=True)
class Param:
    """One ``$n`` parameter of a cookbook query: its name and example value (as text)."""

    position: int
    name: str
    example: str


@dataclasses.dataclass(frozen=True)
class CookbookQuery:
    """A ``cookbook/*.sql`` file: what it answers, its parameters and its SQL."""

    name: str
    path: Path
    title: str
    answers: str
    params: tuple[Param, ...]
    sql: str


def cookbook_dir() -> Path:
    """The cookbook this package ships (an installed wheel), else its checkout's ``cookbook/``."""
    package = Path(__file__).resolve().parent
    shipped = package / "cookbook"
    return shipped if shipped.is_dir() else package.parent / "cookbook"


def parse_cookbook_file(path: Path) -> CookbookQuery:
    """Parse a cookbook file's header; ValueError naming the file if it is malformed."""
    text = path.read_text(encoding="utf-8")
    fields: dict[str, str] = {}
    key: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        if body or not line.startswith("--"):
            body.append(line)
            continue
        content = line[2:].strip()
        match = re.match(r"^(title|answers|params):\s*(.*)$", content)
        if match:
            key = match.group(1)
            fields[key] = match.group(2)
        elif key is not None and content:
            fields[key] += " " + content
    missing = {"title", "answers", "params"} - set(fields)
    if missing:
        raise ValueError(f"{path.name}: header lacks {', '.join(sorted(missing))}")
    params: list[Param] = []
    if fields["params"].strip() != "none":
        for part in fields["params"].split(","):
            match = _PARAM.match(part.strip())
            if match is None:
                raise ValueError(f"{path.name}: bad parameter {part.strip()!r}")
            params.append(Param(int(match.group(1)), match.group(2), match.group(3).strip()))
    if [p.position for p in params] != list(range(1, len(params) + 1)):
        raise ValueError(f"{path.name}: parameters must be $1..$n in order")
    sql = "\n".join(body).strip()
    if not sql:
        raise ValueError(f"{path.name}: no SQL after the header")
    return CookbookQuery(path.stem, path, fields["title"], fields["answers"], tuple(params), sql)


def load_cookbook(directory: Path | None = None) -> list[CookbookQuery]:
    """Every cookbook query, by file name (empty when the directory does not exist)."""
    directory = cookbook_dir() if directory is None else directory
    return [parse_cookbook_file(p) for p in sorted(directory.glob("*.sql"))]


def example_value(type_name: str, text: str) -> object:
    """A parameter's example text as the Python value asyncpg binds for ``type_name``."""
    if text == "null":
        return None
    if type_name in ("int2", "int4", "int8"):
        return int(text)
    if type_name in ("float4", "float8"):
        return float(text)
    if type_name == "numeric":
        return Decimal(text)
    if type_name == "bool":
        return text.lower() in ("true", "t", "yes", "1")
    if type_name == "timestamptz":
        return datetime.fromisoformat(text)
    if type_name == "date":
        return date.fromisoformat(text)
    if type_name in ("text", "varchar"):
        return text
    raise ValueError(f"no example conversion for parameter type {type_name}")


async def run_cookbook_query(
    conn: asyncpg.Connection, query: CookbookQuery, values: Mapping[str, object] | None = None
) -> list[asyncpg.Record]:
    """Run ``query`` with ``values`` by parameter name, examples for the rest."""
    values = dict(values or {})
    unknown = set(values) - {p.name for p in query.params}
    if unknown:
        raise ValueError(f"{query.name}: no parameters {sorted(unknown)}")
    statement = await conn.prepare(query.sql)
    types = statement.get_parameters()
    if len(types) != len(query.params):
        raise ValueError(
            f"{query.name}: the header lists {len(query.params)} parameters, the SQL has "
            f"{len(types)}"
        )
    args = [
        values[p.name] if p.name in values else example_value(t.name, p.example)
        for p, t in zip(query.params, types, strict=True)
    ]
    rows: list[asyncpg.Record] = await statement.fetch(*args)
    return rows
