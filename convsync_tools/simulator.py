"""A faithful fake of the Twilio Conversations API (GET only), with faults, for demos and tests.

Endpoints (HTTP Basic auth: account SID + auth token, or API key SID + secret):

* ``/v1/Services``, ``/v1/Services/{Sid}``
* ``/v1/Services/{ChatServiceSid}/Users``, ``/v1/Services/{ChatServiceSid}/Users/{Sid}``
* ``/v1/Services/{ChatServiceSid}/Users/{UserSid}/Conversations`` (UserSid: SID or identity)
* ``/v1/Users/{UserSid}/Conversations`` (the account's default service: the first one)

Paging is Twilio's: ``PageSize`` (1..50; 1..100 for services, as the spec says), ``Page`` (an
echo for the client) and an opaque ``PageToken`` that every page after the first needs. A token
is ``PT`` + urlsafe base64 of ``direction|list|marker SID|issued`` and an HMAC: a keyset position
("after conversation CH..."), so pages stay exact under inserts and deletes. ``meta`` URLs are
absolute, built from the request's ``Host``.

Errors carry Twilio's body ``{"code", "message", "more_info", "status"}``; codes used:
20001 (400: bad PageSize/Page, ``Page>0`` without a token, invalid or expired ``PageToken``),
20003 (401), 20004 (405), 20404 (404), 20429 (429), 20500 (500), 20503 (503).

Test and benchmark controls live under ``/_sim/`` (no auth, not counted, never faulted):
``GET /_sim/stats`` (``?pages=false``: without the per-page counts), ``POST /_sim/reset_stats``,
``GET|POST /_sim/config`` (JSON of knobs), ``POST /_sim/fail_next`` (``{"path", "fault",
"count"}``), ``POST /_sim/clock`` (``{"advance": seconds}``). In-process only, for tests:
schema-breaking pages (``Simulator.corrupt_next``) and when each request came and went
(``Simulator.served``).

Webhooks (Twilio Conversations' post-event webhooks): with ``webhook_url`` set, each dataset
mutation POSTs its event there (``onParticipantAdded``/``Updated``/``Removed``,
``onConversationAdded``/``Updated``/``StateUpdated``/``Removed``, ``onMessageAdded``; fields as
simdata's ``Change`` lists them), form-encoded, signed with the auth token as Twilio signs
(``X-Twilio-Signature``), with ``I-Twilio-Idempotency-Token`` (one per event, kept on retries)
and ``User-Agent: TwilioProxy/1.1``. Deliveries run on the server's loop in mutation order,
never blocking the mutation; ``webhook_retries`` more attempts follow a non-2xx answer or none
(``webhook_backoff`` seconds, doubling); ``webhook_filters`` limits the events. URL, token and
retries are fixed when an event is queued; events queued while nothing serves wait for a server.

* ``POST /_sim/mutate`` ``{"op", ...args}``: a ``Dataset`` mutation (``MUTATIONS``; the default
  service unless ``service_sid``); ``{"result"}``, 400 on bad input, 404 for what does not exist
* ``GET /_sim/webhooks?wait=seconds&last=n``: counts, ``pending``, ``idle``, the latest attempts
* ``POST /_sim/webhooks/replay`` ``{"token"?}``: the last delivered event (or that one) again,
  byte for byte; ``POST /_sim/webhooks/send`` ``{"event"?, "signature": "good"|"bad"|"none"}``:
  the latest such event's body under a new token, signed right, with a wrong key or unsigned
* in-process: ``Simulator.mutate``, ``webhooks_idle``, ``webhook_stats``,
  ``webhook_deliveries``, ``replay_webhook``, ``send_webhook``

It imports nothing of the worker (a lint rule, ``convsync_tools/ruff.toml``, fails CI
otherwise): a bug shared with the client would hide itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import gc
import hashlib
import hmac
import inspect
import json
import random
import signal
import sys
import threading
import time
import types
import typing
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, get_args
from urllib.parse import unquote

import msgspec
from aiohttp import web

from convsync_tools.errors import BadRequest
from convsync_tools.simdata import (
    DEMO_ACCOUNT_SID,
    DEMO_AUTH_TOKEN,
    EVENT_TYPES,
    Change,
    Dataset,
)
from convsync_tools.webhook_sender import (
    Delivery,
    Outgoing,
    SignatureMode,
    WebhookSender,
    WebhookStats,
)

CODE_INVALID = 20001
CODE_AUTH = 20003
CODE_METHOD = 20004
CODE_NOT_FOUND = 20404
CODE_TOO_MANY = 20429
CODE_INTERNAL = 20500
CODE_UNAVAILABLE = 20503
_CODES = {400: CODE_INVALID, 401: CODE_AUTH, 404: CODE_NOT_FOUND, 405: CODE_METHOD,
          429: CODE_TOO_MANY, 500: CODE_INTERNAL, 503: CODE_UNAVAILABLE}  # fmt: skip
_MESSAGES = {
    400: "Bad Request",
    401: "Authenticate",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
FAULT_KINDS = frozenset({"drop", "truncate", "slow"})  # besides any HTTP status 400..599
MAX_PAGE_SIZE = 50
SERVED_KEPT = 100_000  # requests remembered by ``Simulator.served`` (the latest)
MAX_SERVICES_PAGE_SIZE = 100
MUTATIONS = frozenset(
    {
        "add_membership",
        "remove_membership",
        "set_unread",
        "set_notification_level",
        "update_conversation",
        "add_message",
        "remove_conversation",
        "add_user",
        "delete_user",
    }
)
_CONVERSATION_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "friendly_name": (str, type(None)),
    "unique_name": (str, type(None)),
    "attributes": (str,),
    "conversation_state": (str,),
    "timers": (dict,),
    "created_by": (str, type(None)),
    "date_created": (str,),
    "date_updated": (str,),
}


@dataclass(frozen=True)
class SimulatorConfig:
    """The simulator's knobs (all settable at runtime; rates are per-request probabilities)."""

    account_sid: str = DEMO_ACCOUNT_SID
    auth_token: str = field(default=DEMO_AUTH_TOKEN, repr=False)
    api_key_sid: str | None = None
    api_key_secret: str | None = field(default=None, repr=False)
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    concurrency_ceiling: int = 0  # requests in flight above this get 429 at once; 0: no limit
    retry_after: int | None = None  # Retry-After seconds on 429/503; None: no header
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_503: float = 0.0
    drop_rate: float = 0.0  # close the connection without a response
    truncate_rate: float = 0.0  # full Content-Length, half the body, then close
    slow_rate: float = 0.0  # answer only after slow_seconds
    slow_seconds: float = 30.0
    token_ttl: float | None = None  # PageTokens older than this many seconds get 400
    api_down: bool = False  # every API request gets 503
    fault_seed: int = 0
    webhook_url: str | None = None  # the post-event URL (signed verbatim); None: no webhooks
    webhook_retries: int = 3  # more attempts after a non-2xx answer or none
    webhook_backoff: float = 0.2  # seconds before the first retry, doubling
    webhook_timeout: float = 5.0  # per attempt
    webhook_filters: tuple[str, ...] | None = None  # the events sent; None: all

    def validate(self) -> SimulatorConfig:
        rates = (self.rate_429, self.rate_500, self.rate_503, self.drop_rate,
                 self.truncate_rate, self.slow_rate)  # fmt: skip
        if any(not 0.0 <= rate <= 1.0 for rate in rates) or sum(rates) > 1.0 + 1e-9:
            raise ValueError("fault rates must be within 0..1 and sum to at most 1")
        if min(self.latency_ms, self.jitter_ms, self.slow_seconds) < 0:
            raise ValueError("latency_ms, jitter_ms and slow_seconds must be >= 0")
        if self.concurrency_ceiling < 0:
            raise ValueError("concurrency_ceiling must be >= 0 (0: no limit)")
        if self.retry_after is not None and self.retry_after < 0:
            raise ValueError("retry_after must be >= 0 or None")
        if self.token_ttl is not None and self.token_ttl < 0:
            raise ValueError("token_ttl must be >= 0 or None")
        if (self.api_key_sid is None) != (self.api_key_secret is None):
            raise ValueError("api_key_sid and api_key_secret go together")
        if self.webhook_url is not None and not self.webhook_url.startswith(
            ("http://", "https://")
        ):
            raise ValueError("webhook_url must be an http:// or https:// URL or None")
        if self.webhook_retries < 0 or self.webhook_backoff < 0 or self.webhook_timeout <= 0:
            raise ValueError("webhook_retries, webhook_backoff must be >= 0, webhook_timeout > 0")
        unknown = set(self.webhook_filters or ()) - set(EVENT_TYPES)
        if unknown:
            raise ValueError(f"unknown webhook_filters {sorted(unknown)}; known: {EVENT_TYPES}")
        return self

    def public(self) -> dict[str, Any]:
        """The knobs as JSON, secrets left out."""
        shown = dataclasses.asdict(self)
        del shown["auth_token"], shown["api_key_secret"]
        return shown


