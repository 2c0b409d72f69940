"""The simulator's webhook sender: Twilio-signed form POSTs, in order, off the mutating thread.

:meth:`WebhookSender.submit` (any thread) queues an event; a task on the simulator's loop
(:meth:`WebhookSender.start`) POSTs each in FIFO order, retrying a non-2xx answer or a
connection failure ``retries`` times with doubling backoff, under one idempotency token.

Requests look like Twilio's: ``application/x-www-form-urlencoded`` body, ``X-Twilio-Signature``
(:func:`twilio_signature`), ``I-Twilio-Idempotency-Token``, ``User-Agent: TwilioProxy/1.1``.
Every attempt is remembered (the latest ``kept``) so tests can look at, replay or tamper with
what went out.

It imports nothing of the worker (``convsync_tools/ruff.toml``): the signature is computed here
independently of the receiver that checks it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

import aiohttp

USER_AGENT = "TwilioProxy/1.1"
KEPT = 1000  # attempts remembered
SignatureMode = Literal["good", "bad", "none"]


def twilio_signature(url: str, params: Iterable[tuple[str, str]], auth_token: str) -> str:
    """Twilio's ``X-Twilio-Signature``: base64 HMAC-SHA1, keyed by the auth token, of the full
    URL followed by every POST parameter sorted by name (then value), name and value
    concatenated with no separators."""
    data = url + "".join(name + value for name, value in sorted(params))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


@dataclass(frozen=True)
class Outgoing:
    """One event to deliver, fixed when it was queued: where, signed with what, how hard."""

    event_type: str
    fields: tuple[tuple[str, str], ...]
    url: str
    auth_token: str = field(repr=False)
    retries: int
    backoff: float
    timeout: float
    token: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(frozen=True)
class Delivery:
    """One POST as sent: ``kind`` ``event`` (an attempt of a queued event), ``replay`` or
    ``send`` (:meth:`WebhookSender.send`); ``status`` None when no answer came (``error``)."""

    kind: str
    event_type: str
    token: str
    url: str
    body: bytes
    signature: str | None
    attempt: int
    status: int | None
    error: str | None
    at: float

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "event_type": self.event_type,
            "token": self.token,
            "url": self.url,
            "body": self.body.decode(),
            "signature": self.signature,
            "attempt": self.attempt,
            "status": self.status,
            "error": self.error,
            "at": self.at,
        }


@dataclass(frozen=True)
class WebhookStats:
    """Events since the last reset: ``sent`` (first attempts), ``delivered`` (a 2xx in the
    end), ``failed`` (attempts used up), ``retried`` (extra attempts), ``filtered`` (left out
    by ``webhook_filters``), ``manual`` (replays and sends), per event type too; ``pending``:
    queued or in flight (0: idle)."""

    sent: int
    delivered: int
    failed: int
    retried: int
    filtered: int
    manual: int
    pending: int
    by_event: dict[str, Counter[str]]

    def to_json(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "delivered": self.delivered,
            "failed": self.failed,
            "retried": self.retried,
            "filtered": self.filtered,
            "manual": self.manual,
            "pending": self.pending,
            "idle": self.pending == 0,
            "by_event": {name: dict(counts) for name, counts in self.by_event.items()},
        }


class WebhookSender:
    """A FIFO of events and the task that POSTs them (see the module docstring)."""

    def __init__(self, kept: int = KEPT) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: deque[Outgoing] = deque()
        self._pending = 0
        self._log: deque[Delivery] = deque(maxlen=kept)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._reset_locked()

    def _reset_locked(self) -> None:
        self._counts: Counter[str] = Counter()
        self._by_event: dict[str, Counter[str]] = {}

    def _count(self, event_type: str, what: str) -> None:
        self._counts[what] += 1
        self._by_event.setdefault(event_type, Counter())[what] += 1

    # -- any thread --------------------------------------------------------------------------

    def submit(self, event: Outgoing) -> None:
        """Queue ``event`` (never blocks); delivered once the loop runs :meth:`start`."""
        with self._lock:
            self._queue.append(event)
            self._pending += 1
            loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(wake.set)

    def filtered(self, event_type: str) -> None:
        """Count an event left out by the filters."""
        with self._lock:
            self._count(event_type, "filtered")

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is queued or in flight; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._pending == 0, timeout)

    def stats(self) -> WebhookStats:
        with self._lock:
            counts = self._counts
            return WebhookStats(
                sent=counts["sent"],
                delivered=counts["delivered"],
                failed=counts["failed"],
                retried=counts["retried"],
                filtered=counts["filtered"],
                manual=counts["manual"],
                pending=self._pending,
                by_event={name: Counter(c) for name, c in self._by_event.items()},
            )

    def deliveries(self) -> list[Delivery]:
        """The latest attempts, oldest first."""
        with self._lock:
            return list(self._log)

    def reset(self) -> None:
        """Forget counts and attempts (queued events stay queued)."""
        with self._lock:
            self._reset_locked()
            self._log.clear()

    # -- the loop ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin delivering on the running loop (queued events first)."""
        wake = asyncio.Event()
        self._session = aiohttp.ClientSession()
        with self._lock:
            self._loop, self._wake = asyncio.get_running_loop(), wake
            if self._queue:
                wake.set()
        self._task = asyncio.create_task(self._run(), name="convsync-sim-webhooks")

    async def stop(self) -> None:
        """Stop delivering; an event in flight is abandoned (it stays pending)."""
        task, session = self._task, self._session
        with self._lock:
            self._loop = self._wake = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if session is not None:
            await session.close()
        self._task = None
        self._session = None

    async def _run(self) -> None:
        while True:
            with self._lock:
                event = self._queue[0] if self._queue else None
                wake = self._wake
            if event is None:
                if wake is None:
                    return
                await wake.wait()
                wake.clear()
                continue
            await self._deliver(event)
            with self._changed:
                self._queue.popleft()
                self._pending -= 1
                self._changed.notify_all()

    async def _deliver(self, event: Outgoing) -> None:
        body = urlencode(event.fields).encode()
        signature = twilio_signature(event.url, event.fields, event.auth_token)
        with self._lock:
            self._count(event.event_type, "sent")
        for attempt in range(1, event.retries + 2):
            if attempt > 1:
                with self._lock:
                    self._count(event.event_type, "retried")
                await asyncio.sleep(event.backoff * 2 ** (attempt - 2))
            sent = await self._post(
                "event", event.event_type, event.token, event.url, body, signature, attempt,
                event.timeout,
            )  # fmt: skip
            if sent.ok:
                with self._lock:
                    self._count(event.event_type, "delivered")
                return
        with self._lock:
            self._count(event.event_type, "failed")

    async def _post(
        self,
        kind: str,
        event_type: str,
        token: str,
        url: str,
        body: bytes,
        signature: str | None,
        attempt: int,
        limit: float,
    ) -> Delivery:
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "I-Twilio-Idempotency-Token": token,
            "User-Agent": USER_AGENT,
            "Accept": "*/*",
        }
        if signature is not None:
            headers["X-Twilio-Signature"] = signature
        status: int | None = None
        error: str | None = None
        session = self._session
        try:
            if session is None:
                raise RuntimeError("the webhook sender is not running")
            async with session.post(
                url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=limit),
            ) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, RuntimeError) as failure:
            error = f"{type(failure).__name__}: {failure}"
        sent = Delivery(
            kind, event_type, token, url, body, signature, attempt, status, error, time.time()
        )
        with self._lock:
            self._log.append(sent)
        return sent

    # -- replays and tampered sends (for the receiver's tests) -------------------------------

    def _find(self, token: str | None, event_type: str | None) -> Delivery:
        with self._lock:
            for sent in reversed(self._log):
                if sent.kind != "event":
                    continue
                if token is not None and sent.token != token:
                    continue
                if event_type is not None and sent.event_type != event_type:
                    continue
                if token is None and event_type is None and not sent.ok:
                    continue
                return sent
        wanted = token or event_type or "delivered event"
        raise LookupError(f"no {wanted} among the remembered webhook attempts")

    async def replay(self, token: str | None = None, limit: float = 5.0) -> Delivery:
        """POST again, byte for byte (URL, body, signature, idempotency token), the last
        delivered event, or the latest attempt of the event ``token``; one attempt within
        ``limit`` seconds."""
        original = self._find(token, None)
        with self._lock:
            self._count(original.event_type, "manual")
        return await self._post(
            "replay", original.event_type, original.token, original.url, original.body,
            original.signature, 1, limit,
        )  # fmt: skip

    async def send(
        self,
        event_type: str | None,
        signature: SignatureMode,
        url: str | None,
        auth_token: str,
        limit: float = 5.0,
    ) -> Delivery:
        """POST the body of the latest attempt of ``event_type`` (any type when None) as a new
        event (a fresh idempotency token) to ``url`` (that attempt's when None), signed
        correctly (``good``), with a signature of the wrong key (``bad``) or unsigned
        (``none``); one attempt."""
        if signature not in ("good", "bad", "none"):
            raise ValueError("signature must be 'good', 'bad' or 'none'")
        template = self._find(None, event_type) if event_type else self._find_any()
        target = url or template.url
        params = _form_pairs(template.body)
        signed: str | None = None
        if signature == "good":
            signed = twilio_signature(target, params, auth_token)
        elif signature == "bad":
            signed = twilio_signature(target, params, "not-" + auth_token)
        with self._lock:
            self._count(template.event_type, "manual")
        return await self._post(
            "send", template.event_type, str(uuid.uuid4()), target, template.body, signed, 1,
            limit,
        )  # fmt: skip

    def _find_any(self) -> Delivery:
        with self._lock:
            for sent in reversed(self._log):
                if sent.kind == "event":
                    return sent
        raise LookupError("no webhook attempt to send again: mutate the dataset first")


def _form_pairs(body: bytes) -> list[tuple[str, str]]:
    return parse_qsl(body.decode(), keep_blank_values=True)
