"""HTTP to Twilio: auth, timeouts, retries with backoff, the adaptive limiter, paging.

The client never touches the database. It turns every response into a ``Page`` or one of the
errors of ``worker.errors``; what to do about a failure is the caller's policy.

What an upstream may send is bounded here: a body by CONVSYNC_MAX_RESPONSE_BYTES (counted as
it streams in, after decompression), a page's items by the PageSize asked for, a listing by
``ListingGuard`` (no page served twice, at most CONVSYNC_MAX_PAGES), and a next_page_url must
stay within its listing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote, unquote_plus, urlsplit

import aiohttp
import msgspec
import structlog
import yarl

from worker.config import Settings
from worker.errors import (
    AuthError,
    ConnectionFailed,
    Interrupted,
    ListingRefused,
    MalformedPage,
    PageTokenRejected,
    RateLimited,
    ResponseTooLarge,
    RetriesExhausted,
    ServerError,
    TransientError,
    UnexpectedResponse,
    UserGone,
)
from worker.limiter import AdaptiveLimiter, TokenBucket
from worker.logs import redact
from worker.metrics import Metrics
from worker.metrics import metrics as default_metrics
from worker.model import ENVELOPES, decode_typed_page
from worker.retry import Backoff, retrying

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Twilio error codes for a page token it will not honour (invalid or expired).
PAGE_TOKEN_ERROR_CODES = frozenset({20001, 21481})


def services_path(page_size: int) -> str:
    return f"/v1/Services?PageSize={page_size}"


def service_path(service_sid: str) -> str:
    return f"/v1/Services/{quote(service_sid, safe='')}"


def users_path(service_sid: str, page_size: int) -> str:
    return f"/v1/Services/{quote(service_sid, safe='')}/Users?PageSize={page_size}"


def user_conversations_path(service_sid: str, user_sid: str, page_size: int) -> str:
    return (
        f"/v1/Services/{quote(service_sid, safe='')}/Users/{quote(user_sid, safe='')}"
        f"/Conversations?PageSize={page_size}"
    )


def page_token(path: str) -> str | None:
    """The PageToken in a page path, if any (for logs and status)."""
    return next((v for k, v in _query(path) if k == "PageToken" and v), None)


def _query(path: str) -> list[tuple[str, str]]:
    """The decoded query parameters of a path, in order (as ``parse_qsl`` with blank values
    kept reads them, at a fraction of its cost)."""
    query = path.partition("?")[2].partition("#")[0]
    pairs = (part.partition("=") for part in query.split("&") if part)
    if "%" not in query and "+" not in query:  # nothing to decode: most pages' queries
        return [(name, value) for name, _, value in pairs]
    return [(unquote_plus(name), unquote_plus(value)) for name, _, value in pairs]


@dataclass(frozen=True)
class Page:
    """One list page: its items (decoded and checked in C where the model has a schema for them,
    ``msgspec.Raw`` still undecoded, or Python values when the body needed the lenient
    decoder), the path of the next page (None on the last), and the
    body as received (the hot path hands it to the database as it is)."""

    path: str
    items: list[Any]
    next_page_path: str | None
    body: bytes = b""


class ListingGuard:
    """One walk through a listing: refuses a page the listing already served (a paging loop,
    however long) and more than ``max_pages`` pages. Memory: two 16-byte digests per page.
    The walk's first page is kept as its path and digested only if a second page comes: most
    listings have one page, and its digests would never be compared."""

    def __init__(self, max_pages: int, served: int = 0) -> None:
        self.max_pages = max_pages
        self._served = served  # pages committed before this walk (a resumed cursor's count)
        self._seen: set[bytes] = set()
        self._first: str | None = None  # the walk's first page, not digested yet

    def check(self, path: str) -> None:
        """Call before fetching ``path``, the listing's next page; ListingRefused if it must
        not be fetched."""
        if self._served >= self.max_pages:
            raise ListingRefused(
                f"{_path_only(path)}: the listing goes on past CONVSYNC_MAX_PAGES "
                f"({self.max_pages}) pages"
            )
        if not self._seen and self._first is None:
            self._first = path
            self._served += 1
            return
        if self._first is not None:
            self._seen.update(_page_keys(self._first))
            self._first = None
        keys = _page_keys(path)
        if not self._seen.isdisjoint(keys):
            raise ListingRefused(
                f"{_path_only(path)}: the listing repeats a page it already served "
                f"(after {self._served} pages): its next_page_url loops"
            )
        self._seen.update(keys)
        self._served += 1


def _page_keys(path: str) -> list[bytes]:
    """What identifies a page of a listing: its path and query without ``Page`` (an echo for
    the client), decoded and sorted, and its PageToken alone (the position)."""
    query = sorted((k, v) for k, v in _query(path) if k != "Page")
    texts = [repr((_listing(path), query))]
    texts += [f"PageToken={v}" for k, v in query if k == "PageToken"]
    return [hashlib.blake2b(t.encode(), digest_size=16).digest() for t in texts]


class TwilioClient:
    """Fetches Twilio list pages under a global, adaptive concurrency limit."""

    def __init__(
        self,
        settings: Settings,
        *,
        backoff: Backoff | None = None,
        metrics: Metrics | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        credentials = settings.require_credentials()
        self._base_url = settings.base_url
        self._origin = _origin(settings.base_url)
        # next_page_urls as the API writes them: the base URL, its path prefix (a proxy's) too
        self._prefix = settings.base_url + "/"
        self._base_path = urlsplit(settings.base_url).path  # "" unless a prefix, no final "/"
        self._authorization = "Basic " + credentials.basic
        self._secrets = (credentials.password, credentials.basic)  # an error body may echo them
        self._max_body = settings.max_response_bytes
        self._max_items = settings.max_page_items
        self._timeout = aiohttp.ClientTimeout(total=settings.request_timeout)
        self._backoff = backoff or Backoff(settings.max_attempts, settings.max_retry_seconds)
        self.limiter = AdaptiveLimiter(settings.concurrency)
        self._bucket = TokenBucket(settings.rate_limit) if settings.rate_limit else None
        self._metrics = metrics or default_metrics
        self._request_seconds = self._metrics.histogram("convsync_request_duration_seconds")
        self._session: aiohttp.ClientSession | None = None
        self._stop = stop
        self._connector_limit = settings.concurrency

    async def __aenter__(self) -> TwilioClient:
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            connector=aiohttp.TCPConnector(limit=self._connector_limit, ttl_dns_cache=300),
            headers={
                "Accept": "application/json",
                "User-Agent": "convsync/0.1",
                "Authorization": self._authorization,
            },
            raise_for_status=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get_page(self, path: str, key: str) -> Page:
        """Fetch one list page; its items are under ``key`` (e.g. "conversations")."""
        items, next_url, body = await self._fetch(path, lambda raw: _split_page(path, key, raw))
        next_path = self._relative(next_url) if next_url else None
        if next_path is not None and _listing(next_path) != _listing(path):
            # Another user's listing, say: its items would be stored as this user's.
            raise MalformedPage(
                f"page {_path_only(path)}: its next_page_url leaves the listing "
                f"(to {redact(_path_only(next_path), self._secrets)[:200]})"
            )
        asked = _page_size(path)
        bound = min(asked, self._max_items) if asked else self._max_items
        if len(items) > bound:
            raise MalformedPage(
                f"page {_path_only(path)} has {len(items)} items, more than the {bound} asked for"
            )
        return Page(path, items, next_path, body)

    async def get_json(self, path: str) -> dict[str, Any]:
        """GET ``path`` (relative to the base URL) with retries; the body must be an object."""
        return await self._fetch(path, lambda raw: _json_object(path, raw))

    async def _fetch(self, path: str, decode: Callable[[bytes], T]) -> T:
        """GET ``path`` and decode a 200's body, retrying transient failures with backoff."""

        def exhausted(error: BaseException, attempts: int, waited: float) -> BaseException:
            return RetriesExhausted(
                f"{_path_only(path)}: gave up after {attempts} attempts ({waited:.1f}s): "
                f"{type(error).__name__}: {error}"
            )

        return await retrying(
            lambda: self._attempt(path, decode),
            target="twilio",
            retry_on=(TransientError,),
            backoff=self._backoff,
            give_up=exhausted,
            metrics=self._metrics,
            asked_wait=lambda error: getattr(error, "retry_after", None),
            pause=self._pause,
            describe=lambda: {"path": _path_only(path), "concurrency_limit": self.limiter.limit},
        )

    async def _pause(self, seconds: float) -> None:
        """Back off; a shutdown ends the wait at once (the request is not retried)."""
        if self._stop is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        if self._stop.is_set():
            raise Interrupted("shutdown during a retry backoff")

    async def _attempt(self, path: str, decode: Callable[[bytes], T]) -> T:
        if self._session is None:
            raise RuntimeError("TwilioClient used outside 'async with'")
        if self._bucket is not None:
            await self._bucket.acquire()
        await self.limiter.acquire()
        overloaded = dropped = False
        try:
            try:
                # Paths are already percent-encoded (built with quote, or Twilio's own URLs).
                url = yarl.URL(self._base_url + path, encoded=True)
                sent = time.perf_counter()
                async with self._session.get(url, allow_redirects=False) as response:
                    status = response.status
                    raw = await self._read_body(path, response)
                took = time.perf_counter() - sent
                self._request_seconds.observe(took)
            except (aiohttp.ClientError, TimeoutError) as error:
                dropped = True
                self._metrics.inc("convsync_requests_total", status="connection_error")
                raise ConnectionFailed(f"{type(error).__name__}: {error}") from error
            except ResponseTooLarge:
                self._metrics.inc("convsync_requests_total", status="too_large")
                raise
            self._metrics.inc("convsync_requests_total", status=str(status))
            if status == 429:
                overloaded = True
                self._metrics.inc("convsync_rate_limited_total")
                raise RateLimited("429 Too Many Requests", _retry_after(response.headers))
            if status != 200:
                raise self._refusal(path, status, raw, response.headers)
        finally:
            # (The limiter's gauges are read when scraped: worker/daemon.py.)
            handed_over = self.limiter.release(overloaded=overloaded, dropped=dropped)
        if handed_over:
            # The slot is Twilio's time, given back before the decode; the request it let in
            # is sent when its task next runs. Step aside once so that it runs first: answers
            # come in waves, and a wave's decodes would otherwise delay each next request by
            # the pages decoded before it (K = 32 at 50 ms, in short passes: 0.83-0.86 K in
            # flight without this step, 0.85-0.88 with it).
            await asyncio.sleep(0)
        return decode(raw)

    async def _read_body(self, path: str, response: aiohttp.ClientResponse) -> bytes:
        """The body, read as it streams in (decompressed) and refused at once, without reading
        the rest, when it grows past the bound; a Content-Length above it is refused unread."""
        declared = response.content_length
        if declared is not None and declared > self._max_body:
            response.close()
            raise self._too_large(path, f"declares {declared} bytes")
        identity = response.headers.get("Content-Encoding", "identity").lower() == "identity"
        if declared is not None and identity:
            return await response.read()  # exactly Content-Length bytes: within the bound
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > self._max_body:
                response.close()  # the connection goes; what is still unsent is never read
                raise self._too_large(path, f"exceeds {self._max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, path: str, how: str) -> ResponseTooLarge:
        return ResponseTooLarge(
            f"{_path_only(path)}: the response body {how}, above CONVSYNC_MAX_RESPONSE_BYTES "
            f"({self._max_body})"
        )

    def _refusal(self, path: str, status: int, raw: bytes, headers: Any) -> Exception:
        """The error a non-200 answer stands for."""
        if status >= 500:
            return ServerError(f"HTTP {status}", _retry_after(headers))
        code, message = _twilio_error(raw, self._secrets)
        detail = (
            f"HTTP {status}"
            + (f" code {code}" if code else "")
            + (f": {message}" if message else "")
        )
        if status in (401, 403):
            return AuthError(f"Twilio rejected the credentials ({detail})")
        if status == 404:
            return UserGone(f"{_path_only(path)} not found ({detail})")
        if (
            status == 400
            and page_token(path) is not None
            and (code in PAGE_TOKEN_ERROR_CODES or code is None)
        ):
            return PageTokenRejected(f"{_path_only(path)}: page token rejected ({detail})")
        return UnexpectedResponse(f"{_path_only(path)}: {detail}")

    def _relative(self, url: str) -> str:
        """The API path and query of a next_page_url (below the base URL's path prefix, if
        any), which must point at the configured API."""
        if url.startswith("/"):
            return url
        if url.startswith(self._prefix) and "#" not in url and not url.endswith("?"):
            return url[len(self._prefix) - 1 :]  # what the parse below returns, without it
        try:
            origin, parts = _origin(url), urlsplit(url)
        except ValueError:  # a port that is not a number, an unclosed IPv6 bracket
            raise MalformedPage("its next_page_url is not a valid URL") from None
        if origin != self._origin or not parts.path.startswith(self._base_path + "/"):
            raise MalformedPage("next_page_url points outside the configured API base URL")
        return parts.path[len(self._base_path) :] + (f"?{parts.query}" if parts.query else "")


def _json_object(path: str, raw: bytes) -> dict[str, Any]:
    """A 200's body, which must be a JSON object (stdlib decoder: lenient, exact errors)."""
    try:
        body = json.loads(raw)
    except ValueError as error:
        # A truncated or garbled body: the next attempt may well be whole.
        raise ConnectionFailed(f"body is not valid JSON ({len(raw)} bytes)") from error
    except RecursionError:
        raise MalformedPage(f"{_path_only(path)}: body is nested too deeply") from None
    if not isinstance(body, dict):
        raise MalformedPage(f"{_path_only(path)}: body is JSON but not an object")
    return body


def _split_page(path: str, key: str, raw: bytes) -> tuple[list[Any], str | None, bytes]:
    """A list page's items, its next_page_url and its body. A page msgspec can vouch for is
    decoded once, its items typed and checked (``decode_typed_page``); another well-formed one
    is split without decoding its items; anything else gets the stdlib decoder and its exact
    errors."""
    typed = decode_typed_page(key, raw)
    if typed is not None:
        return typed[0], typed[1], raw
    decoder = ENVELOPES.get(key)
    if decoder is not None:
        try:
            page = decoder.decode(raw)
        except (msgspec.MsgspecError, RecursionError):
            pass
        else:
            return getattr(page, key), page.meta.next_page_url, raw
    body = _json_object(path, raw)
    items = body.get(key)
    meta = body.get("meta")
    if not isinstance(items, list) or not isinstance(meta, dict):
        raise MalformedPage(f"page {_path_only(path)} has no '{key}' list or no 'meta' object")
    next_url = meta.get("next_page_url")
    if next_url is not None and not isinstance(next_url, str):
        raise MalformedPage(f"page {_path_only(path)} has a non-string next_page_url")
    return items, next_url, raw


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, f"{(parts.hostname or '').lower()}:{port}"


def _path_only(path: str) -> str:
    """The path without its query (page tokens are long and say little in a message)."""
    return path.split("?", 1)[0]


def _listing(path: str) -> str:
    """The listing a page belongs to: its path, decoded (only the query moves through it)."""
    return unquote(_path_only(path))


def _page_size(path: str) -> int | None:
    """The PageSize a page path asks for, if it names a valid one."""
    size = next((v for k, v in _query(path) if k == "PageSize" and v), "")
    valid = size.isascii() and size.isdigit() and len(size) <= 9 and int(size) > 0
    return int(size) if valid else None


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _twilio_error(raw: bytes, secrets: tuple[str, ...]) -> tuple[int | None, str | None]:
    """Twilio's error code and message (redacted before it is cut: the body may echo the
    credentials sent)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or nested too deeply to read
        return None, None
    if not isinstance(body, dict):
        return None, None
    code = body.get("code")
    message = body.get("message")
    return (
        code if isinstance(code, int) else None,
        redact(message, secrets)[:200] if isinstance(message, str) else None,
    )