def _knob_types() -> dict[str, tuple[type, ...]]:
    """Allowed JSON value types per knob, from SimulatorConfig's annotations."""
    names = {"str": str, "int": int, "float": float, "bool": bool, "None": type(None),
             "tuple[str, ...]": list}  # fmt: skip
    found: dict[str, tuple[type, ...]] = {}
    for knob in dataclasses.fields(SimulatorConfig):
        types = tuple(names[part.strip()] for part in str(knob.type).split("|"))
        found[knob.name] = (*types, int) if float in types else types
    return found


_KNOB_TYPES = _knob_types()


def _coerce_knobs(knobs: dict[str, Any]) -> dict[str, Any]:
    """Check JSON knob values against SimulatorConfig's field types (a list of strings
    becomes a tuple)."""
    unknown = set(knobs) - set(_KNOB_TYPES)
    if unknown:
        raise ValueError(f"unknown knobs: {sorted(unknown)}")
    coerced = dict(knobs)
    for name, value in knobs.items():
        allowed = _KNOB_TYPES[name]
        if isinstance(value, tuple) and list in allowed:
            value = list(value)
        if isinstance(value, bool) and bool not in allowed:
            raise ValueError(f"{name}: expected {allowed}, got a boolean")
        if not isinstance(value, allowed):
            raise ValueError(f"{name}: expected {allowed}, got {type(value).__name__}")
        if isinstance(value, list):
            if not all(isinstance(item, str) for item in value):
                raise ValueError(f"{name}: expected a list of strings")
            coerced[name] = tuple(value)
    return coerced


@dataclass(frozen=True)
class Stats:
    """A snapshot of what the simulator has seen since the last reset.

    ``in_flight`` counts admitted requests (those not turned away by the concurrency ceiling),
    so ``max_in_flight`` never exceeds it; ``avg_in_flight`` is time-weighted since the reset,
    ``active_avg_in_flight`` over ``active_seconds`` only: from the first request admitted after
    the reset to the end of the last one (or now, while one is in flight), idle time before and
    after left out.
    ``pages`` counts every API request by ``(path, PageToken or None)``; ``pages_ok`` only those
    answered 200 with a whole body. ``faults`` counts injected faults by kind (``ceiling``,
    ``down``, ``429``/``500``/``503``/any status, ``drop``, ``truncate``, ``slow``).
    """

    requests: int
    by_status: Counter[int]
    faults: Counter[str]
    in_flight: int
    max_in_flight: int
    avg_in_flight: float
    active_avg_in_flight: float
    active_seconds: float
    pages: Counter[tuple[str, str | None]]
    pages_ok: Counter[tuple[str, str | None]]

    def to_json(self) -> dict[str, Any]:
        def pages(counter: Counter[tuple[str, str | None]]) -> list[dict[str, Any]]:
            return [{"path": p, "page_token": t, "count": n} for (p, t), n in counter.items()]

        return {
            "requests": self.requests,
            "by_status": {str(k): v for k, v in self.by_status.items()},
            "faults": dict(self.faults),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "avg_in_flight": self.avg_in_flight,
            "active_avg_in_flight": self.active_avg_in_flight,
            "active_seconds": self.active_seconds,
            "pages": pages(self.pages),
            "pages_ok": pages(self.pages_ok),
        }


