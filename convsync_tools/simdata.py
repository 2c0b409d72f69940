"""The simulator's seeded dataset: services, users and their conversation memberships.

Pure data, no HTTP. Everything is derived on demand from ``(seed, indices)`` with keyed BLAKE2b,
so 100k users cost nothing until they are listed; mutations (for tests) are a small overlay.

Identifiers are Twilio-shaped (prefix + 32 lowercase hex). Service, user and conversation SIDs
increase with their index (a seeded offset and jitter hide it), so "sorted by SID" is "sorted
by index" and keyset paging needs no sort: :meth:`Dataset.user_sid_index` and
:meth:`Dataset.conversation_sid_index` invert a SID to its position.

Every mutation also tells :meth:`Dataset.subscribe`'s listeners what it changed, as a
:class:`Change`: the event type and form fields of Twilio Conversations' post-event webhook
(``onParticipantAdded``, ``onMessageAdded``...); the simulator delivers them.

It imports nothing of the worker (``convsync_tools/ruff.toml`` enforces it): it is the
independent side of the tests.
"""

from __future__ import annotations

import bisect
import calendar
import contextlib
import hashlib
import json
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

DEMO_ACCOUNT_SID = "AC" + hashlib.blake2b(b"convsync-demo-account", digest_size=16).hexdigest()
DEMO_AUTH_TOKEN = hashlib.blake2b(b"convsync-demo-token", digest_size=16).hexdigest()
DEFAULT_BASE_URL = "https://conversations.twilio.com"

_EPOCH = 1_546_300_800  # 2019-01-01T00:00:00Z
_SPAN = 5 * 365 * 86_400
_STRIDE = 1 << 23  # room between consecutive ordered SIDs
_OFFSET_RANGE = 1 << 47  # ordered SIDs start at a seeded offset below this
_SID_RE = re.compile(r"^(?:US|CH|IS)[0-9a-f]{32}$")
_TRAILING_INDEX = re.compile(r"(\d{1,7})(?:@example\.com)?$")  # identities end with the index
MAX_USERS_PER_SERVICE = 1_000_000

STATES = ("active", "inactive", "closed")
NOTIFICATION_LEVELS = ("default", "muted")
CONVERSATION_FIELDS = frozenset(
    {
        "friendly_name",
        "unique_name",
        "attributes",
        "conversation_state",
        "timers",
        "created_by",
        "date_created",
        "date_updated",
    }
)

_FIRST = ("ana", "bo", "chidi", "dana", "emil", "fatima", "goran", "hana", "ivan", "jun", "kofi")
_LAST = ("garcia", "nguyen", "smith", "okafor", "kowalski", "tanaka", "haddad", "silva", "berg")
_UNICODE_IDENTITY = ("josé", "李伟", "أحمد", "yosef.כהן", "zoë", "Ωmega", "søren")
_PERSON_NAMES = (
    "Ana García",
    "Chidi Okafor",
    "李伟",
    "山田 太郎",
    "김민준",
    "أحمد حداد",
    "יוסף כהן",
    "Zoë Ångström",
    "👩‍💻 Dana",
    'O\'Brien "Bo"',
    "Søren Kierkegaard",
)
_TOPICS = (
    "Support",
    "Sales",
    "Onboarding",
    "Billing",
    "Incident",
    "Launch 🚀",
    "项目讨论组",
    "東京オフィス",
    "فريق الدعم",
    "צוות מכירות",
    "Café ☕ chat",
    "👨‍👩‍👧 Family",
    'Quotes "and" \\backslashes\\',
    "Ünïcödé ñame",
)
_SERVICE_NAMES = ("Default Conversations Service", "Support 🎧", "销售 Sales", "Internal Ops")
_TAGS = ("vip", "urgent", "beta", "emea", "apac", "紧急", "🔥")


EVENT_TYPES = (
    "onConversationAdded",
    "onConversationUpdated",
    "onConversationStateUpdated",
    "onConversationRemoved",
    "onParticipantAdded",
    "onParticipantUpdated",
    "onParticipantRemoved",
    "onMessageAdded",
)


@dataclass(frozen=True)
class Change:
    """One mutation as a Twilio post-event webhook reports it: ``fields`` are the form
    parameters in order (``AccountSid``, ``EventType``, ``Source``, ``ChatServiceSid``,
    ``ConversationSid``, then the event's own)."""

    event_type: str
    service_sid: str
    conversation_sid: str
    fields: tuple[tuple[str, str], ...]


# The most records kept derived (Dataset's caches): the benchmark's 40,000 users and their
# conversations fit; a larger dataset derives its least recently served again.
USERS_CACHED = 131_072
CONVERSATIONS_CACHED = 400_000


