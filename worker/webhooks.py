"""Twilio Conversations post-event webhooks in: authenticated, mapped to targets, durable.

``POST /webhooks/twilio`` (``convsync run`` with CONVSYNC_WEBHOOKS=true) takes the
form-encoded events Twilio posts after a change. Each request, in this order:

1. its body is read up to ``MAX_BODY_BYTES`` within ``BODY_TIMEOUT_SECONDS`` (a larger one is
   413, unread past the cap; a slower one 408);
2. its ``X-Twilio-Signature`` is checked (Twilio's scheme: base64 HMAC-SHA1, keyed by the
   account's auth token, of the URL Twilio called followed by every POST parameter sorted by
   name, name then value), in constant time: a wrong or missing one is 403 and changes nothing;
3. an event that changes a mirrored row is recorded (``worker.targets``) as the users to re-list,
   in the transaction that records its idempotency token (``I-Twilio-Idempotency-Token``, else a
   digest of the body), so a retried or replayed event adds nothing; only then is it 200. While
   PostgreSQL cannot record it, the answer is 503 and Twilio retries.

Other events are acknowledged (200) and ignored. Neither signatures nor tokens are logged.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import asyncpg
import structlog
from aiohttp import web

from worker.database import CONNECTION_ERRORS
from worker.errors import DatabaseUnavailable
from worker.metrics import Metrics
from worker.sids import is_sid

log = structlog.get_logger(__name__)
PATH = "/webhooks/twilio"
MAX_BODY_BYTES = 64 * 1024  # Twilio's events are a few kB; read no further than this
BODY_TIMEOUT_SECONDS = 10.0  # for the whole body (the sender is not authenticated yet)
RECORD_TIMEOUT_SECONDS = 5.0  # past this, 503: Twilio retries
# The events that change rows of the mirror, and whom they concern (see ``Event.members``).
PARTICIPANT_EVENTS = frozenset(
    {"onParticipantAdded", "onParticipantRemoved", "onParticipantUpdated"}
)
# The conversation's row changes: one current member's listing brings it.
CONVERSATION_EVENTS = frozenset({"onConversationUpdated", "onConversationStateUpdated"})
# Every current member's row changes (unread counts; the memberships themselves).
MEMBERS_EVENTS = frozenset({"onMessageAdded", "onConversationRemoved"})
HANDLED_EVENTS = PARTICIPANT_EVENTS | CONVERSATION_EVENTS | MEMBERS_EVENTS
# Anything that keeps the database from recording a webhook: 503, and Twilio retries.
RECORD_FAILURES: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    TimeoutError,
    DatabaseUnavailable,
    asyncpg.PostgresError,
)


def twilio_signature(auth_token: str, url: str, params: Sequence[tuple[str, str]]) -> str:
    """Twilio's X-Twilio-Signature of a form POST to ``url``."""
    grouped: dict[str, set[str]] = {}
    for name, value in params:
        grouped.setdefault(name, set()).add(value)
    payload = url + "".join(
        name + value for name in sorted(grouped) for value in sorted(grouped[name])
    )
    digest = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def url_forms(url: str) -> list[str]:
    """The URL as given, and with its default port written out or left out: Twilio signs
    the URL as configured, which may or may not name the port (as twilio-python checks)."""
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:  # not a number, or past 65535: the URL as given, which then fails
        return [url]
    if parts.username is not None or default is None:
        return [url]
    if port is None:
        other = parts._replace(netloc=f"{host}:{default}")
    elif port == default:
        other = parts._replace(netloc=host)
    else:
        return [url]
    return [url, urlunsplit(other)]


def signature_valid(
    auth_token: str, url: str, params: Sequence[tuple[str, str]], signature: str | None
) -> bool:
    """True when ``signature`` is Twilio's for this request (compared in constant time)."""
    if not signature:
        return False
    given = signature.encode("utf-8", "replace")
    matches = [
        hmac.compare_digest(twilio_signature(auth_token, form, params).encode(), given)
        for form in url_forms(url)
    ]
    return any(matches)


@dataclass(frozen=True)
class Event:
    """One webhook's meaning for the mirror: which users of which service to re-list."""

    event_type: str
    chat_service_sid: str
    conversation_sid: str | None
    identity: str | None  # the participant's, for a participant event
    scope: str  # "participant", "one_member" or "members"