def _take_targeted(entries: list[Targeted], target: str) -> Targeted | None:
    """The first entry whose needle is in ``target``, one use of it spent (gone at its last)."""
    for index, entry in enumerate(entries):
        if entry.needle in target:
            entry.remaining -= 1
            if entry.remaining <= 0:
                del entries[index]
            return entry
    return None


@dataclass(frozen=True)
class Served:
    """One API request as the simulator saw it: when it arrived and when its answer left
    (``time.monotonic()``), its ``(path, PageToken)`` and status (None: dropped)."""

    arrived: float
    answered: float
    key: tuple[str, str | None]
    status: int | None


@dataclass
class _Targeted:
    needle: str
    fault: int | str
    remaining: int


@dataclass
class _Corruption:
    needle: str
    mutate: Callable[[dict[str, Any]], Any]
    remaining: int


Targeted = TypeVar("Targeted", _Targeted, _Corruption)  # a fault or a corruption, by needle


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class _Listing:
    """One list endpoint bound to its scope: how to page, mark positions and render items."""

    key: str
    scope: str
    max_size: int
    page: Callable[[int | None, int | None, int], tuple[list[int], bool]]
    marker: Callable[[int], str]
    position: Callable[[str], int | None]
    render: Callable[[list[int], str], list[dict[str, Any]]]