def _cache_size(wanted: int, least: int, most: int) -> int:
    """A cache bound: room for ``wanted`` entries (and some added at run time), within limits."""
    return min(most, max(least, wanted + wanted // 16))


def twilio_date(epoch_seconds: int) -> str:
    """An epoch time in Twilio's format, e.g. ``2015-07-30T20:00:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_seconds))


def webhook_date(date: str) -> str:
    """A Twilio API date as webhooks carry it, with milliseconds: ``2015-07-30T20:00:00.000Z``."""
    return date[:-1] + ".000Z"


def now_epoch() -> int:
    return int(time.time())


class _Bits:
    """Deterministic draws from a keyed digest (re-hashed when used up)."""

    __slots__ = ("_data", "_pool")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pool = int.from_bytes(data, "big")

    def below(self, n: int) -> int:
        if self._pool < 1 << 64:
            self._data = hashlib.blake2b(self._data).digest()
            self._pool = int.from_bytes(self._data, "big")
        self._pool, value = divmod(self._pool, n)
        return value

    def seed(self) -> int:
        return int.from_bytes(self._data, "big")

    def chance(self, p: float) -> bool:
        return self.below(1024) < p * 1024

    def pick(self, options: tuple[str, ...]) -> str:
        return options[self.below(len(options))]


@dataclass(frozen=True)
class DatasetParams:
    """What :meth:`Dataset.generate` was asked for."""

    seed: int
    services: int
    users_per_service: int
    account_sid: str
    members_per_conversation: float
    empty_fraction: float
    heavy_fraction: float
    max_conversations_per_user: int


class Dataset:
    """Seeded services, users and memberships, with a thread-safe mutation overlay.

    Users of a service are listed in SID order; a user's conversations in conversation SID order.
    One user per service (index ``n // 3``) always has more than 100 memberships (over two pages
    of 50) and the last user (when not that one) has none.
    """

    def __init__(self, params: DatasetParams) -> None:
        if params.services < 1 or params.users_per_service < 0:
            raise ValueError("need at least one service and a non-negative number of users")
        if params.users_per_service > MAX_USERS_PER_SERVICE:
            raise ValueError(f"at most {MAX_USERS_PER_SERVICE} users per service")
        if params.max_conversations_per_user < 101:
            raise ValueError("max_conversations_per_user must be at least 101")
        self.params = params
        self.account_sid = params.account_sid
        self._key = hashlib.blake2b(str(params.seed).encode(), digest_size=32).digest()
        self._lock = threading.RLock()
        self.version = 0
        n, m = params.users_per_service, params.max_conversations_per_user
        mean = (
            (1 - params.empty_fraction - params.heavy_fraction - 0.08) * 30.5
            + 0.08 * 105
            + params.heavy_fraction * (151 + m) / 2
        )
        self._pool = max(m + 50, round(n * mean / params.members_per_conversation))
        self._offsets: dict[tuple[str, int], int] = {}
        # the overlay
        self._added_users: list[int] = [0] * params.services
        self._added_identity: list[dict[str, int]] = [{} for _ in range(params.services)]
        self._user_overrides: dict[tuple[int, int], dict[str, Any]] = {}
        self._deleted: list[set[int]] = [set() for _ in range(params.services)]
        self._added_conversations: list[int] = [0] * params.services
        self._conversation_overrides: dict[tuple[int, int], dict[str, Any]] = {}
        self._removed: dict[tuple[int, int], set[int]] = {}
        self._added: dict[tuple[int, int], set[int]] = {}
        self._membership_overrides: dict[tuple[int, int, int], dict[str, Any]] = {}
        self._gone: set[tuple[int, int]] = set()  # removed conversations
        self._next_message: dict[tuple[int, int], int] = {}
        self._listeners: list[Callable[[Change], None]] = []
        self._count_cache: dict[int, list[int]] = {}
        self._generation = 0
        # Derived records are cached for the whole dataset up to the benchmark's 40,000 users
        # (~350,000 conversations: 520 MB resident), so that serving a page costs the same
        # whatever the dataset's size; caches of 32,768 users and 65,536 conversations made a
        # page 0.83 ms of the simulator's CPU at 40,000 users against 0.51 ms at 4,000.
        users = params.services * n
        conversations = params.services * self._pool
        self._base_memberships = lru_cache(maxsize=_cache_size(users, 32_768, USERS_CACHED))(
            self._compute_base_memberships
        )
        self._conversation = lru_cache(
            maxsize=_cache_size(conversations, 65_536, CONVERSATIONS_CACHED)
        )(self._compute_conversation)
        self._user = lru_cache(maxsize=_cache_size(users, 32_768, USERS_CACHED))(self._compute_user)
        self._base_members = lru_cache(maxsize=4096)(self._compute_base_members)
        self._attribute_pool = self._attribute_variants()
        self._service_sids = [self._ordered_sid("IS", 0, s) for s in range(params.services)]

    @classmethod
    def generate(
        cls,
        seed: int,
        services: int = 1,
        users_per_service: int = 100,
        *,
        account_sid: str = DEMO_ACCOUNT_SID,
        members_per_conversation: float = 4.0,
        empty_fraction: float = 0.2,
        heavy_fraction: float = 0.02,
        max_conversations_per_user: int = 400,
    ) -> Dataset:
        """A dataset of ``services`` x ``users_per_service`` users, derived lazily from ``seed``.

        Membership counts are skewed: ``empty_fraction`` of users have none, most 1..60, 8%
        61..150 and ``heavy_fraction`` 151..``max_conversations_per_user``; conversations are
        drawn from a per-service pool sized for ~``members_per_conversation`` members each.
        """
        return cls(
            DatasetParams(
                seed,
                services,
                users_per_service,
                account_sid,
                members_per_conversation,
                empty_fraction,
                heavy_fraction,
                max_conversations_per_user,
            )
        )

    # -- derivation ------------------------------------------------------------------------

    def _bits(self, *parts: object) -> _Bits:
        raw = "|".join(map(str, parts)).encode()
        return _Bits(hashlib.blake2b(raw, digest_size=64, key=self._key).digest())

    def _hex(self, n: int, *parts: object) -> str:
        raw = "|".join(map(str, parts)).encode()
        return hashlib.blake2b(raw, digest_size=(n + 1) // 2, key=self._key).hexdigest()[:n]

    def _offset(self, prefix: str, scope: int) -> int:
        offset = self._offsets.get((prefix, scope))
        if offset is None:
            offset = int(self._hex(12, "offset", prefix, scope), 16) % _OFFSET_RANGE
            self._offsets[(prefix, scope)] = offset
        return offset

    def _ordered_sid(self, prefix: str, scope: int, index: int) -> str:
        tail = self._hex(26, "sid", prefix, scope, index)
        head = self._offset(prefix, scope) + index * _STRIDE + int(tail[:6], 16) % _STRIDE
        return f"{prefix}{head:012x}{tail[6:]}"

    def _ordered_index(self, prefix: str, scope: int, sid: str) -> int | None:
        """The index whose SID is ``sid`` (None if no index can have it)."""
        if not sid.startswith(prefix) or not _SID_RE.match(sid):
            return None
        index = (int(sid[2:14], 16) - self._offset(prefix, scope)) // _STRIDE
        if index < 0 or self._ordered_sid(prefix, scope, index) != sid:
            return None
        return index

    def _membership_count(self, s: int, u: int) -> int:
        n, p = self.params.users_per_service, self.params
        bits = self._bits("count", s, u)
        m = p.max_conversations_per_user
        if u >= n:
            return 0
        if u == n // 3:
            return 101 + bits.below(m - 100)
        if u == n - 1:
            return 0
        draw = bits.below(1_000_000) / 1_000_000
        if draw < p.empty_fraction:
            return 0
        if draw < 1 - p.heavy_fraction - 0.08:
            return 1 + bits.below(60)
        if draw < 1 - p.heavy_fraction:
            return 61 + bits.below(90)
        return 151 + bits.below(m - 150)

    def _compute_base_memberships(self, s: int, u: int) -> tuple[int, ...]:
        count = self._membership_count(s, u)
        if count == 0:
            return ()
        # Conversations cluster around the user's place in the pool (teams, cohorts): users
        # near each other in SID order share conversations, which keeps caches warm for
        # SID-ordered sweeps; heavy users reach wider.
        rng = random.Random(self._bits("members", s, u).seed())
        pool = self._pool
        window = min(pool, max(512, 4 * count))
        start = u * pool // max(1, self.params.users_per_service) - window // 2
        return tuple(sorted((start + x) % pool for x in rng.sample(range(window), count)))

    def _compute_conversation(self, s: int, c: int) -> dict[str, Any]:
        bits = self._bits("conversation", s, c)
        created = _EPOCH + bits.below(_SPAN)
        updated = created + (0 if bits.chance(0.3) else bits.below(200 * 86_400))
        state = STATES[0 if bits.chance(0.6) else 1 if bits.chance(0.6) else 2]
        timers: dict[str, str] = {}
        shape = bits.below(100)
        if shape >= 50:
            inactive = updated + 3600 + bits.below(30 * 86_400)
            if shape < 70 or shape >= 85:
                timers["date_inactive"] = twilio_date(inactive)
            if shape >= 70:
                timers["date_closed"] = twilio_date(inactive + bits.below(60 * 86_400))
        unique: str | None = None
        if bits.chance(0.3):
            unique = f"conv-{s}-{c}-{bits.below(1 << 24):06x}"
        friendly: str | None = None
        if not bits.chance(0.15):
            topic = bits.pick(_TOPICS)
            friendly = topic if bits.chance(0.3) else f"{topic} #{c}"
            if bits.chance(0.02):
                friendly = (friendly + " " + "ab" * 200)[:256]
        n = self.params.users_per_service
        created_by: str | None = None
        if n and not bits.chance(0.15):
            created_by = self._identity(s, bits.below(n))
        return {
            "sid": self._ordered_sid("CH", s, c),
            "friendly_name": friendly,
            "conversation_state": state,
            "timers": timers,
            "attributes": self._attributes(bits),
            "date_created": twilio_date(created),
            "date_updated": twilio_date(updated),
            "created_by": created_by,
            "unique_name": unique,
        }

    def _attribute_variants(self) -> list[str]:
        """A seeded pool of non-empty attribute JSON strings, flat and nested, at least as
        heavy as the spec's examples: unicode, escapes (quotes, backslashes, newlines), numbers
        of every JSON kind, arrays of objects."""
        variants = []
        for index in range(64):
            bits = self._bits("attributes", index)
            if index % 2:
                variants.append(json.dumps({"priority": bits.below(5), "tags": [bits.pick(_TAGS)]}))
                continue
            nested = {
                "customer": {
                    "tier": bits.pick(("gold", "silver", "bronze")),
                    "name": bits.pick(_PERSON_NAMES),
                    "id": f"cus_{bits.below(1 << 40):010x}",
                    "since": twilio_date(_EPOCH + bits.below(_SPAN)),
                },
                "routing": {
                    "queue": {
                        "id": bits.below(1000),
                        "skills": [bits.pick(_TAGS), bits.pick(_TAGS)],
                    },
                    "weights": [0.25, 1e-3, -7, 12345678901],
                },
                "note": f"{bits.pick(_TOPICS)}\n\tsee "
                + f'"ticket" #{bits.below(10**6)} \\ {bits.pick(_TAGS)}',
                "history": [{"at": bits.below(10**9), "by": bits.pick(_FIRST)} for _ in range(3)],
                "flags": [True, None, 1.5],
            }
            variants.append(json.dumps(nested, ensure_ascii=index % 4 == 0))
        return variants

    def _attributes(self, bits: _Bits) -> str:
        """``"{}"`` (Twilio's default) 30% of the time, else a flat or nested JSON object."""
        if bits.below(10) < 3:
            return "{}"
        return self._attribute_pool[bits.below(len(self._attribute_pool))]

    def _identity(self, s: int, u: int) -> str:
        bits = self._bits("identity", s, u)
        shape = bits.below(100)
        if shape < 70:
            return f"{bits.pick(_FIRST)}.{bits.pick(_LAST)}.{u}@example.com"
        if shape < 90:
            return f"agent{u:05d}"
        if shape < 97:
            return f"{bits.pick(_UNICODE_IDENTITY)}{u}"
        return f"+1555{u:07d}"

    def _compute_user(self, s: int, u: int) -> dict[str, Any]:
        bits = self._bits("user", s, u)
        created = _EPOCH + bits.below(_SPAN)
        updated = created + (0 if bits.chance(0.5) else bits.below(100 * 86_400))
        friendly: str | None = None if bits.chance(0.2) else bits.pick(_PERSON_NAMES)
        role = 1 if bits.chance(0.05) else 0
        online: bool | None = None if bits.chance(0.3) else bits.chance(0.4)
        notifiable: bool | None = None if bits.chance(0.3) else bits.chance(0.7)
        return {
            "sid": self._ordered_sid("US", s, u),
            "role_sid": "RL" + self._hex(32, "role", s, role),
            "identity": self._identity(s, u),
            "friendly_name": friendly,
            "attributes": self._attributes(bits),
            "is_online": online,
            "is_notifiable": notifiable,
            "date_created": twilio_date(created),
            "date_updated": twilio_date(updated),
        }

    def _membership_fields(self, s: int, u: int, c: int) -> dict[str, Any]:
        """Per-membership fields: one digest gives the participant SID and every draw."""
        digest = hashlib.blake2b(
            f"membership|{s}|{u}|{c}".encode(), digest_size=24, key=self._key
        ).digest()
        last_read: int | None = None
        unread: int | None = None
        if digest[16] >= 51:  # ~20% have never read
            last_read = int.from_bytes(digest[17:19], "big") % 500
            unread = 0 if digest[19] < 154 else 1 + digest[20] % 50  # ~60% caught up
        fields: dict[str, Any] = {
            "participant_sid": "MB" + digest[:16].hex(),
            "notification_level": "muted" if digest[21] < 26 else "default",  # ~10%
            "unread_messages_count": unread,
            "last_read_message_index": last_read,
        }
        override = self._membership_overrides.get((s, u, c))
        if override:
            fields.update(override)
        return fields

    # -- lookups (callers hold no lock; these take it) -----------------------------------

    @property
    def service_count(self) -> int:
        return self.params.services

    def service_sid(self, s: int) -> str:
        return self._service_sids[s]

    def service_sids(self) -> list[str]:
        return [self.service_sid(s) for s in range(self.params.services)]

    @property
    def default_service_sid(self) -> str:
        """The account's default Conversation Service (the first one)."""
        return self.service_sid(0)

    def service_index(self, sid: str) -> int | None:
        s = self._ordered_index("IS", 0, sid)
        return s if s is not None and s < self.params.services else None

    def position_sid(self, prefix: str, scope: int, index: int) -> str:
        """The SID at a listing position (``IS`` scope 0; ``US``/``CH`` scope: service index),
        whether or not anything lives there: a keyset marker."""
        return self._ordered_sid(prefix, scope, index)

    def position_of(self, prefix: str, scope: int, sid: str) -> int | None:
        """The listing position of a SID made by :meth:`position_sid` (None if none is)."""
        return self._ordered_index(prefix, scope, sid)

    def _user_total(self, s: int) -> int:
        return self.params.users_per_service + self._added_users[s]

    def _live_user(self, s: int, u: int) -> bool:
        return 0 <= u < self._user_total(s) and u not in self._deleted[s]

    def user_index(self, s: int, sid_or_identity: str) -> int | None:
        """The live user addressed by SID or identity (case-sensitive), or None."""
        with self._lock:
            if sid_or_identity.startswith("US") and _SID_RE.match(sid_or_identity):
                u = self._ordered_index("US", s, sid_or_identity)
            else:
                u = self._added_identity[s].get(sid_or_identity)
                if u is None:
                    match = _TRAILING_INDEX.search(sid_or_identity)
                    u = int(match.group(1)) if match else None
                    if u is not None and (
                        u >= self.params.users_per_service
                        or self._user_value(s, u, "identity") != sid_or_identity
                    ):
                        u = None
            return u if u is not None and self._live_user(s, u) else None

    def _user_value(self, s: int, u: int, field: str) -> Any:
        override = self._user_overrides.get((s, u))
        if override and field in override:
            return override[field]
        return self._user(s, u)[field]

    def _conversation_total(self, s: int) -> int:
        return self._pool + self._added_conversations[s]

    def _memberships(self, s: int, u: int) -> list[int] | tuple[int, ...]:
        base = self._base_memberships(s, u)
        removed, added = self._removed.get((s, u)), self._added.get((s, u))
        if not removed and not added:
            return base
        return sorted((set(base) - (removed or set())) | (added or set()))

    # -- pages (keyset: items after / before a position) ----------------------------------

    def service_page(
        self, after: int | None, before: int | None, limit: int
    ) -> tuple[list[int], bool]:
        """Service indices after ``after`` (or the last ``limit`` before ``before``), and
        whether more follow the page."""
        total = self.params.services
        if before is not None:
            end = min(before, total)
            return list(range(max(0, end - limit), end)), end < total
        start = 0 if after is None else after + 1
        return list(range(start, min(total, start + limit))), start + limit < total

    def user_page(
        self, s: int, after: int | None, before: int | None, limit: int
    ) -> tuple[list[int], bool]:
        """Live user indices after ``after`` (or the last ``limit`` before ``before``), and
        whether more follow the page."""
        with self._lock:
            total = self._user_total(s)
            found: list[int] = []
            if before is not None:
                u = min(before, total) - 1
                while u >= 0 and len(found) < limit:
                    if u not in self._deleted[s]:
                        found.append(u)
                    u -= 1
                found.reverse()
                start = found[-1] + 1 if found else min(before, total)
                more = any(self._live_user(s, i) for i in range(start, total))
                return found, more
            u = 0 if after is None else after + 1
            while u < total and len(found) <= limit:
                if u not in self._deleted[s]:
                    found.append(u)
                u += 1
            return found[:limit], len(found) > limit

    def membership_page(
        self, s: int, u: int, after: int | None, before: int | None, limit: int
    ) -> tuple[list[int], bool]:
        """Conversation indices of a user's memberships (keyset), and whether more follow."""
        with self._lock:
            items = self._memberships(s, u)
            if before is not None:
                end = bisect.bisect_left(items, before)
                return list(items[max(0, end - limit) : end]), end < len(items)
            start = 0 if after is None else bisect.bisect_right(items, after)
            return list(items[start : start + limit]), start + limit < len(items)

    # -- resources --------------------------------------------------------------------------

    def service_resource(self, s: int, base_url: str = DEFAULT_BASE_URL) -> dict[str, Any]:
        sid = self.service_sid(s)
        bits = self._bits("service", s)
        created = _EPOCH + bits.below(_SPAN // 5)
        url = f"{base_url}/v1/Services/{sid}"
        links = (
            "conversations",
            "users",
            "roles",
            "bindings",
            "configuration",
            "participant_conversations",
            "conversation_with_participants",
        )
        names = {
            "conversations": "Conversations",
            "users": "Users",
            "roles": "Roles",
            "bindings": "Bindings",
            "configuration": "Configuration",
            "participant_conversations": "ParticipantConversations",
            "conversation_with_participants": "ConversationWithParticipants",
        }
        return {
            "sid": sid,
            "account_sid": self.account_sid,
            "friendly_name": _SERVICE_NAMES[s % len(_SERVICE_NAMES)] + (f" {s}" if s else ""),
            "date_created": twilio_date(created),
            "date_updated": twilio_date(created + bits.below(86_400 * 30)),
            "url": url,
            "links": {name: f"{url}/{names[name]}" for name in links},
        }

    def user_resource(
        self, s: int, u: int, base_url: str = DEFAULT_BASE_URL, *, fetch: bool = False
    ) -> dict[str, Any]:
        """A user as listed (``is_online``/``is_notifiable`` null) or fetched (``fetch``)."""
        with self._lock:
            user = self._user(s, u)
            override = self._user_overrides.get((s, u))
            if override:
                user = {**user, **override}
        service_sid = self.service_sid(s)
        url = f"{base_url}/v1/Services/{service_sid}/Users/{user['sid']}"
        return {
            "sid": user["sid"],
            "account_sid": self.account_sid,
            "chat_service_sid": service_sid,
            "role_sid": user["role_sid"],
            "identity": user["identity"],
            "friendly_name": user["friendly_name"],
            "attributes": user["attributes"],
            "is_online": user["is_online"] if fetch else None,
            "is_notifiable": user["is_notifiable"] if fetch else None,
            "date_created": user["date_created"],
            "date_updated": user["date_updated"],
            "url": url,
            "links": {"user_conversations": f"{url}/Conversations"},
        }

    def membership_resource(
        self,
        s: int,
        u: int,
        c: int,
        base_url: str = DEFAULT_BASE_URL,
        *,
        default_service_form: bool = False,
    ) -> dict[str, Any]:
        """A user-conversation resource; ``default_service_form`` renders it as under
        ``/v1/Users/{UserSid}/Conversations`` (the account's default service)."""
        return self.membership_resources(
            s, u, [c], base_url, default_service_form=default_service_form
        )[0]

    def membership_resources(
        self,
        s: int,
        u: int,
        conversations: list[int],
        base_url: str = DEFAULT_BASE_URL,
        *,
        default_service_form: bool = False,
    ) -> list[dict[str, Any]]:
        """:meth:`membership_resource` for several conversations of one user (one lock)."""
        service_sid = self.service_sid(s)
        account_sid = self.account_sid
        with self._lock:
            user_sid = self._user(s, u)["sid"]
            rows = []
            for c in conversations:
                conv = self._conversation(s, c)
                override = self._conversation_overrides.get((s, c))
                if override:
                    conv = {**conv, **override}
                rows.append((conv, self._membership_fields(s, u, c)))
        if default_service_form:
            item_base = f"{base_url}/v1/Users/{user_sid}/Conversations/"
            conv_base = f"{base_url}/v1/Conversations/"
        else:
            item_base = f"{base_url}/v1/Services/{service_sid}/Users/{user_sid}/Conversations/"
            conv_base = f"{base_url}/v1/Services/{service_sid}/Conversations/"
        items = []
        for conv, member in rows:
            conv_sid = conv["sid"]
            conv_url = conv_base + conv_sid
            items.append(
                {
                    "account_sid": account_sid,
                    "chat_service_sid": service_sid,
                    "conversation_sid": conv_sid,
                    "unread_messages_count": member["unread_messages_count"],
                    "last_read_message_index": member["last_read_message_index"],
                    "participant_sid": member["participant_sid"],
                    "user_sid": user_sid,
                    "friendly_name": conv["friendly_name"],
                    "conversation_state": conv["conversation_state"],
                    "timers": dict(conv["timers"]),
                    "attributes": conv["attributes"],
                    "date_created": conv["date_created"],
                    "date_updated": conv["date_updated"],
                    "created_by": conv["created_by"],
                    "notification_level": member["notification_level"],
                    "unique_name": conv["unique_name"],
                    "url": item_base + conv_sid,
                    "links": {
                        "participant": f"{conv_url}/Participants/{member['participant_sid']}",
                        "conversation": conv_url,
                    },
                }
            )
        return items

    # -- expectations for tests -------------------------------------------------------------

    def services(self, base_url: str = DEFAULT_BASE_URL) -> list[dict[str, Any]]:
        """Every service resource, in listing order."""
        return [self.service_resource(s, base_url) for s in range(self.params.services)]

    def user_indices(self, s: int) -> Iterator[int]:
        """Live users of service ``s`` in listing order (lazily)."""
        after: int | None = None
        while True:
            page, more = self.user_page(s, after, None, 500)
            yield from page
            if not more or not page:
                return
            after = page[-1]

    def derive(self) -> None:
        """Derive now what the first requests would: every user, its memberships and their
        conversations (kept while the caches hold them: up to ``USERS_CACHED`` users). A walk
        then costs the simulator what later walks do, as after the benchmark's warm-up walk."""
        for s in range(self.params.services):
            for u in self.user_indices(s):
                with self._lock:
                    self._user(s, u)
                    for c in self._memberships(s, u):
                        self._conversation(s, c)

    def user_sids(self, service_sid: str) -> list[str]:
        s = self._service(service_sid)
        return [self._user(s, u)["sid"] for u in self.user_indices(s)]

    def expected_users(
        self, base_url: str = DEFAULT_BASE_URL, service_sid: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Users exactly as the users listing returns them, service by service."""
        for s in self._service_range(service_sid):
            for u in self.user_indices(s):
                yield self.user_resource(s, u, base_url)

    def memberships(
        self,
        service_sid: str,
        user: str,
        base_url: str = DEFAULT_BASE_URL,
        *,
        default_service_form: bool = False,
    ) -> list[dict[str, Any]]:
        """One user's memberships as its conversations listing returns them."""
        s, u = self._service(service_sid), self._user_of(service_sid, user)
        with self._lock:
            items = list(self._memberships(s, u))
        return self.membership_resources(
            s, u, items, base_url, default_service_form=default_service_form
        )

    def expected_memberships(
        self, base_url: str = DEFAULT_BASE_URL, service_sid: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every membership exactly as the API lists it: service, user, conversation order."""
        for s in self._service_range(service_sid):
            for u in self.user_indices(s):
                with self._lock:
                    items = list(self._memberships(s, u))
                yield from self.membership_resources(s, u, items, base_url)

    def membership_count(self, service_sid: str, user: str) -> int:
        s, u = self._service(service_sid), self._user_of(service_sid, user)
        with self._lock:
            return len(self._memberships(s, u))

    def _service_range(self, service_sid: str | None) -> list[int]:
        if service_sid is None:
            return list(range(self.params.services))
        return [self._service(service_sid)]

    # -- conversation members (a reverse index, built per conversation on demand) -----------

    def _counts(self, s: int) -> list[int]:
        """Every generated user's membership count in service ``s`` (computed once)."""
        counts = self._count_cache.get(s)
        if counts is None:
            counts = [self._membership_count(s, u) for u in range(self.params.users_per_service)]
            self._count_cache[s] = counts
        return counts

    def _compute_base_members(self, s: int, c: int) -> tuple[int, ...]:
        """Generated users whose base memberships hold ``c``: only users whose draw window
        covers ``c`` are drawn (see :meth:`_compute_base_memberships`)."""
        if c >= self._pool:
            return ()
        pool, n = self._pool, self.params.users_per_service
        found = []
        for u, count in enumerate(self._counts(s)):
            if not count:
                continue
            window = min(pool, max(512, 4 * count))
            start = u * pool // max(1, n) - window // 2
            if (c - start) % pool >= window:
                continue
            base = self._base_memberships(s, u)
            at = bisect.bisect_left(base, c)
            if at < len(base) and base[at] == c:
                found.append(u)
        return tuple(found)

    def _members(self, s: int, c: int, *, live: bool = True) -> list[int]:
        """Users who are members of conversation ``c`` now (the overlay applied), in user
        order; ``live``: deleted users left out. Caller holds the lock."""
        members = set(self._base_members(s, c))
        for (scope, u), added in self._added.items():
            if scope == s and c in added:
                members.add(u)
        for (scope, u), removed in self._removed.items():
            if scope == s and c in removed:
                members.discard(u)
        return sorted(u for u in members if not live or self._live_user(s, u))

    def conversation_members(self, service_sid: str, conversation_sid: str) -> list[str]:
        """The SIDs of a conversation's current members (live users), in SID order.

        The first call for a conversation scans the service's users once (cheaply: only those
        whose draws can reach it are drawn); the answer for the generated data is cached.
        """
        with self._lock:
            s = self._service(service_sid)
            c = self._conversation_of(s, conversation_sid)
            return [self._user(s, u)["sid"] for u in self._members(s, c)]

    # -- change events ---------------------------------------------------------------------

    def subscribe(self, listener: Callable[[Change], None]) -> Callable[[], None]:
        """Call ``listener`` with each mutation's :class:`Change`; returns an unsubscribe.

        Listeners run on the mutating thread, under the dataset's lock, in mutation order:
        they must be quick (e.g. put it on a queue) and must not block.
        """
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    def _emit(self, event_type: str, s: int, c: int, **fields: str | int | None) -> None:
        """Tell listeners of one event (None-valued fields are left out, as Twilio does)."""
        if not self._listeners:
            return
        form: list[tuple[str, str]] = [
            ("AccountSid", self.account_sid),
            ("EventType", event_type),
            ("Source", "API"),
            ("ChatServiceSid", self.service_sid(s)),
            ("ConversationSid", self._ordered_sid("CH", s, c)),
        ]
        form.extend((name, str(value)) for name, value in fields.items() if value is not None)
        change = Change(event_type, self.service_sid(s), form[4][1], tuple(form))
        for listener in list(self._listeners):
            listener(change)

    def _current_conversation(self, s: int, c: int) -> dict[str, Any]:
        override = self._conversation_overrides.get((s, c))
        conv = self._conversation(s, c)
        return {**conv, **override} if override else conv

    def _conversation_fields(self, conv: dict[str, Any]) -> dict[str, str | int | None]:
        return {
            "FriendlyName": conv["friendly_name"],
            "UniqueName": conv["unique_name"],
            "Attributes": conv["attributes"],
            "DateCreated": webhook_date(conv["date_created"]),
            "DateUpdated": webhook_date(conv["date_updated"]),
            "State": conv["conversation_state"],
        }

    def _participant_role(self, s: int) -> str:
        """The (fake) conversation-scoped role every participant has."""
        return "RL" + self._hex(32, "participant-role", s)

    def _emit_participant_updated(self, s: int, u: int, c: int, fields: dict[str, Any]) -> None:
        self._emit(
            "onParticipantUpdated",
            s,
            c,
            ParticipantSid=fields["participant_sid"],
            Identity=self._user_value(s, u, "identity"),
            RoleSid=self._participant_role(s),
            Attributes="{}",
            LastReadMessageIndex=fields["last_read_message_index"],
            DateUpdated=webhook_date(twilio_date(now_epoch())),
        )

    # -- mutations (thread-safe; each bumps ``version`` and tells :meth:`subscribe`'s
    # listeners what Twilio's post-event webhooks would) -------------------------------------

    def _service(self, service_sid: str) -> int:
        s = self.service_index(service_sid)
        if s is None:
            raise KeyError(f"no service {service_sid}")
        return s

    def _user_of(self, service_sid: str, user: str) -> int:
        u = self.user_index(self._service(service_sid), user)
        if u is None:
            raise KeyError(f"no user {user} in {service_sid}")
        return u

    def _conversation_of(self, s: int, conversation_sid: str) -> int:
        c = self._ordered_index("CH", s, conversation_sid)
        if c is None or c >= self._conversation_total(s) or (s, c) in self._gone:
            raise KeyError(f"no conversation {conversation_sid}")
        return c

    def _now(self, not_before: str) -> str:
        """Now in Twilio's format, strictly later than ``not_before``."""
        now = twilio_date(now_epoch())
        if now <= not_before:
            stamp = calendar.timegm(time.strptime(not_before, "%Y-%m-%dT%H:%M:%SZ"))
            now = twilio_date(stamp + 1)
        return now

    def _member_of(
        self, service_sid: str, user: str, conversation_sid: str
    ) -> tuple[int, int, int]:
        """(s, u, c) of a current membership (KeyError if there is none)."""
        s, u = self._service(service_sid), self._user_of(service_sid, user)
        c = self._conversation_of(s, conversation_sid)
        if c not in self._memberships(s, u):
            raise KeyError(f"{user} is not a member of {conversation_sid}")
        return s, u, c

    def remove_membership(self, service_sid: str, user: str, conversation_sid: str) -> None:
        """The user leaves the conversation (KeyError if it was not a member);
        ``onParticipantRemoved``."""
        with self._lock:
            s, u, c = self._member_of(service_sid, user, conversation_sid)
            participant = self._membership_fields(s, u, c)["participant_sid"]
            self._drop_membership(s, u, c)
            self.version += 1
            identity = self._user_value(s, u, "identity")
            self._emit("onParticipantRemoved", s, c, ParticipantSid=participant, Identity=identity)

    def _drop_membership(self, s: int, u: int, c: int) -> None:
        added = self._added.get((s, u))
        if added and c in added:
            added.discard(c)
        else:
            self._removed.setdefault((s, u), set()).add(c)
        self._membership_overrides.pop((s, u, c), None)

    def add_membership(
        self,
        service_sid: str,
        user: str,
        conversation_sid: str | None = None,
        *,
        notification_level: str = "default",
        unread_messages_count: int | None = 0,
        last_read_message_index: int | None = None,
    ) -> str:
        """The user joins a conversation (a new one when ``conversation_sid`` is None) with a
        new participant; returns the conversation SID (ValueError if already a member).
        ``onConversationAdded`` (a new conversation), then ``onParticipantAdded``."""
        if notification_level not in NOTIFICATION_LEVELS:
            raise ValueError(f"notification_level must be one of {NOTIFICATION_LEVELS}")
        with self._lock:
            s, u = self._service(service_sid), self._user_of(service_sid, user)
            created = conversation_sid is None
            if conversation_sid is None:
                c = self._conversation_total(s)
                self._added_conversations[s] += 1
                stamp = twilio_date(now_epoch())
                self._conversation_overrides[(s, c)] = {
                    "date_created": stamp,
                    "date_updated": stamp,
                    "timers": {},
                    "conversation_state": "active",
                }
            else:
                c = self._conversation_of(s, conversation_sid)
                if c in self._memberships(s, u):
                    raise ValueError(f"{user} is already a member of {conversation_sid}")
            removed = self._removed.get((s, u))
            if removed and c in removed:
                removed.discard(c)
            else:
                self._added.setdefault((s, u), set()).add(c)
            self._generation += 1
            participant = "MB" + self._hex(32, "participant", s, u, c, self._generation)
            self._membership_overrides[(s, u, c)] = {
                "participant_sid": participant,
                "notification_level": notification_level,
                "unread_messages_count": unread_messages_count,
                "last_read_message_index": last_read_message_index,
            }
            self.version += 1
            conv = self._current_conversation(s, c)
            if created:
                fields = self._conversation_fields(conv)
                del fields["DateUpdated"]
                self._emit("onConversationAdded", s, c, **fields)
            self._emit(
                "onParticipantAdded",
                s,
                c,
                ParticipantSid=participant,
                Identity=self._user_value(s, u, "identity"),
                DateCreated=webhook_date(twilio_date(now_epoch())),
                RoleSid=self._participant_role(s),
                Attributes="{}",
            )
            return str(conv["sid"])

    def delete_user(self, service_sid: str, user: str) -> None:
        """The user is deleted: gone from the users listing, 404 for its conversations."""
        with self._lock:
            s, u = self._service(service_sid), self._user_of(service_sid, user)
            self._deleted[s].add(u)
            self.version += 1

    def add_user(
        self, service_sid: str, identity: str | None = None, friendly_name: str | None = None
    ) -> str:
        """A new user with no memberships (listed after the existing ones); returns its SID."""
        with self._lock:
            s = self._service(service_sid)
            u = self._user_total(s)
            identity = identity or f"new.user.{u}@example.org"
            if self.user_index(s, identity) is not None:
                raise ValueError(f"identity {identity!r} is taken")
            self._added_users[s] += 1
            self._added_identity[s][identity] = u
            stamp = twilio_date(now_epoch())
            self._user_overrides[(s, u)] = {
                "identity": identity,
                "friendly_name": friendly_name,
                "attributes": "{}",
                "date_created": stamp,
                "date_updated": stamp,
            }
            self.version += 1
            return str(self._user(s, u)["sid"])

    def update_conversation(self, service_sid: str, conversation_sid: str, **fields: Any) -> None:
        """Change conversation-level fields (seen by every member); bumps ``date_updated``
        unless given. Fields: friendly_name, unique_name, attributes, conversation_state,
        timers, created_by, date_created, date_updated. ``onConversationStateUpdated`` when the
        state changes, ``onConversationUpdated`` for any other change (a state set to the one
        it had still moves ``date_updated``)."""
        unknown = set(fields) - CONVERSATION_FIELDS
        if unknown:
            raise ValueError(f"not conversation fields: {sorted(unknown)}")
        state = fields.get("conversation_state")
        if state is not None and state not in STATES:
            raise ValueError(f"conversation_state must be one of {STATES}")
        with self._lock:
            s = self._service(service_sid)
            c = self._conversation_of(s, conversation_sid)
            override = self._conversation_overrides.setdefault((s, c), {})
            current = {**self._conversation(s, c), **override}
            override.update(fields)
            if "date_updated" not in fields:
                override["date_updated"] = self._now(current["date_updated"])
            self.version += 1
            after = self._current_conversation(s, c)
            before_state, after_state = current["conversation_state"], after["conversation_state"]
            if set(fields) - {"conversation_state"} or before_state == after_state:
                self._emit("onConversationUpdated", s, c, **self._conversation_fields(after))
            if before_state != after_state:
                self._emit(
                    "onConversationStateUpdated",
                    s,
                    c,
                    StateFrom=before_state,
                    StateTo=after_state,
                    Reason="API",
                    StateUpdated=webhook_date(after["date_updated"]),
                    DateCreated=webhook_date(after["date_created"]),
                    DateUpdated=webhook_date(after["date_updated"]),
                )

    def remove_conversation(self, service_sid: str, conversation_sid: str) -> list[str]:
        """The conversation is deleted: every membership of it disappears and its SID is
        unknown from then on; returns the SIDs of the live users who were members.
        ``onConversationRemoved``."""
        with self._lock:
            s = self._service(service_sid)
            c = self._conversation_of(s, conversation_sid)
            conv = self._current_conversation(s, c)
            members = self._members(s, c, live=False)
            for u in members:
                self._drop_membership(s, u, c)
            self._gone.add((s, c))
            self.version += 1
            self._emit("onConversationRemoved", s, c, **self._conversation_fields(conv))
            return [self._user(s, u)["sid"] for u in members if self._live_user(s, u)]

    def set_unread(
        self,
        service_sid: str,
        user: str,
        conversation_sid: str,
        unread_messages_count: int | None,
        last_read_message_index: int | None = None,
    ) -> None:
        """Set one membership's read horizon; ``onParticipantUpdated``."""
        with self._lock:
            s, u, c = self._member_of(service_sid, user, conversation_sid)
            current = self._membership_fields(s, u, c)
            current["unread_messages_count"] = unread_messages_count
            current["last_read_message_index"] = last_read_message_index
            self._membership_overrides[(s, u, c)] = current
            self.version += 1
            self._emit_participant_updated(s, u, c, current)

    def set_notification_level(
        self, service_sid: str, user: str, conversation_sid: str, notification_level: str
    ) -> None:
        """Set one membership's notification level; ``onParticipantUpdated`` if it changed."""
        if notification_level not in NOTIFICATION_LEVELS:
            raise ValueError(f"notification_level must be one of {NOTIFICATION_LEVELS}")
        with self._lock:
            s, u, c = self._member_of(service_sid, user, conversation_sid)
            current = self._membership_fields(s, u, c)
            changed = current["notification_level"] != notification_level
            current["notification_level"] = notification_level
            self._membership_overrides[(s, u, c)] = current
            self.version += 1
            if changed:
                self._emit_participant_updated(s, u, c, current)

    def add_message(
        self, service_sid: str, author_user: str, conversation_sid: str, body: str | None = None
    ) -> int:
        """A member posts a message; returns its index. ``onMessageAdded``.

        Every other current member's ``unread_messages_count`` goes up by one, except where it
        is None (a member that never read has no count: Twilio reports null) which stays None;
        the author's read horizon is left alone (as for messages sent through the REST API).
        Indices continue from the highest any member's horizon implies (last read + unread).
        The conversation's ``date_updated`` moves on.
        """
        with self._lock:
            s, u, c = self._member_of(service_sid, author_user, conversation_sid)
            members = self._members(s, c)
            rows = {v: self._membership_fields(s, v, c) for v in members}
            index = self._next_message.get((s, c))
            if index is None:
                index = max(
                    (
                        row["last_read_message_index"] + (row["unread_messages_count"] or 0) + 1
                        for row in rows.values()
                        if row["last_read_message_index"] is not None
                    ),
                    default=0,
                )
            self._next_message[(s, c)] = index + 1
            for v, row in rows.items():
                if v != u and row["unread_messages_count"] is not None:
                    row["unread_messages_count"] += 1
                    self._membership_overrides[(s, v, c)] = row
            override = self._conversation_overrides.setdefault((s, c), {})
            current = {**self._conversation(s, c), **override}
            override["date_updated"] = self._now(current["date_updated"])
            self.version += 1
            self._emit(
                "onMessageAdded",
                s,
                c,
                MessageSid="IM" + self._hex(32, "message", s, c, index),
                Index=index,
                Author=self._user_value(s, u, "identity"),
                Body=f"Message {index}" if body is None else body,
                Attributes="{}",
                ParticipantSid=rows[u]["participant_sid"],
                DateCreated=webhook_date(override["date_updated"]),
            )
            return index
