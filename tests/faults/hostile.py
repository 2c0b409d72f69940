"""A hostile Twilio look-alike on 127.0.0.1, for tests/faults/test_hostile_upstream.py.

It serves a ``simdata.Dataset`` through the three listings convsync walks (services, a
service's users, a user's conversations) with Twilio's shape (items under the listing's key,
``meta.next_page_url`` absolute, ``PageToken`` after the first page), honestly, except on the
one page where a ``Trick`` is set: paging loops, a next_page_url into another listing, endless
or enormous bodies, compression bombs, too many items, a 20 MB field, SIDs ending in a newline,
or a 401 that echoes the credentials. It shares no code with the worker's client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import threading
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from aiohttp import web

from convsync_tools.simdata import Dataset

MIB = 1 << 20
GIB = 1 << 30
NUL_MESSAGE = "refused\x00 here \ud800 too"  # what a nul_error says
# What an ``attributes`` trick gives items item..item+2: a number PostgreSQL's numeric cannot
# hold (16,383 digits after the point at most), one beyond a float's range that it holds, and a
# backslash before "u0000" (text, not a NUL escape).
TRICKED_UPDATED = "2099-01-01T00:00:00Z"
TRICKED_ATTRIBUTES = ('{"x": 1e-20000}', '{"x": 1e400}', '{"path": "C:\\\\u0000dir"}')


@dataclass(frozen=True)
class Trick:
    """What to do instead of the honest answer on page ``page`` of the listing at ``path``.

    kind: ``loop`` (page ``page`` links back to page 0: A -> B -> A), ``endless_tokens`` (every
    page links to a new one, forever), ``foreign_next`` (links into the listing at ``target``),
    ``endless_body`` (1 GiB streamed, no Content-Length), ``huge_page`` (a 200 MB page with
    its Content-Length), ``gzip_bomb`` / ``deflate_bomb`` (1 GiB compressed to a few MB),
    ``many_items`` (10,000 items), ``huge_field`` (a 20 MB friendly_name in item 0),
    ``newline_sid`` (item ``item``'s SID followed by "\\n"; ``extra``: as an added item),
    ``echo_401`` (every request: 401 whose message echoes the credentials it was sent),
    ``nul_error`` (a 409 whose message holds a NUL and a lone surrogate, which PostgreSQL's
    text refuses), ``nested_error`` (a 409 whose body nests 100,000 arrays),
    ``bad_port_next`` (a next_page_url whose port is not a number), ``attributes`` (items
    ``item`` to ``item`` + 2 with ``TRICKED_ATTRIBUTES``, updated at ``TRICKED_UPDATED``).
    """

    kind: str
    page: int = 0
    target: str = ""
    item: int = 0
    extra: bool = False


@dataclass
class Served:
    """What the upstream did, per listing path: requests, bytes written before the client left."""

    requests: Counter[str] = field(default_factory=Counter)
    bytes_sent: Counter[str] = field(default_factory=Counter)


class Hostile:
    """The upstream's behaviour (thread-safe enough: set up before the worker starts)."""

    def __init__(self, dataset: Dataset, auth_token: str, echo: tuple[str, ...] = ()) -> None:
        self.dataset = dataset
        self.account_sid = dataset.account_sid
        self.auth_token = auth_token
        self.tricks: dict[str, Trick] = {}
        self.served = Served()
        self.base_url = ""
        self.echo = echo  # more secrets an echoing 401 repeats (as the test wants them tried)

    # -- paths ------------------------------------------------------------------------------

    @staticmethod
    def services_path() -> str:
        return "/v1/Services"

    @staticmethod
    def users_path(service: str) -> str:
        return f"/v1/Services/{service}/Users"

    @staticmethod
    def conversations_path(service: str, user: str) -> str:
        return f"/v1/Services/{service}/Users/{user}/Conversations"

    def page_url(self, path: str, size: int, page: int) -> str:
        if page == 0:
            return f"{self.base_url}{path}?PageSize={size}"
        return f"{self.base_url}{path}?PageSize={size}&Page={page}&PageToken=PT{page}x{size}"

    # -- data -------------------------------------------------------------------------------

    def items(self, path: str) -> tuple[str, list[dict[str, Any]]]:
        parts = path.strip("/").split("/")
        data, base = self.dataset, self.base_url
        if parts == ["v1", "Services"]:
            return "services", data.services(base)
        if len(parts) == 4 and parts[3] == "Users":
            return "users", list(data.expected_users(base, parts[2]))
        if len(parts) == 6 and parts[5] == "Conversations":
            return "conversations", data.memberships(parts[2], parts[4], base)
        raise web.HTTPNotFound(text=json.dumps({"code": 20404, "message": "not found"}))

    # -- serving ----------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.served.requests[path] += 1
        echo = self.tricks.get("*")
        if echo is not None and echo.kind == "echo_401":
            return self.echo_401(request)
        if request.headers.get("Authorization") != "Basic " + self._basic():
            return _twilio_error(401, 20003, "Authenticate")
        size = int(request.query.get("PageSize", "50"))
        page = int(request.query.get("Page", "0"))
        key, items = self.items(path)
        trick = self.tricks.get(path)
        if trick is not None and trick.page == page:
            return await self.play(request, trick, key, items, size, page)
        chunk = items[page * size : (page + 1) * size]
        more = (page + 1) * size < len(items)
        return _json(self.body(key, path, chunk, size, page, more))

    def body(
        self, key: str, path: str, items: list[Any], size: int, page: int, more: bool
    ) -> dict[str, Any]:
        return {
            key: items,
            "meta": {
                "page": page,
                "page_size": size,
                "first_page_url": self.page_url(path, size, 0),
                "previous_page_url": self.page_url(path, size, page - 1) if page else None,
                "url": self.page_url(path, size, page),
                "next_page_url": self.page_url(path, size, page + 1) if more else None,
                "key": key,
            },
        }

    async def play(
        self,
        request: web.Request,
        trick: Trick,
        key: str,
        items: list[dict[str, Any]],
        size: int,
        page: int,
    ) -> web.StreamResponse:
        path = request.path
        chunk = [dict(i) for i in items[page * size : (page + 1) * size]]
        body = self.body(key, path, chunk, size, page, more=True)
        meta = body["meta"]
        if trick.kind == "loop":
            if page == 0:
                meta["next_page_url"] = self.page_url(path, size, 1)
                self.tricks[path] = Trick("loop", 1)
            else:
                meta["next_page_url"] = meta["first_page_url"] + "&Page=0"  # back to A
            return _json(body)
        if trick.kind == "endless_tokens":
            self.tricks[path] = Trick("endless_tokens", page + 1)
            return _json(body)
        if trick.kind == "foreign_next":
            meta["next_page_url"] = self.page_url(trick.target, size, 1)
            return _json(body)
        if trick.kind == "many_items":
            template = items[0]
            body[key] = [{**template, "conversation_sid": f"CH{n:032x}"} for n in range(10_000)]
            return _json(body)
        if trick.kind == "huge_field":
            chunk[0]["friendly_name"] = "x" * (20 * 1000 * 1000)
            return _json(body)
        if trick.kind == "newline_sid":
            name = {"services": "sid", "users": "sid", "conversations": "conversation_sid"}[key]
            bad = dict(items[trick.item])
            bad[name] += "\n"
            if trick.extra:
                chunk.append(bad)
            else:
                chunk[trick.item - page * size] = bad
            body["meta"]["next_page_url"] = (
                self.page_url(path, size, page + 1) if (page + 1) * size < len(items) else None
            )
            return _json(body)
        if trick.kind == "attributes":
            for offset, attributes in enumerate(TRICKED_ATTRIBUTES):
                tricked = chunk[trick.item + offset - page * size]
                tricked["attributes"] = attributes
                tricked["date_updated"] = TRICKED_UPDATED  # newer: it wins over other members'
            return _json(body)
        if trick.kind == "nul_error":
            return _twilio_error(409, 50000, NUL_MESSAGE)
        if trick.kind == "nested_error":
            return web.Response(status=409, body=b"[" * 100_000, content_type="application/json")
        if trick.kind == "bad_port_next":
            origin = urlsplit(self.base_url)
            meta["next_page_url"] = f"{origin.scheme}://{origin.hostname}:abc{path}?Page=1"
            return _json(body)
        if trick.kind == "endless_body":
            return await self.stream(request, path, b'{"%s": [' % key.encode(), GIB, None)
        if trick.kind == "huge_page":
            total = 200 * 1000 * 1000
            head = b'{"%s": [' % key.encode()
            tail = b'], "meta": {"next_page_url": null}}'
            return await self.stream(request, path, head, total - len(tail), total, tail)
        if trick.kind in ("gzip_bomb", "deflate_bomb"):
            encoding = "gzip" if trick.kind == "gzip_bomb" else "deflate"
            bomb = compression_bomb(encoding, key)
            self.served.bytes_sent[path] += len(bomb)
            return web.Response(
                body=bomb,
                headers={"Content-Type": "application/json", "Content-Encoding": encoding},
            )
        raise AssertionError(f"unknown trick {trick.kind}")

    async def stream(
        self,
        request: web.Request,
        path: str,
        head: bytes,
        size: int,
        content_length: int | None,
        tail: bytes = b"",
    ) -> web.StreamResponse:
        """Write ``head`` then whitespace up to ``size`` bytes (then ``tail``), counting what
        the client took before it hung up."""
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if content_length is not None:
            response.content_length = content_length
        await response.prepare(request)
        filler = b" " * MIB
        with contextlib.suppress(ConnectionError):
            await response.write(head)
            sent = len(head)
            while sent < size:
                piece = filler[: min(MIB, size - sent)]
                await response.write(piece)
                sent += len(piece)
                self.served.bytes_sent[path] += len(piece)
            await response.write(tail)
            await response.write_eof()
        return response

    def echo_401(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        decoded = base64.b64decode(header.removeprefix("Basic ")).decode(errors="replace")
        secrets = " ".join(f"{s} {quote(s, safe='')}" for s in self.echo)
        message = f"Authenticate: the header was {header!r}, that is {decoded!r}; known: {secrets}"
        return _twilio_error(401, 20003, message)

    def _basic(self) -> str:
        return base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()


@functools.cache
def compression_bomb(encoding: str, key: str) -> bytes:
    """A JSON page's opening then 1 GiB of whitespace, compressed (a few MB)."""
    wbits = 31 if encoding == "gzip" else 15
    compressor = zlib.compressobj(1, zlib.DEFLATED, wbits)
    filler = b" " * MIB
    parts = [compressor.compress(b'{"%s": [' % key.encode())]
    parts += [compressor.compress(filler) for _ in range(GIB // MIB)]
    parts.append(compressor.flush())
    return b"".join(parts)


def _json(body: Any) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), content_type="application/json")


def _twilio_error(status: int, code: int, message: str) -> web.Response:
    payload = {"code": code, "message": message, "more_info": "", "status": status}
    return web.Response(
        status=status, body=json.dumps(payload).encode(), content_type="application/json"
    )


class HostileServer:
    """Runs a ``Hostile`` on 127.0.0.1 (ephemeral port) in a thread of its own."""

    def __init__(self, hostile: Hostile) -> None:
        self.hostile = hostile
        self.url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="hostile-upstream", daemon=True)

    def __enter__(self) -> HostileServer:
        self._thread.start()
        assert self._ready.wait(10), "the hostile upstream did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.hostile.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        self.url = self.hostile.base_url = f"http://127.0.0.1:{port}"
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