class Simulator:
    """The simulated API's state: dataset, knobs, targeted faults, clock and stats.

    Safe to drive from any thread while a server runs it on its own loop.
    """

    def __init__(
        self,
        dataset: Dataset | None = None,
        config: SimulatorConfig | None = None,
    ) -> None:
        self.dataset = dataset or Dataset.generate(seed=1)
        self._config = (config or SimulatorConfig(account_sid=self.dataset.account_sid)).validate()
        self._rng = random.Random(self._config.fault_seed)
        self._latency_rng = random.Random(self._config.fault_seed + 1)
        self._secret = hashlib.blake2b(
            f"{self.dataset.params.seed}|{self.dataset.account_sid}".encode(), digest_size=32
        ).digest()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._targeted: list[_Targeted] = []
        self._corruptions: list[_Corruption] = []
        self._clock_offset = 0.0
        self._held = False
        self._release = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._request_ids = 0
        self._reset_stats_locked()
        self._webhooks = WebhookSender()
        self._unsubscribe = self.dataset.subscribe(self._on_change)

    # -- knobs -------------------------------------------------------------------------------

    @property
    def config(self) -> SimulatorConfig:
        return self._config

    def configure(self, **knobs: Any) -> SimulatorConfig:
        """Change knobs (names of :class:`SimulatorConfig` fields); returns the new config."""
        knobs = _coerce_knobs(knobs)
        with self._lock:
            new = dataclasses.replace(self._config, **knobs).validate()
            if "fault_seed" in knobs:
                self._rng.seed(new.fault_seed)
                self._latency_rng.seed(new.fault_seed + 1)
            self._config = new
            return new

    def fail_next(self, path_substring: str, fault: int | str, count: int = 1) -> None:
        """The next ``count`` API requests whose path and query contain ``path_substring`` get
        ``fault``: an HTTP status (Twilio error body) or ``"drop"``, ``"truncate"``, ``"slow"``.

        Note that aiohttp's client resends an idempotent request once when a reused connection
        drops, so a single ``"drop"`` may be invisible to it; use ``count=2``.
        """
        if isinstance(fault, str) and fault.isdigit():
            fault = int(fault)
        if isinstance(fault, int) and not 400 <= fault <= 599:
            raise ValueError("a status fault must be within 400..599")
        if isinstance(fault, str) and fault not in FAULT_KINDS:
            raise ValueError(f"fault must be a status or one of {sorted(FAULT_KINDS)}")
        if count < 1:
            raise ValueError("count must be >= 1")
        with self._lock:
            self._targeted.append(_Targeted(path_substring, fault, count))

    def corrupt_next(
        self, path_substring: str, mutate: Callable[[dict[str, Any]], Any], count: int = 1
    ) -> None:
        """Test-only bad input: the next ``count`` list pages answered 200 whose path and query
        contain ``path_substring`` are served as ``mutate(body)`` instead of ``body``.

        ``body`` is the page object about to be serialised (items under the listing's key,
        ``meta``), freshly built, so ``mutate`` may change it in place and return it. Whatever
        it returns is served: any JSON value (lone surrogates come out as ``\\udXXX`` escapes),
        or ``bytes`` verbatim. Counted in ``stats().faults["corrupt"]``. In-process only: a
        callable does not travel through ``/_sim/``.
        """
        if count < 1:
            raise ValueError("count must be >= 1")
        with self._lock:
            self._corruptions.append(_Corruption(path_substring, mutate, count))

    def clear_faults(self) -> None:
        """Forget pending :meth:`fail_next` faults and :meth:`corrupt_next` corruptions."""
        with self._lock:
            self._targeted.clear()
            self._corruptions.clear()

    def _corrupt(self, target: str, body: dict[str, Any]) -> _Reply:
        """A 200 reply of ``body``, or of what a pending corruption for ``target`` makes of it."""
        with self._lock:
            corruption = _take_targeted(self._corruptions, target)
            if corruption is not None:
                self._faults["corrupt"] += 1
        if corruption is None:
            return _json(200, body)
        served = corruption.mutate(body)
        if isinstance(served, bytes):
            return _Reply(200, served, {})
        try:
            data = json.dumps(served, ensure_ascii=False, separators=(",", ":")).encode()
        except UnicodeEncodeError:
            data = json.dumps(served, separators=(",", ":")).encode()
        return _Reply(200, data, {})

    # -- clock and gate ----------------------------------------------------------------------

    def now(self) -> float:
        """The simulator's clock (wall time plus :meth:`advance_clock` offsets)."""
        return time.time() + self._clock_offset

    def advance_clock(self, seconds: float) -> None:
        """Move the token clock forward, e.g. to expire PageTokens without waiting."""
        self._clock_offset += seconds

    def hold(self) -> None:
        """From now on API requests wait (counted in flight, after the ceiling check) until
        :meth:`release`: a deterministic way to pile up concurrent requests."""
        with self._lock:
            self._held = True

    def release(self) -> None:
        """Let held requests (and later ones) proceed."""
        with self._lock:
            self._held = False
            event, self._release = self._release, asyncio.Event()
            loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            event.set()
        else:
            loop.call_soon_threadsafe(event.set)

    # -- stats -------------------------------------------------------------------------------

    def _reset_stats_locked(self) -> None:
        now = time.monotonic()
        in_flight = getattr(self, "_in_flight", 0)
        self._requests = 0
        self._by_status: Counter[int] = Counter()
        self._faults: Counter[str] = Counter()
        self._pages: Counter[tuple[str, str | None]] = Counter()
        self._pages_ok: Counter[tuple[str, str | None]] = Counter()
        self._in_flight = in_flight
        self._served: deque[Served] = deque(maxlen=SERVED_KEPT)
        self._max_in_flight = in_flight
        self._area = 0.0
        self._since = self._last = now
        self._active_from: float | None = now if in_flight else None  # the first admission

    def reset_stats(self) -> None:
        """Forget API counts and requests, and webhook counts and attempts."""
        with self._lock:
            self._reset_stats_locked()
            self._changed.notify_all()
        self._webhooks.reset()

    def _snapshot_locked(self, pages: bool = True) -> Stats:
        now = time.monotonic()
        elapsed = now - self._since
        area = self._area + self._in_flight * (now - self._last)
        # The area grows only while a request is in flight: it is all within the active window.
        active_until = now if self._in_flight else self._last
        active = 0.0 if self._active_from is None else active_until - self._active_from
        return Stats(
            requests=self._requests,
            by_status=Counter(self._by_status),
            faults=Counter(self._faults),
            in_flight=self._in_flight,
            max_in_flight=self._max_in_flight,
            avg_in_flight=area / elapsed if elapsed > 0 else float(self._in_flight),
            active_avg_in_flight=area / active if active > 0 else float(self._in_flight),
            active_seconds=active,
            pages=Counter(self._pages) if pages else Counter(),
            pages_ok=Counter(self._pages_ok) if pages else Counter(),
        )

    def stats(self, *, pages: bool = True) -> Stats:
        """The counts since the last reset; ``pages=False`` leaves out the per-page counts
        (they grow with the dataset: a poller that does not need them should not pay)."""
        with self._lock:
            return self._snapshot_locked(pages)

    def served(self) -> list[Served]:
        """The API requests since the last reset (the latest ``SERVED_KEPT``), oldest first."""
        with self._lock:
            return list(self._served)

    def wait_until(self, predicate: Callable[[Stats], bool], timeout: float = 10.0) -> bool:
        """Block until ``predicate(stats)`` holds (re-checked on every request start and end);
        False on timeout. Call it from another thread than the server's loop (e.g. through
        ``asyncio.to_thread`` in an async test)."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self._snapshot_locked()), timeout)

    def _begin(self, key: tuple[str, str | None], ceiling: int) -> tuple[bool, int]:
        """Count a request; admit it in flight unless that would exceed ``ceiling`` (0: none)."""
        with self._lock:
            self._requests += 1
            self._request_ids += 1
            self._pages[key] += 1
            admitted = not ceiling or self._in_flight < ceiling
            if admitted:
                now = time.monotonic()
                self._area += self._in_flight * (now - self._last)
                self._last = now
                if self._active_from is None:
                    self._active_from = now
                self._in_flight += 1
                self._max_in_flight = max(self._max_in_flight, self._in_flight)
            self._changed.notify_all()
            return admitted, self._request_ids

    def _end(
        self,
        key: tuple[str, str | None],
        admitted: bool,
        status: int | None,
        fault: str | None,
        whole: bool,
        arrived: float,
    ) -> None:
        with self._lock:
            self._served.append(Served(arrived, time.monotonic(), key, status))
            if admitted:
                now = time.monotonic()
                self._area += self._in_flight * (now - self._last)
                self._last = now
                self._in_flight -= 1
            if status is not None:
                self._by_status[status] += 1
            if fault is not None:
                self._faults[fault] += 1
            if status == 200 and whole:
                self._pages_ok[key] += 1
            self._changed.notify_all()

    # -- webhooks and mutations --------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        """A dataset listener (under the dataset's lock): queue the event's webhook."""
        config = self._config
        if config.webhook_url is None:
            return
        if config.webhook_filters is not None and change.event_type not in config.webhook_filters:
            self._webhooks.filtered(change.event_type)
            return
        self._webhooks.submit(
            Outgoing(
                event_type=change.event_type,
                fields=change.fields,
                url=config.webhook_url,
                auth_token=config.auth_token,
                retries=config.webhook_retries,
                backoff=config.webhook_backoff,
                timeout=config.webhook_timeout,
            )
        )

    def webhooks_idle(self, timeout: float = 10.0) -> bool:
        """Block until every queued webhook was delivered or gave up; False on timeout. Call
        it from another thread than the server's loop (e.g. ``asyncio.to_thread``)."""
        return self._webhooks.wait_idle(timeout)

    def webhook_stats(self) -> WebhookStats:
        return self._webhooks.stats()

    def webhook_deliveries(self) -> list[Delivery]:
        """Every webhook attempt remembered (the latest 1000), oldest first."""
        return self._webhooks.deliveries()

    def replay_webhook(self, token: str | None = None, timeout: float = 10.0) -> Delivery:
        """POST again, byte for byte, the last delivered event (or the event ``token``);
        LookupError if none. Blocks: call it off the server's loop."""
        return self._on_loop(self._webhooks.replay(token), timeout)

    def send_webhook(
        self,
        event_type: str | None = None,
        signature: SignatureMode = "good",
        timeout: float = 10.0,
    ) -> Delivery:
        """POST the latest ``event_type`` event's body again under a new idempotency token,
        to the current ``webhook_url``, signed right (``good``), with the wrong key (``bad``)
        or unsigned (``none``). Blocks: call it off the server's loop."""
        config = self._config
        coroutine = self._webhooks.send(
            event_type, signature, config.webhook_url, config.auth_token
        )
        return self._on_loop(coroutine, timeout)

    def _on_loop(self, coroutine: typing.Coroutine[Any, Any, Delivery], timeout: float) -> Delivery:
        loop = self._loop
        if loop is None or loop.is_closed():
            coroutine.close()
            raise RuntimeError("the simulator is not being served")
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coroutine.close()
            raise RuntimeError("called on the server's loop: it would wait for itself")
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)

    def mutate(self, op: str, **args: Any) -> Any:
        """Apply the dataset mutation ``op`` (one of ``MUTATIONS``) to JSON-like ``args``,
        checked against the method's signature; ``service_sid`` defaults to the default
        service. ValueError on bad input, KeyError for what does not exist."""
        if op not in MUTATIONS:
            raise ValueError(f"unknown op {op!r}; one of {sorted(MUTATIONS)}")
        method = getattr(self.dataset, op)
        args.setdefault("service_sid", self.dataset.default_service_sid)
        hints = typing.get_type_hints(method)
        extra: dict[str, tuple[type, ...]] = {}
        for param in inspect.signature(method).parameters.values():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                extra = _CONVERSATION_FIELD_TYPES
                continue
            if param.name not in args:
                if param.default is inspect.Parameter.empty:
                    raise ValueError(f"{op} needs {param.name!r}")
                continue
            _check_arg(op, param.name, args[param.name], _allowed(hints[param.name]))
        for name in set(args) - set(inspect.signature(method).parameters):
            if name not in extra:
                raise ValueError(f"{op} takes no {name!r}")
            _check_arg(op, name, args[name], extra[name])
        return method(**args)

    # -- faults ------------------------------------------------------------------------------

    def _pick_fault(self, target: str, config: SimulatorConfig) -> int | str | None:
        with self._lock:
            targeted = _take_targeted(self._targeted, target)
        if targeted is not None:
            return targeted.fault
        if not (config.rate_429 or config.rate_500 or config.rate_503 or config.drop_rate
                or config.truncate_rate or config.slow_rate):  # fmt: skip
            return None
        draw = self._rng.random()
        for rate, fault in (
            (config.rate_429, 429),
            (config.rate_500, 500),
            (config.rate_503, 503),
            (config.drop_rate, "drop"),
            (config.truncate_rate, "truncate"),
            (config.slow_rate, "slow"),
        ):
            if draw < rate:
                return fault
            draw -= rate
        return None

    # -- page tokens -------------------------------------------------------------------------

    def _token(self, direction: str, scope: str, marker: str) -> str:
        payload = f"{direction}|{scope}|{marker}|{int(self.now())}".encode()
        mac = hmac.new(self._secret, payload, hashlib.sha256).digest()[:12]
        return "PT" + base64.urlsafe_b64encode(payload + mac).decode().rstrip("=")

    def _read_token(self, token: str, scope: str, config: SimulatorConfig) -> tuple[str, str]:
        """(direction, marker) of a token for this list; BadRequest if invalid or expired."""
        try:
            if not token.startswith("PT"):
                raise ValueError
            raw = base64.urlsafe_b64decode(token[2:] + "=" * (-len(token[2:]) % 4))
            payload, mac = raw[:-12], raw[-12:]
            expected = hmac.new(self._secret, payload, hashlib.sha256).digest()[:12]
            if not hmac.compare_digest(mac, expected):
                raise ValueError
            direction, token_scope, marker, issued = payload.decode().split("|")
            issued_at = int(issued)
        except (ValueError, binascii.Error, UnicodeDecodeError) as error:
            raise BadRequest("Invalid PageToken") from error
        if token_scope != scope or direction not in ("a", "b"):
            raise BadRequest("Invalid PageToken")
        if config.token_ttl is not None and self.now() - issued_at > config.token_ttl:
            raise BadRequest("PageToken has expired")
        return direction, marker

    # -- HTTP --------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Every API request: ceiling, outage, gate, latency, auth, faults, then the route."""
        config = self._config
        path = request.path
        key = (path, request.query.get("PageToken"))
        arrived = time.monotonic()
        admitted, request_id = self._begin(key, config.concurrency_ceiling)
        status: int | None = None
        fault_name: str | None = None
        whole = False
        try:
            if not admitted:
                fault_name = "ceiling"
                reply = _error(429, CODE_TOO_MANY, "Too Many Requests", config.retry_after)
                status = reply.status
                return _respond(reply, request_id)
            if config.api_down:
                fault_name = "down"
                reply = _error(503, CODE_UNAVAILABLE, "Service Unavailable", config.retry_after)
                status = reply.status
                return _respond(reply, request_id)
            await self._gate()
            if config.latency_ms or config.jitter_ms:
                jitter = self._latency_rng.uniform(0, config.jitter_ms) if config.jitter_ms else 0
                await asyncio.sleep((config.latency_ms + jitter) / 1000)
            if not _authorized(request.headers.get("Authorization"), config):
                reply = _error(401, CODE_AUTH, "Authenticate")
                reply.headers["WWW-Authenticate"] = 'Basic realm="Twilio API"'
                status = reply.status
                return _respond(reply, request_id)
            fault = self._pick_fault(str(request.rel_url), config)
            if fault is not None:
                fault_name = str(fault)
            if isinstance(fault, int):
                message = _MESSAGES.get(fault, "Simulated failure")
                reply = _error(fault, _CODES.get(fault, 20000 + fault), message, config.retry_after)
                status = reply.status
                return _respond(reply, request_id)
            if fault == "drop":
                if request.transport is not None:
                    request.transport.close()
                return web.Response(status=204)
            if fault == "slow":
                await asyncio.sleep(config.slow_seconds)
            reply = self._route(request, config)
            status = reply.status
            if fault == "truncate":
                return await _truncated(request, reply, request_id)
            whole = True
            return _respond(reply, request_id)
        finally:
            self._end(key, admitted, status, fault_name, whole, arrived)

    async def _gate(self) -> None:
        with self._lock:
            held, event = self._held, self._release
        if held:
            await event.wait()

    def _route(self, request: web.Request, config: SimulatorConfig) -> _Reply:
        if request.method not in ("GET", "HEAD"):
            return _error(405, CODE_METHOD, f"Method {request.method} not allowed (simulator)")
        raw_path = request.raw_path.split("?", 1)[0]
        parts = [unquote(part) for part in raw_path.split("/")[1:]]
        base = f"{request.scheme}://{request.host}"
        data = self.dataset
        try:
            if parts[:2] == ["v1", "Services"]:
                if len(parts) == 2:
                    return self._list(request, config, self._services_listing())
                s = data.service_index(parts[2])
                if s is None:
                    return _not_found(raw_path)
                if len(parts) == 3:
                    return _json(200, data.service_resource(s, base))
                if parts[3] != "Users" or len(parts) > 6:
                    return _not_found(raw_path)
                if len(parts) == 4:
                    return self._list(request, config, self._users_listing(s))
                u = data.user_index(s, parts[4])
                if u is None:
                    return _not_found(raw_path)
                if len(parts) == 5:
                    return _json(200, data.user_resource(s, u, base, fetch=True))
                if parts[5] == "Conversations":
                    listing = self._memberships_listing(s, u, default_form=False)
                    return self._list(request, config, listing)
            elif parts[:2] == ["v1", "Users"] and len(parts) == 4 and parts[3] == "Conversations":
                u = data.user_index(0, parts[2])
                if u is None:
                    return _not_found(raw_path)
                listing = self._memberships_listing(0, u, default_form=True)
                return self._list(request, config, listing)
        except BadRequest as error:
            return _error(400, CODE_INVALID, str(error))
        return _not_found(raw_path)

    def _services_listing(self) -> _Listing:
        data = self.dataset
        return _Listing(
            key="services",
            scope="s",
            max_size=MAX_SERVICES_PAGE_SIZE,
            page=data.service_page,
            marker=lambda i: data.position_sid("IS", 0, i),
            position=lambda sid: data.position_of("IS", 0, sid),
            render=lambda indices, b: [data.service_resource(i, b) for i in indices],
        )

    def _users_listing(self, s: int) -> _Listing:
        data = self.dataset
        return _Listing(
            key="users",
            scope=f"u:{s}",
            max_size=MAX_PAGE_SIZE,
            page=lambda after, before, limit: data.user_page(s, after, before, limit),
            marker=lambda i: data.position_sid("US", s, i),
            position=lambda sid: data.position_of("US", s, sid),
            render=lambda indices, b: [data.user_resource(s, i, b) for i in indices],
        )

    def _memberships_listing(self, s: int, u: int, *, default_form: bool) -> _Listing:
        data = self.dataset
        return _Listing(
            key="conversations",
            scope=f"{'d' if default_form else 'c'}:{s}:{u}",
            max_size=MAX_PAGE_SIZE,
            page=lambda after, before, limit: data.membership_page(s, u, after, before, limit),
            marker=lambda i: data.position_sid("CH", s, i),
            position=lambda sid: data.position_of("CH", s, sid),
            render=lambda indices, b: data.membership_resources(
                s, u, indices, b, default_service_form=default_form
            ),
        )

    def _list(self, request: web.Request, config: SimulatorConfig, listing: _Listing) -> _Reply:
        query = request.query
        size = _int_param(query.get("PageSize"), 50, "PageSize")
        if not 1 <= size <= listing.max_size:
            raise BadRequest(f"PageSize must be between 1 and {listing.max_size}")
        page = _int_param(query.get("Page"), 0, "Page")
        if page < 0:
            raise BadRequest("Page must be >= 0")
        token = query.get("PageToken")
        after: int | None = None
        before: int | None = None
        if token is not None:
            direction, marker = self._read_token(token, listing.scope, config)
            position = listing.position(marker)
            if position is None:
                raise BadRequest("Invalid PageToken")
            if direction == "a":
                after = position
            else:
                before = position
        elif page > 0:
            raise BadRequest("Page > 0 needs the PageToken of a next_page_url/previous_page_url")
        indices, more = listing.page(after, before, size)
        base = f"{request.scheme}://{request.host}"
        raw_path = request.raw_path.split("?", 1)[0]
        here = f"{base}{raw_path}?PageSize={size}"
        next_url: str | None = None
        previous_url: str | None = None
        if more and indices:
            next_token = self._token("a", listing.scope, listing.marker(indices[-1]))
            next_url = f"{here}&Page={page + 1}&PageToken={next_token}"
        if page > 0:
            if indices:
                boundary = indices[0]
            elif after is not None:
                boundary = after + 1
            else:
                boundary = before or 0
            previous_token = self._token("b", listing.scope, listing.marker(boundary))
            previous_url = f"{here}&Page={page - 1}&PageToken={previous_token}"
        body = {
            listing.key: listing.render(indices, base),
            "meta": {
                "page": page,
                "page_size": size,
                "first_page_url": f"{here}&Page=0",
                "previous_page_url": previous_url,
                "url": f"{here}&Page={page}" + (f"&PageToken={token}" if token else ""),
                "next_page_url": next_url,
                "key": listing.key,
            },
        }
        return self._corrupt(str(request.rel_url), body)

    # -- control endpoints -------------------------------------------------------------------

    async def control(self, request: web.Request) -> web.Response:
        """``/_sim/...``: stats, config, targeted faults, clock (see the module docstring)."""
        name = request.match_info["name"]
        try:
            text = await request.text() if request.method == "POST" else ""
            payload: Any = json.loads(text) if text.strip() else {}
            if not isinstance(payload, dict):
                raise ValueError("body must be a JSON object")
            if name == "stats" and request.method == "GET":
                pages = request.query.get("pages", "true") != "false"
                return _control_reply(self.stats(pages=pages).to_json())
            if name == "reset_stats" and request.method == "POST":
                self.reset_stats()
                return _control_reply({})
            if name == "config":
                if request.method == "POST":
                    self.configure(**payload)
                return _control_reply(self._config.public())
            if name == "fail_next" and request.method == "POST":
                self.fail_next(str(payload["path"]), payload["fault"], int(payload.get("count", 1)))
                return _control_reply({})
            if name == "clock" and request.method == "POST":
                self.advance_clock(float(payload.get("advance", 0)))
                return _control_reply({"now": self.now()})
            if name == "webhooks" and request.method == "GET":
                wait = float(request.query.get("wait", 0))
                if wait > 0:
                    await asyncio.to_thread(self._webhooks.wait_idle, min(wait, 60.0))
                last = int(request.query.get("last", 50))
                shown = self._webhooks.deliveries()[-last:] if last > 0 else []
                body = self._webhooks.stats().to_json()
                return _control_reply({**body, "deliveries": [d.to_json() for d in shown]})
            if name == "mutate" and request.method == "POST":
                op = payload.pop("op", None)
                if not isinstance(op, str):
                    raise ValueError(f"'op' must be one of {sorted(MUTATIONS)}")
                try:
                    result = await asyncio.to_thread(self.mutate, op, **payload)
                except KeyError as missing:
                    return _control_reply({"error": str(missing.args[0])}, 404)
                return _control_reply({"result": result})
        except (ValueError, KeyError, TypeError) as error:
            return _control_reply({"error": str(error)}, 400)
        return _control_reply({"error": f"no control {request.method} /_sim/{name}"}, 404)

    async def webhook_control(self, request: web.Request) -> web.Response:
        """``POST /_sim/webhooks/replay`` and ``/_sim/webhooks/send`` (module docstring):
        the attempt made, as JSON; 404 when there is nothing to replay or send."""
        action = request.match_info["action"]
        if request.method != "POST" or action not in ("replay", "send"):
            return _control_reply({"error": f"no control {request.method} {request.path}"}, 404)
        try:
            text = await request.text()
            payload: Any = json.loads(text) if text.strip() else {}
            if not isinstance(payload, dict):
                raise ValueError("body must be a JSON object")
            if action == "replay":
                token = payload.get("token")
                if token is not None and not isinstance(token, str):
                    raise ValueError("token must be a string")
                sent = await self._webhooks.replay(token)
            else:
                event, signature = payload.get("event"), payload.get("signature", "good")
                if event is not None and event not in EVENT_TYPES:
                    raise ValueError(f"event must be one of {EVENT_TYPES}")
                if signature not in ("good", "bad", "none"):
                    raise ValueError("signature must be 'good', 'bad' or 'none'")
                config = self._config
                sent = await self._webhooks.send(
                    event, signature, config.webhook_url, config.auth_token
                )
        except LookupError as error:
            return _control_reply({"error": str(error.args[0])}, 404)
        except (ValueError, TypeError) as error:
            return _control_reply({"error": str(error)}, 400)
        return _control_reply(sent.to_json())


