"""Throwaway PostgreSQL databases for one benchmark run."""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from convsync_tools import pgembed
from convsync_tools.pgembed import LocalPostgres, quote_ident


def with_database(url: str, name: str) -> str:
    """``url`` pointed at database ``name``."""
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def with_password(url: str, password: str = "bench") -> str:
    """``url`` with a placeholder password if it has none (dlt insists on one; trust auth and
    peer sockets ignore it)."""
    parts = urlsplit(url)
    if parts.password is not None or not parts.username:
        return url
    host = parts.netloc.split("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{password}@{host}"))


class Databases:
    """Creates ``convsync_bench_<random>_<name>`` databases on one server, drops them all."""

    def __init__(self) -> None:
        self.admin_url, self._local = pgembed.find_or_start("test")
        self._prefix = f"convsync_bench_{secrets.token_hex(3)}"
        self._made: list[str] = []

    async def create(self, name: str) -> str:
        """A fresh empty database; its URL."""
        full = f"{self._prefix}_{name}"
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f"CREATE DATABASE {quote_ident(full)}")
        finally:
            await conn.close()
        self._made.append(full)
        return with_database(self.admin_url, full)

    async def drop_all(self) -> None:
        """Drop every database this object created, their sessions ended (``FORCE``: one a
        left-over child reopens meanwhile too); one that cannot be dropped does not keep the
        others: each is tried, and the first error raised after."""
        conn = await asyncpg.connect(self.admin_url)
        failed: list[BaseException] = []
        try:
            for name in self._made:
                try:
                    await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
                except asyncpg.PostgresError as error:
                    failed.append(error)
        finally:
            await conn.close()
        self._made.clear()
        if failed:
            raise failed[0]

    def close(self) -> None:
        """Stop the server if this run started it."""
        local: LocalPostgres | None = self._local
        self._local = None
        if local is not None:
            local.close()