def parse_event(form: Mapping[str, str]) -> Event | None:
    """The event a webhook's form describes; None when it changes nothing mirrored (an event
    not handled, a participant with no identity such as an SMS one, a malformed SID)."""
    event_type = form.get("EventType", "")
    service = form.get("ChatServiceSid", "")
    conversation = form.get("ConversationSid") or None
    if event_type not in HANDLED_EVENTS or not is_sid(service, "IS"):
        return None
    if conversation is not None and not is_sid(conversation, "CH"):
        return None
    if event_type in PARTICIPANT_EVENTS:
        identity = form.get("Identity") or None
        if identity is None or "\x00" in identity:  # none, or none PostgreSQL's text holds
            return None
        return Event(event_type, service, conversation, identity, "participant")
    if conversation is None:
        return None
    scope = "one_member" if event_type in CONVERSATION_EVENTS else "members"
    return Event(event_type, service, conversation, None, scope)


def event_label(event_type: str) -> str:
    """A metric label for an event type: one of Twilio's names, never free text."""
    return event_type if event_type in HANDLED_EVENTS else "other"


@dataclass(frozen=True)
class Recorded:
    """What recording one webhook did."""

    recorded: bool  # False: a duplicate (its idempotency key was known)
    new: int  # targets created
    coalesced: int  # targets already waiting, which this event joined


# Records an event's targets durably: (event or None, idempotency key) -> what it did. Raises
# a database error when it cannot.
Record = Callable[[Event | None, str], Awaitable[Recorded]]


class WebhookReceiver:
    """The aiohttp handler of ``POST /webhooks/twilio``."""

    def __init__(
        self,
        auth_token: str,
        public_url: str | None,
        record: Record,
        metrics: Metrics,
        *,
        services: Sequence[str] = (),
        on_recorded: Callable[[], None] = lambda: None,
    ) -> None:
        self._auth_token = auth_token
        self._public_url = public_url
        self._services = frozenset(services)  # empty: every service
        self._record = record
        self._metrics = metrics
        self._on_recorded = on_recorded

    async def handle(self, request: web.Request) -> web.Response:
        declared = request.content_length
        if declared is not None and declared > MAX_BODY_BYTES:
            return self._refuse("other", 413, "body too large")
        try:
            body = await _read_capped(request, MAX_BODY_BYTES)
        except TimeoutError:
            return self._refuse("other", 408, "body not received in time")
        if body is None:
            return self._refuse("other", 413, "body too large")
        try:
            params = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            return self._refuse("other", 400, "body is not UTF-8")
        form = dict(params)
        label = event_label(form.get("EventType", ""))
        try:
            url = self._public_url or str(request.url)
        except ValueError:  # built from a Host header that names no host:port
            return self._refuse(label, 400, "Host header invalid")
        if not signature_valid(
            self._auth_token, url, params, request.headers.get("X-Twilio-Signature")
        ):
            return self._refuse(label, 403, "signature invalid")
        event = parse_event(form)
        if event is not None and self._services and event.chat_service_sid not in self._services:
            event = None  # a service this worker does not mirror
        key = request.headers.get("I-Twilio-Idempotency-Token") or (
            "sha256:" + hashlib.sha256(body).hexdigest()
        )
        try:
            async with asyncio.timeout(RECORD_TIMEOUT_SECONDS):
                done = await self._record(event, key[:200])
        except RECORD_FAILURES as error:
            log.warning("webhook_unrecorded", event_type=label, error_kind=type(error).__name__)
            self._metrics.inc("convsync_webhooks_total", event_type=label, outcome="unavailable")
            return web.json_response({"status": "database unavailable"}, status=503)
        outcome = "ignored" if event is None else "accepted" if done.recorded else "duplicate"
        self._metrics.inc("convsync_webhooks_total", event_type=label, outcome=outcome)
        self._metrics.inc("convsync_relist_requests_total", done.new, outcome="new")
        self._metrics.inc("convsync_relist_requests_total", done.coalesced, outcome="coalesced")
        log.info(
            "webhook_received",
            event_type=label,
            outcome=outcome,
            targets_new=done.new,
            targets_coalesced=done.coalesced,
        )
        if done.new:  # a coalesced request keeps its target's due time: nothing to wake
            self._on_recorded()
        return web.json_response({"status": outcome})

    def _refuse(self, label: str, status: int, reason: str) -> web.Response:
        """Answer ``status``, counted refused; nothing is recorded."""
        self._metrics.inc("convsync_webhooks_total", event_type=label, outcome="refused")
        log.warning("webhook_refused", event_type=label, status=status, reason=reason)
        return web.json_response({"status": "refused", "reason": reason}, status=status)


async def _read_capped(request: web.Request, cap: int) -> bytes | None:
    """The whole body, or None past ``cap`` bytes (read no further); TimeoutError when it
    takes longer than ``BODY_TIMEOUT_SECONDS``."""
    chunks: list[bytes] = []
    size = 0
    async with asyncio.timeout(BODY_TIMEOUT_SECONDS):
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > cap:
                return None
            chunks.append(chunk)
    return b"".join(chunks)