def _allowed(hint: Any) -> tuple[type, ...]:
    """The runtime types of a parameter annotation (``str | None`` -> ``(str, NoneType)``)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(arg for arg in get_args(hint) if isinstance(arg, type))
    return (hint,) if isinstance(hint, type) else (object,)


def _check_arg(op: str, name: str, value: Any, allowed: tuple[type, ...]) -> None:
    if isinstance(value, bool) and bool not in allowed:
        raise ValueError(f"{op}: {name} must be {_names(allowed)}, not a boolean")
    if not isinstance(value, allowed):
        raise ValueError(f"{op}: {name} must be {_names(allowed)}, not {type(value).__name__}")


def _names(allowed: tuple[type, ...]) -> str:
    return " or ".join("null" if kind is type(None) else kind.__name__ for kind in allowed)


def _control_reply(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(body), content_type="application/json")


def _int_param(raw: str | None, default: int, name: str) -> int:
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None


def _authorized(header: str | None, config: SimulatorConfig) -> bool:
    if not header or not header.startswith("Basic "):
        return False
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return False
    username, _, password = decoded.partition(":")
    pairs = [(config.account_sid, config.auth_token)]
    if config.api_key_sid is not None and config.api_key_secret is not None:
        pairs.append((config.api_key_sid, config.api_key_secret))
    ok = False
    for user, secret in pairs:
        same_user = hmac.compare_digest(username.encode(), user.encode())
        same_secret = hmac.compare_digest(password.encode(), secret.encode())
        ok |= same_user and same_secret
    return ok


def freeze_heap() -> None:
    """Keep what exists now (start-up's objects, a derived dataset's records) out of the
    collector's full passes (``gc.freeze``, as the worker does at start-up): over a derived
    dataset of 4,000 users a full collection stopped the simulator's loop for 28-37 ms, in three
    instrumented passes just as a pass's first requests came."""
    gc.collect()
    gc.freeze()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (as the worker runs), else the standard library's loop."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _json(status: int, body: dict[str, Any]) -> _Reply:
    # msgspec: the same compact UTF-8 as json.dumps(ensure_ascii=False), in a tenth of the time
    # (a page's encoding was a quarter of the simulator's CPU, on the cores the worker shares).
    return _Reply(status, msgspec.json.encode(body), {})


