"""HTTP to Twilio: auth, timeouts, retries with backoff, the adaptive limiter, paging.

The client never touches the database. It turns every response into a ``Page`` or one of the
errors of ``worker.errors``; what to do about a failure is the caller's policy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import msgspec
import structlog
import yarl

from worker.config import Settings
from worker.errors import (
    AuthError,
    ConnectionFailed,
    Interrupted,
    MalformedPage,
    PageTokenRejected,
    RateLimited,
    RetriesExhausted,
    ServerError,
    TransientError,
    UnexpectedResponse,
    UserGone,
)
from worker.limiter import AdaptiveLimiter, TokenBucket
from worker.metrics import Metrics
from worker.metrics import metrics as default_metrics

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
    tokens = parse_qs(urlsplit(path).query).get("PageToken")
    return tokens[0] if tokens else None


@dataclass(frozen=True)
class Page:
    """One list page: its items (``msgspec.Raw``, still undecoded, or Python values when the
    body needed the lenient decoder), the path of the next page (None on the last), and the
    body as received (the hot path hands it to the database as it is)."""

    path: str
    items: list[Any]
    next_page_path: str | None
    body: bytes = b""


class _Meta(msgspec.Struct, gc=False):
    next_page_url: str | None = None


def _envelope(key: str) -> msgspec.json.Decoder[Any]:
    """A decoder that splits a list page into its items (undecoded) and its meta."""
    struct = msgspec.defstruct(f"{key}_page", [(key, list[msgspec.Raw]), ("meta", _Meta)])
    return msgspec.json.Decoder(struct)


_ENVELOPES = {key: _envelope(key) for key in ("services", "users", "conversations")}


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter, bounded by attempts and total time."""

    max_attempts: int = 8
    max_seconds: float = 120.0
    base: float = 0.25
    cap: float = 20.0

    def delay(self, retry_num: int) -> float:
        return random.uniform(0, min(self.cap, self.base * 2 ** (retry_num - 1)))


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
        token = f"{credentials.username}:{credentials.password}".encode()
        self._authorization = "Basic " + base64.b64encode(token).decode("ascii")
        self._timeout = aiohttp.ClientTimeout(total=settings.request_timeout)
        self._backoff = backoff or Backoff(settings.max_attempts, settings.max_retry_seconds)
        self.limiter = AdaptiveLimiter(settings.concurrency)
        self._bucket = TokenBucket(settings.rate_limit) if settings.rate_limit else None
        self._metrics = metrics or default_metrics
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
        if next_path == path:
            # Followed, it would list the same page forever and the pass would never end.
            raise MalformedPage(f"page {_path_only(path)}: its next_page_url repeats the page")
        return Page(path, items, next_path, body)

    async def get_json(self, path: str) -> dict[str, Any]:
        """GET ``path`` (relative to the base URL) with retries; the body must be an object."""
        return await self._fetch(path, lambda raw: _json_object(path, raw))

    async def _fetch(self, path: str, decode: Callable[[bytes], T]) -> T:
        """GET ``path`` and decode a 200's body, retrying transient failures with backoff."""
        started = time.monotonic()
        retry_num = 0
        while True:
            try:
                return await self._attempt(path, decode)
            except TransientError as error:
                retry_num += 1
                waited = time.monotonic() - started
                wait = self._backoff.delay(retry_num)
                if error.retry_after is not None:
                    wait = max(wait, error.retry_after)
                cause = type(error).__name__
                if (
                    retry_num >= self._backoff.max_attempts
                    or waited + wait > self._backoff.max_seconds
                ):
                    log.warning(
                        "retries_exhausted",
                        path=_path_only(path),
                        attempts=retry_num,
                        caused_by=cause,
                        error=str(error),
                        waited_so_far=round(waited, 3),
                    )
                    raise RetriesExhausted(
                        f"{_path_only(path)}: gave up after {retry_num} attempts "
                        f"({waited:.1f}s): {cause}: {error}"
                    ) from error
                self._metrics.inc("convsync_retries_total", cause=cause)
                log.info(
                    "retry_scheduled",
                    path=_path_only(path),
                    retry_num=retry_num,
                    caused_by=cause,
                    wait_for=round(wait, 3),
                    waited_so_far=round(waited, 3),
                    concurrency_limit=self.limiter.limit,
                )
                await self._pause(wait)

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
        place = await self.limiter.acquire()
        overloaded = dropped = False
        self._metrics.set("convsync_requests_in_flight", self.limiter.in_flight)
        try:
            try:
                # Paths are already percent-encoded (built with quote, or Twilio's own URLs).
                url = yarl.URL(self._base_url + path, encoded=True)
                async with self._session.get(url, allow_redirects=False) as response:
                    status = response.status
                    raw = await response.read()
            except (aiohttp.ClientError, TimeoutError) as error:
                dropped = True
                self._metrics.inc("convsync_requests_total", status="connection_error")
                raise ConnectionFailed(f"{type(error).__name__}: {error}") from error
            self._metrics.inc("convsync_requests_total", status=str(status))
            if status == 429:
                overloaded = True
                self._metrics.inc("convsync_rate_limited_total")
                raise RateLimited("429 Too Many Requests", _retry_after(response.headers))
            if status == 200:
                return decode(raw)
            raise self._refusal(path, status, raw, response.headers)
        finally:
            self.limiter.release(place, overloaded=overloaded, dropped=dropped)
            self._metrics.set("convsync_concurrency_limit", self.limiter.limit)
            self._metrics.set("convsync_requests_in_flight", self.limiter.in_flight)

    def _refusal(self, path: str, status: int, raw: bytes, headers: Any) -> Exception:
        """The error a non-200 answer stands for."""
        if status >= 500:
            return ServerError(f"HTTP {status}", _retry_after(headers))
        code, message = _twilio_error(raw)
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
        """Path and query of a next_page_url, which must point at the configured API."""
        if url.startswith("/"):
            return url
        if _origin(url) != self._origin:
            raise MalformedPage("next_page_url points outside the configured API base URL")
        parts = urlsplit(url)
        return parts.path + (f"?{parts.query}" if parts.query else "")


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
    """A list page's items, its next_page_url and its body. msgspec splits a well-formed page
    without decoding its items; anything else gets the stdlib decoder and its exact errors."""
    decoder = _ENVELOPES.get(key)
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


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _twilio_error(raw: bytes) -> tuple[int | None, str | None]:
    try:
        body = json.loads(raw)
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    code = body.get("code")
    message = body.get("message")
    return (
        code if isinstance(code, int) else None,
        message[:200] if isinstance(message, str) else None,
    )