def _error(status: int, code: int, message: str, retry_after: int | None = None) -> _Reply:
    reply = _json(
        status,
        {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
    )
    if retry_after is not None and status in (429, 503):
        reply.headers["Retry-After"] = str(retry_after)
    return reply


def _not_found(path: str) -> _Reply:
    return _error(404, CODE_NOT_FOUND, f"The requested resource {path} was not found")


def _headers(reply: _Reply, request_id: int) -> dict[str, str]:
    return {
        **reply.headers,
        "Content-Type": "application/json; charset=utf-8",
        "Twilio-Request-Id": f"RQ{request_id:032x}",
    }


def _respond(reply: _Reply, request_id: int) -> web.Response:
    return web.Response(status=reply.status, body=reply.body, headers=_headers(reply, request_id))


async def _truncated(request: web.Request, reply: _Reply, request_id: int) -> web.StreamResponse:
    """The full Content-Length, half the body, then the connection closes."""
    response = web.StreamResponse(status=reply.status, headers=_headers(reply, request_id))
    response.content_length = len(reply.body)
    await response.prepare(request)
    await response.write(reply.body[: len(reply.body) // 2])
    if request.transport is not None:
        request.transport.close()
    return response


def build_app(sim: Simulator) -> web.Application:
    """The aiohttp application serving ``sim``."""
    app = web.Application()

    async def on_startup(_: web.Application) -> None:
        sim._loop = asyncio.get_running_loop()
        await sim._webhooks.start()

    async def on_cleanup(_: web.Application) -> None:
        await sim._webhooks.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/_sim/webhooks/{action}", sim.webhook_control)
    app.router.add_route("*", "/_sim/{name}", sim.control)
    app.router.add_route("*", "/{tail:.*}", sim.handle)
    return app


def _runner(sim: Simulator, shutdown_timeout: float) -> web.AppRunner:
    return web.AppRunner(
        build_app(sim),
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout,
    )


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class SimulatorServer:
    """Runs a :class:`Simulator` on 127.0.0.1 (ephemeral port) in a background thread.

    ``with SimulatorServer() as server:`` then use ``server.url`` and ``server.sim``.
    """

    def __init__(self, sim: Simulator | None = None, *, host: str = "127.0.0.1", port: int = 0):
        self.sim = sim or Simulator()
        self.host = host
        self.port = port
        self.url = ""
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def __enter__(self) -> SimulatorServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            raise RuntimeError("SimulatorServer already started")
        self._thread = threading.Thread(target=self._run, name="convsync-simulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("simulator did not start in time")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError("simulator failed to start") from self._error

    def stop(self, timeout: float = 10.0) -> None:
        """Release held requests, stop serving and join the thread."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        self.sim.release()
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("simulator thread did not stop in time")
        self._thread = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve())
        except BaseException as error:  # reported to start() or lost at stop
            self._error = error
        finally:
            self._ready.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runner = _runner(self.sim, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            self.port = int(runner.addresses[0][1])
            self.url = _url(self.host, self.port)
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()


async def serve(
    host: str, port: int, sim: Simulator, ready: Callable[[str], None] | None = None
) -> None:
    """Serve ``sim`` on ``host:port`` until cancelled; ``ready(url)`` once listening."""
    runner = _runner(sim, shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        if ready is not None:
            ready(_url(host, int(runner.addresses[0][1])))
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convsync simulate", description="Serve the simulated Twilio Conversations API."
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    add("--port", type=int, default=8181, help="port (0: any free port; default 8181)")
    add("--seed", type=int, default=1, help="dataset seed (default 1)")
    add("--services", type=int, default=1, help="services (default 1)")
    add("--users", type=int, default=300, help="users per service (default 300)")
    add("--derive", action="store_true", help="derive the dataset before listening")
    add("--latency-ms", type=float, default=0.0, help="fixed latency per request")
    add("--jitter-ms", type=float, default=0.0, help="extra uniform random latency")
    add("--ceiling", type=int, default=0, help="requests in flight above this get 429 (0: none)")
    add("--retry-after", type=int, default=None, help="Retry-After seconds on 429/503")
    add("--error-rate", type=float, default=0.0, help="random 429/500/503, split evenly")
    add("--rate-429", type=float, default=0.0)
    add("--rate-500", type=float, default=0.0)
    add("--rate-503", type=float, default=0.0)
    add("--drop-rate", type=float, default=0.0, help="connections closed without a response")
    add("--truncate-rate", type=float, default=0.0, help="bodies cut short")
    add("--slow-rate", type=float, default=0.0, help="responses delayed by --slow-seconds")
    add("--slow-seconds", type=float, default=30.0)
    add("--token-ttl", type=float, default=None, help="PageToken lifetime in seconds")
    add("--fault-seed", type=int, default=0)
    add("--account-sid", default=DEMO_ACCOUNT_SID)
    add("--auth-token", default=None, help="default: the demo token (printed)")
    add("--api-key-sid", default=None)
    add("--api-key-secret", default=None)
    add("--webhook-url", default=None, help="POST signed post-event webhooks here on mutations")
    add("--webhook-retries", type=int, default=3, help="more attempts after a failure")
    add("--webhook-filters", default=None, help="comma-separated event types (default: all)")
    return parser


def simulate_main(argv: Sequence[str]) -> int:
    """``convsync simulate ...``: prints ``simulator listening on URL`` then serves."""
    args = _parser().parse_args(list(argv))
    demo_token = args.auth_token is None
    third = args.error_rate / 3
    filters: tuple[str, ...] | None = None
    if args.webhook_filters is not None:
        filters = tuple(name.strip() for name in args.webhook_filters.split(",") if name.strip())
    try:
        dataset = Dataset.generate(
            args.seed, args.services, args.users, account_sid=args.account_sid
        )
        if args.derive:
            dataset.derive()
        freeze_heap()
        config = SimulatorConfig(
            account_sid=args.account_sid,
            auth_token=DEMO_AUTH_TOKEN if demo_token else args.auth_token,
            api_key_sid=args.api_key_sid,
            api_key_secret=args.api_key_secret,
            latency_ms=args.latency_ms,
            jitter_ms=args.jitter_ms,
            concurrency_ceiling=args.ceiling,
            retry_after=args.retry_after,
            rate_429=args.rate_429 + third,
            rate_500=args.rate_500 + third,
            rate_503=args.rate_503 + third,
            drop_rate=args.drop_rate,
            truncate_rate=args.truncate_rate,
            slow_rate=args.slow_rate,
            slow_seconds=args.slow_seconds,
            token_ttl=args.token_ttl,
            fault_seed=args.fault_seed,
            webhook_url=args.webhook_url,
            webhook_retries=args.webhook_retries,
            webhook_filters=filters,
        ).validate()
    except ValueError as error:
        print(f"convsync simulate: {error}", file=sys.stderr)
        return 2
    sim = Simulator(dataset, config)

    def ready(url: str) -> None:
        print(f"simulator listening on {url}", flush=True)
        if demo_token:
            print(
                f"demo credentials: TWILIO_ACCOUNT_SID={config.account_sid} "
                f"TWILIO_AUTH_TOKEN={DEMO_AUTH_TOKEN}",
                flush=True,
            )
        else:
            print(f"account {config.account_sid} (auth token as given)", flush=True)

    async def main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve(args.host, args.port, sim, ready)

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(main())
    except KeyboardInterrupt:
        pass
    except OSError as error:
        print(f"convsync simulate: {error}", file=sys.stderr)
        return 1
    return 0
