"""API JSON -> typed rows, and the reason an item cannot become one.

Field names, types, enums and SID patterns follow Twilio's OpenAPI spec for Conversations v1.
A bad item never stops a page: it is returned in ``rejected`` with its reason, to be
quarantined, while the page's good items are kept.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec

from worker.errors import InvalidItem
from worker.sids import SID_PATTERNS, is_sid

# Stands, among seen SIDs, for an item whose SID could not be read: a listing holding one does
# not prove any membership gone. Never a valid SID.
UNIDENTIFIED = "?"
CONVERSATION_STATES = frozenset({"inactive", "active", "closed"})
NOTIFICATION_LEVELS = frozenset({"default", "muted"})


RowT = TypeVar("RowT")
_BodyT = TypeVar("_BodyT")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ServiceRow:
    chat_service_sid: str
    account_sid: str | None
    friendly_name: str | None
    date_created: datetime | None
    date_updated: datetime | None
    url: str | None
    links: str | None


@dataclass(frozen=True, slots=True)
class UserRow:
    chat_service_sid: str
    user_sid: str
    account_sid: str | None
    role_sid: str | None
    identity: str | None
    friendly_name: str | None
    attributes: str | None
    is_online: bool | None
    is_notifiable: bool | None
    date_created: datetime | None
    date_updated: datetime | None
    url: str | None
    links: str | None


@dataclass(frozen=True, slots=True)
class ConversationRow:
    chat_service_sid: str
    conversation_sid: str
    account_sid: str | None
    friendly_name: str | None
    unique_name: str | None
    attributes: str | None
    conversation_state: str | None
    created_by: str | None
    date_created: datetime | None
    date_updated: datetime | None
    date_inactive: datetime | None
    date_closed: datetime | None


@dataclass(frozen=True, slots=True)
class MembershipRow:
    chat_service_sid: str
    user_sid: str
    conversation_sid: str
    participant_sid: str | None
    notification_level: str | None
    unread_messages_count: int | None
    last_read_message_index: int | None
    url: str | None
    links: str | None


@dataclass(frozen=True, slots=True)
class Rejected:
    """An item that could not be stored: its raw JSON, why, and its SID when readable."""

    item: str
    reason: str
    sid: str | None


@dataclass(slots=True)
class ParsedPage(Generic[RowT]):
    """A page's typed rows and the items rejected."""

    rows: list[RowT] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


@dataclass(slots=True)
class ParsedConversationsPage:
    """A user's conversations page: conversation rows, membership rows, rejected items."""

    conversations: list[ConversationRow] = field(default_factory=list)
    memberships: list[MembershipRow] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def seen_sids(self) -> list[str]:
        """Every conversation SID this page proves the user still has, rejected ones included;
        ``UNIDENTIFIED`` too if an item had no readable SID (it may be any membership)."""
        return seen_sids([m.conversation_sid for m in self.memberships], self.rejected)


def seen_sids(stored: list[str], rejected: list[Rejected]) -> list[str]:
    """The SIDs of a page's stored items, then those of its rejected items that had one, then
    ``UNIDENTIFIED`` if one had none."""
    seen = [*stored, *(r.sid for r in rejected if r.sid is not None)]
    if any(r.sid is None for r in rejected):
        seen.append(UNIDENTIFIED)
    return seen


# --- field readers ----------------------------------------------------------------------------


def _storable(text: str, name: str) -> str:
    """``text`` if PostgreSQL can hold it: no NUL, and valid UTF-8 (a lone surrogate, which
    JSON's ``\\ud800`` escapes can produce, is not)."""
    if "\x00" in text:
        raise InvalidItem(f"{name} contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidItem(f"{name} is not valid Unicode (a lone surrogate)") from None
    return text


def _text(item: dict[str, Any], name: str) -> str | None:
    value = item.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidItem(f"{name} must be a string, got {type(value).__name__}")
    return _storable(value, name)


def _sid(item: dict[str, Any], name: str, prefix: str, *, required: bool = False) -> str | None:
    value = _text(item, name)
    if value is None:
        if required:
            raise InvalidItem(f"{name} is missing")
        return None
    if not is_sid(value, prefix):
        raise InvalidItem(f"{name} is not a valid {prefix} SID")
    return value


def _int(item: dict[str, Any], name: str) -> int | None:
    value = item.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidItem(f"{name} must be an integer, got {type(value).__name__}")
    if not -(2**63) <= value < 2**63:
        raise InvalidItem(f"{name} is out of the 64-bit range")
    return value


def _bool(item: dict[str, Any], name: str) -> bool | None:
    value = item.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise InvalidItem(f"{name} must be a boolean, got {type(value).__name__}")


def _enum(item: dict[str, Any], name: str, allowed: frozenset[str]) -> str | None:
    value = _text(item, name)
    if value is not None and value not in allowed:
        raise InvalidItem(f"{name} has an unknown value {value[:40]!r}")
    return value


def _date(value: Any, name: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidItem(f"{name} must be an ISO 8601 string, got {type(value).__name__}")
    try:
        # msgspec's reading first, as the typed decode reads a page (beyond microseconds it
        # rounds where Python truncates); Python's for the ISO 8601 forms RFC 3339 lacks.
        parsed = msgspec.convert(value, datetime)
    except msgspec.ValidationError:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidItem(f"{name} is not an ISO 8601 date-time: {value[:40]!r}") from None
    if parsed.tzinfo is None:
        raise InvalidItem(f"{name} has no time zone: {value[:40]!r}")
    try:
        instant = parsed.astimezone(UTC)  # 0001-01-01T00:00+01:00 has no UTC form
    except OverflowError:
        raise InvalidItem(f"{name} is out of range: {value[:40]!r}") from None
    # An offset with seconds (+05:30:15), which Python reads, the encoder writes in whole
    # minutes: such a date is sent in UTC, so the instant stored is the one upstream meant.
    offset = parsed.utcoffset()
    return instant if offset is not None and offset % timedelta(minutes=1) else parsed


def _no_constant(name: str) -> Any:
    """NaN and Infinity: Python's json reads them, JSON (and jsonb) has no such values."""
    raise ValueError(f"{name} is not JSON")


# jsonb keeps a JSON number as PostgreSQL's numeric, which holds at most 131,072 digits before
# the point and 16,383 after it (counted as written, trailing zeros too, once the exponent is
# applied), and refuses an exponent of 2**30 - 1 or more either way, whatever the digits.
_NUMERIC_DIGITS_BEFORE = 131_072
_NUMERIC_DIGITS_AFTER = 16_383
_NUMERIC_EXPONENT_LIMIT = 1_073_741_823
_JSON_NUMBER = re.compile(r"-?([0-9]+)(?:\.([0-9]+))?(?:[eE]([+-]?[0-9]+))?")


def numeric_holds(literal: str) -> bool:
    """Whether PostgreSQL's numeric (so jsonb) holds the JSON number ``literal``: its range,
    not a float's (1e400 is stored, 1e-20000 is not)."""
    match = _JSON_NUMBER.fullmatch(literal)
    if match is None:
        return False
    whole, fraction, exponent_text = match.group(1), match.group(2) or "", match.group(3) or "0"
    if len(exponent_text.lstrip("+-").lstrip("0")) > 10:
        return False
    exponent = int(exponent_text)
    if abs(exponent) >= _NUMERIC_EXPONENT_LIMIT or len(fraction) - exponent > _NUMERIC_DIGITS_AFTER:
        return False
    significant = (whole + fraction).lstrip("0")
    if not significant:
        return True  # zero: however it is written, no digit before the point
    leading_zeros = len(whole) + len(fraction) - len(significant)
    return len(whole) - leading_zeros + exponent <= _NUMERIC_DIGITS_BEFORE


def _jsonb_number(literal: str) -> int:
    """A JSON number (the parser's hook) checked as jsonb will keep it; its value is unused."""
    if not numeric_holds(literal):
        raise ValueError(f"number {literal[:20]} is out of range for PostgreSQL's numeric")
    return 0


def _numeric_float(literal: str) -> float:
    """msgspec's hook for a number with a point or an exponent: checked as ``_jsonb_number``."""
    if not numeric_holds(literal):
        raise ValueError(f"number {literal[:20]} is out of range for PostgreSQL's numeric")
    return 0.0


# A NUL escape (``\u0000``, its backslash not itself escaped): text and jsonb refuse the NUL it
# stands for. ``\\u0000`` is a backslash, then "u0000": stored as it is.
_NUL_ESCAPED = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _attributes(item: dict[str, Any], name: str = "attributes") -> str | None:
    """The attributes string, which must hold JSON that PostgreSQL's jsonb accepts."""
    value = _text(item, name)
    if value is None:
        return None
    try:
        decoded = json.loads(
            value, parse_constant=_no_constant, parse_float=_jsonb_number, parse_int=_jsonb_number
        )
    except ValueError as error:
        raise InvalidItem(f"{name} is not valid JSON ({str(error)[:60]})") from None
    except RecursionError:
        raise InvalidItem(f"{name} is nested too deeply") from None
    if _NUL_ESCAPED.search(value):
        raise InvalidItem(f"{name} contains a NUL character")
    # jsonb refuses escaped lone surrogates too: check what the escapes decode to.
    _storable(json.dumps(decoded, ensure_ascii=False), name)
    return value


def _links(item: dict[str, Any]) -> str | None:
    value = item.get("links")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidItem(f"links must be an object, got {type(value).__name__}")
    try:
        text = json.dumps(value, ensure_ascii=False, sort_keys=True, allow_nan=False)
    except ValueError:
        raise InvalidItem("links holds NaN or Infinity, which JSON has not") from None
    if _NUL_ESCAPED.search(text):
        raise InvalidItem("links contains a NUL character")
    return _storable(text, "links")


def _matches(item: dict[str, Any], name: str, prefix: str, expected: str) -> None:
    value = _sid(item, name, prefix)
    if value is not None and value != expected:
        raise InvalidItem(f"{name} {value} does not match the requested {expected}")


def _raw(item: Any) -> str:
    """The item as JSON text for the quarantine: readable, and storable whatever it holds
    (NULs are escaped by JSON; lone surrogates force ASCII escapes)."""
    try:
        text = json.dumps(item, ensure_ascii=False, default=str)
    except (RecursionError, ValueError):
        return '"<item nested too deeply to serialize>"'
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(item, default=str)
    return text


def _readable_sid(item: Any, name: str, prefix: str) -> str | None:
    if isinstance(item, dict):
        value = item.get(name)
        if isinstance(value, str) and is_sid(value, prefix):
            return value
    return None


def _loaded(item: Any) -> Any:
    """An envelope item as Python values (the client's envelope leaves items undecoded)."""
    if not isinstance(item, msgspec.Raw):
        return item
    try:
        return json.loads(bytes(item))
    except RecursionError:
        raise InvalidItem("item is nested too deeply") from None
    except ValueError as error:
        raise InvalidItem(f"item is not valid JSON ({str(error)[:60]})") from None


def _raw_of(item: Any) -> str:
    if isinstance(item, msgspec.Raw):
        return bytes(item).decode("utf-8", "replace")
    return _raw(item)


# --- resources --------------------------------------------------------------------------------


def parse_service(item: Any) -> ServiceRow:
    if not isinstance(item, dict):
        raise InvalidItem(f"item must be an object, got {type(item).__name__}")
    return ServiceRow(
        chat_service_sid=_sid(item, "sid", "IS", required=True) or "",
        account_sid=_sid(item, "account_sid", "AC"),
        friendly_name=_text(item, "friendly_name"),
        date_created=_date(item.get("date_created"), "date_created"),
        date_updated=_date(item.get("date_updated"), "date_updated"),
        url=_text(item, "url"),
        links=_links(item),
    )


def parse_user(item: Any, service_sid: str) -> UserRow:
    if not isinstance(item, dict):
        raise InvalidItem(f"item must be an object, got {type(item).__name__}")
    _matches(item, "chat_service_sid", "IS", service_sid)
    return UserRow(
        chat_service_sid=service_sid,
        user_sid=_sid(item, "sid", "US", required=True) or "",
        account_sid=_sid(item, "account_sid", "AC"),
        role_sid=_sid(item, "role_sid", "RL"),
        identity=_text(item, "identity"),
        friendly_name=_text(item, "friendly_name"),
        attributes=_attributes(item),
        is_online=_bool(item, "is_online"),
        is_notifiable=_bool(item, "is_notifiable"),
        date_created=_date(item.get("date_created"), "date_created"),
        date_updated=_date(item.get("date_updated"), "date_updated"),
        url=_text(item, "url"),
        links=_links(item),
    )


def parse_user_conversation(
    item: Any, service_sid: str, user_sid: str
) -> tuple[ConversationRow, MembershipRow]:
    """One service-user-conversation resource -> its conversation and membership rows."""
    if not isinstance(item, dict):
        raise InvalidItem(f"item must be an object, got {type(item).__name__}")
    conversation_sid = _sid(item, "conversation_sid", "CH", required=True) or ""
    _matches(item, "chat_service_sid", "IS", service_sid)
    _matches(item, "user_sid", "US", user_sid)
    timers = item.get("timers")
    if timers is None:
        timers = {}
    if not isinstance(timers, dict):
        raise InvalidItem(f"timers must be an object, got {type(timers).__name__}")
    conversation = ConversationRow(
        chat_service_sid=service_sid,
        conversation_sid=conversation_sid,
        account_sid=_sid(item, "account_sid", "AC"),
        friendly_name=_text(item, "friendly_name"),
        unique_name=_text(item, "unique_name"),
        attributes=_attributes(item),
        conversation_state=_enum(item, "conversation_state", CONVERSATION_STATES),
        created_by=_text(item, "created_by"),
        date_created=_date(item.get("date_created"), "date_created"),
        date_updated=_date(item.get("date_updated"), "date_updated"),
        date_inactive=_date(timers.get("date_inactive"), "timers.date_inactive"),
        date_closed=_date(timers.get("date_closed"), "timers.date_closed"),
    )
    membership = MembershipRow(
        chat_service_sid=service_sid,
        user_sid=user_sid,
        conversation_sid=conversation_sid,
        participant_sid=_sid(item, "participant_sid", "MB"),
        notification_level=_enum(item, "notification_level", NOTIFICATION_LEVELS),
        unread_messages_count=_int(item, "unread_messages_count"),
        last_read_message_index=_int(item, "last_read_message_index"),
        url=_text(item, "url"),
        links=_links(item),
    )
    return conversation, membership


def parse_services_page(items: list[Any]) -> ParsedPage[ServiceRow]:
    page: ParsedPage[ServiceRow] = ParsedPage()
    for raw in items:
        item = raw
        try:
            item = _loaded(raw)
            page.rows.append(parse_service(item))
        except (InvalidItem, RecursionError) as error:
            sid = _readable_sid(item, "sid", "IS")
            page.rejected.append(Rejected(_raw_of(item), str(error), sid))
    return page


def parse_users_page(items: list[Any], service_sid: str) -> ParsedPage[UserRow]:
    """Parse a users page; a user listed twice keeps its last occurrence (one row a user: the
    upsert could not write the same row twice)."""
    page: ParsedPage[UserRow] = ParsedPage()
    rows: dict[str, UserRow] = {}
    for raw in items:
        item = raw
        try:
            item = _loaded(raw)
            row = parse_user(item, service_sid)
        except (InvalidItem, RecursionError) as error:
            sid = _readable_sid(item, "sid", "US")
            page.rejected.append(Rejected(_raw_of(item), str(error), sid))
            continue
        rows[row.user_sid] = row
    page.rows = list(rows.values())
    return page


def parse_conversations_page(
    items: list[Any], service_sid: str, user_sid: str
) -> ParsedConversationsPage:
    """Parse a page; a conversation listed twice keeps its last occurrence."""
    page = ParsedConversationsPage()
    conversations: dict[str, ConversationRow] = {}
    memberships: dict[str, MembershipRow] = {}
    for raw in items:
        item = raw
        try:
            item = _loaded(raw)
            conversation, membership = parse_user_conversation(item, service_sid, user_sid)
        except (InvalidItem, RecursionError) as error:
            sid = _readable_sid(item, "conversation_sid", "CH")
            page.rejected.append(Rejected(_raw_of(item), str(error), sid))
            continue
        conversations[conversation.conversation_sid] = conversation
        memberships[membership.conversation_sid] = membership
    # Sorted: every writer locks shared conversation rows in the same order (no deadlocks).
    page.conversations = [conversations[k] for k in sorted(conversations)]
    page.memberships = [memberships[k] for k in sorted(memberships)]
    return page


# --- the hot path: a conversations page decoded and validated in C --------------------------
#
# ``decode_typed_page`` (called by the client as it splits a page) decodes a page's items with
# msgspec (types, SID lengths, enums, ranges) in one pass over the body;
# ``decode_conversations_page`` checks them as a page (SID patterns, duplicates, attributes) and,
# when every item passes, encodes what the database needs (membership fields for every
# item; conversation fields on demand) with msgspec again: no per-field checks in Python.
# Whatever msgspec cannot vouch for (a bad item, a duplicate, a value only the rules above know
# how to judge) sends the page through ``parse_conversations_page``, so quarantine reasons and
# kept rows are the same either way.


def _runs_of(prefix: str) -> re.Pattern[str]:
    """Any number of SIDs of that prefix back to back (each exactly 34 characters)."""
    return re.compile("(?:" + SID_PATTERNS[prefix].pattern.strip("^$") + ")*")


# SIDs are checked a page at a time: msgspec fixes each one's length, then one regex matches the
# page's SIDs of a kind joined together (a regex per field would cost more than the decoding).
_SID = Annotated[str, msgspec.Meta(min_length=34, max_length=34)]
_CH_RUNS, _MB_RUNS = _runs_of("CH"), _runs_of("MB")
_US_RUNS, _RL_RUNS = _runs_of("US"), _runs_of("RL")
_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
_Date = Annotated[datetime, msgspec.Meta(tz=True)]


class _Timers(msgspec.Struct, gc=False):
    date_inactive: _Date | None = None
    date_closed: _Date | None = None


class _UserConversation(msgspec.Struct, gc=False):
    """The fields of a service-user-conversation that are stored (others pass unread)."""

    conversation_sid: _SID
    account_sid: _SID | None = None
    chat_service_sid: str | None = None  # must be the requested one (so valid), or absent
    user_sid: str | None = None
    participant_sid: _SID | None = None
    friendly_name: str | None = None
    unique_name: str | None = None
    attributes: str | None = None
    conversation_state: Literal["inactive", "active", "closed"] | None = None
    created_by: str | None = None
    notification_level: Literal["default", "muted"] | None = None
    unread_messages_count: _Int64 | None = None
    last_read_message_index: _Int64 | None = None
    date_created: _Date | None = None
    date_updated: _Date | None = None
    timers: _Timers | None = None
    url: str | None = None
    links: dict[str, Any] | None = None


class _Meta(msgspec.Struct, gc=False):
    next_page_url: str | None = None


class _ConversationsPage(msgspec.Struct, gc=False):
    conversations: list[_UserConversation]
    meta: _Meta


class _User(msgspec.Struct, gc=False):
    """The fields of a service user that are stored (others pass unread)."""

    sid: _SID
    account_sid: _SID | None = None
    chat_service_sid: str | None = None  # must be the requested one (so valid), or absent
    role_sid: _SID | None = None
    identity: str | None = None
    friendly_name: str | None = None
    attributes: str | None = None
    is_online: bool | None = None
    is_notifiable: bool | None = None
    date_created: _Date | None = None
    date_updated: _Date | None = None
    url: str | None = None
    links: dict[str, Any] | None = None


class _UsersPage(msgspec.Struct, gc=False):
    users: list[_User]
    meta: _Meta


_TYPED_PAGES: dict[str, msgspec.json.Decoder[Any]] = {
    "conversations": msgspec.json.Decoder(_ConversationsPage),
    "users": msgspec.json.Decoder(_UsersPage),
}


def _envelope(key: str) -> msgspec.json.Decoder[Any]:
    """A decoder that splits a list page into its items (undecoded) and its meta."""
    struct = msgspec.defstruct(f"{key}_page", [(key, list[msgspec.Raw]), ("meta", _Meta)])
    return msgspec.json.Decoder(struct)


# A list page split without decoding its items (the client's split when the typed decode
# refuses a page; the parser's items when the typed items fail the page's checks).
ENVELOPES = {key: _envelope(key) for key in ("services", "users", "conversations")}
# Attributes' JSON, its numbers checked as jsonb will keep them (``numeric_holds``).
_ANY = msgspec.json.Decoder(float_hook=_numeric_float)
# A NUL escape anywhere in a body sends the page the slow way: msgspec reads it, text and jsonb
# refuse it. (msgspec itself refuses lone surrogates, even in fields it skips, as jsonb would.)
_NUL_ESCAPE = b"\\u0000"


_ENCODER = msgspec.json.Encoder()
_SORTED = msgspec.json.Encoder(order="sorted")  # links, as the parser writes them


@dataclass(frozen=True, slots=True)
class ConversationsPage:
    """A user's conversations page ready for the database, in the lean form it is sent in.

    ``members`` is a JSON array with one array per storable item, its membership fields in
    ``MEMBER_FIELDS`` order; ``sids`` their conversation SIDs, in the same order. The
    conversation fields of item ``i`` are encoded only when a batch writes that conversation
    (``conversation_fields``): most pages list conversations already stored, and every byte sent
    is a byte PostgreSQL parses.
    """

    members: bytes
    sids: list[str]
    rejected: list[Rejected]
    sources: Sequence[_UserConversation | ConversationRow] = ()  # conversation fields, per SID
    # Each item's conversation ``date_updated`` (the writer's version cache reads it twice).
    updated: list[datetime | None] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "updated", [source.date_updated for source in self.sources])

    @property
    def seen_sids(self) -> list[str]:
        """What this page proves the user still has (see ``ParsedConversationsPage``)."""
        return seen_sids(self.sids, self.rejected)

    def conversation_fields(self, index: int) -> tuple[Any, ...]:
        """The conversation fields of item ``index`` (``CONVERSATION_FIELDS``), encoded with
        the batch's document (one encoder call a batch, not one an item)."""
        return _conversation(self.sources[index])


def decode_typed_page(key: str, body: bytes) -> tuple[list[Any], str | None] | None:
    """A list page's items decoded and checked in C (``_UserConversation`` or ``_User``) with
    its next_page_url, in one pass over the body; None when there is no schema for ``key`` or
    msgspec cannot vouch for the page: then its items are split undecoded and parsed."""
    decoder = _TYPED_PAGES.get(key)
    page = None if decoder is None else _strict(decoder, body)
    if page is None:
        return None
    items: list[Any] = getattr(page, key)
    return items, page.meta.next_page_url


def _typed(items: list[Any], kind: type[_T]) -> list[_T] | None:
    """``items`` when ``decode_typed_page`` decoded them (all of a page are, or none)."""
    return items if items and type(items[0]) is kind else None


def decode_conversations_page(
    body: bytes, items: list[Any], service_sid: str, user_sid: str
) -> ConversationsPage:
    """A page's storable items and its rejected ones; ``items`` as the client split them:
    typed by ``decode_typed_page`` (checked here as a page, in C), or undecoded (parsed)."""
    decoded = _typed(items, _UserConversation)
    if decoded is not None:
        sids = _fast_sids(decoded, service_sid, user_sid)
        if sids is not None:
            members = _ENCODER.encode(list(map(_member_fields, decoded)))
            return ConversationsPage(members, sids, [], decoded)
    parsed = parse_conversations_page(
        _parsable(items, "conversations", body), service_sid, user_sid
    )
    conversations = {c.conversation_sid: c for c in parsed.conversations}
    sources = [conversations[m.conversation_sid] for m in parsed.memberships]
    return ConversationsPage(
        _ENCODER.encode([_member(m) for m in parsed.memberships]),
        [m.conversation_sid for m in parsed.memberships],
        parsed.rejected,
        sources,
    )


def decode_users_page(body: bytes, items: list[Any], service_sid: str) -> ParsedPage[UserRow]:
    """A users page's rows and rejected items, as ``parse_users_page`` reads them; checked in
    C when the client's split typed the items and every one passes, else the slow way."""
    decoded = _typed(items, _User)
    if decoded is not None and _users_storable(decoded, service_sid):
        return ParsedPage(
            [
                UserRow(
                    service_sid, u.sid, u.account_sid, u.role_sid, u.identity,
                    u.friendly_name, u.attributes, u.is_online, u.is_notifiable,
                    u.date_created, u.date_updated, u.url,
                    None if u.links is None else _SORTED.encode(u.links).decode(),
                )
                for u in decoded
            ]
        )  # fmt: skip
    return parse_users_page(_parsable(items, "users", body), service_sid)


def _parsable(items: list[Any], key: str, body: bytes) -> list[Any]:
    """The items for the parser: typed ones (``decode_typed_page``) split again from the body,
    undecoded, so that the parser reads each item's own JSON and quarantines it as sent."""
    if items and isinstance(items[0], (_UserConversation, _User)):
        raw: list[Any] = getattr(ENVELOPES[key].decode(body), key)
        return raw
    return items


def _strict(decoder: msgspec.json.Decoder[_BodyT], body: bytes) -> _BodyT | None:
    """``body`` as msgspec decodes it, or None to send the page the slow way: a NUL escape
    (text and jsonb refuse it), or anything msgspec refuses."""
    # (rfind: the search from the end skips on the escape's rare backslash, not on its
    # common "0"; 8 against 18 us for a page of 35 KB of the simulator's.)
    if body.rfind(_NUL_ESCAPE) != -1:
        return None
    try:
        return decoder.decode(body)
    except (msgspec.MsgspecError, RecursionError):
        return None


def _users_storable(users: list[_User], service_sid: str) -> bool:
    """Whether every user is stored as it is (as ``_fast_sids`` judges conversations)."""
    sids = [u.sid for u in users]
    if len(set(sids)) != len(sids) or not _US_RUNS.fullmatch("".join(sids)):
        return False  # a duplicate too: the parser keeps its last occurrence
    if not _RL_RUNS.fullmatch("".join(r for u in users if (r := u.role_sid) is not None)):
        return False
    dates = [d for u in users for d in (u.date_created, u.date_updated) if d is not None]
    return _shared_fields_storable(users, service_sid, dates)


def _shared_fields_storable(
    items: Sequence[_User | _UserConversation], service_sid: str, dates: list[datetime]
) -> bool:
    """The checks users and conversations share: the requested service or none, AC SIDs,
    dates with a UTC form, attributes that jsonb accepts (no NaN, numbers in range)."""
    if not {i.chat_service_sid for i in items} <= {None, service_sid}:
        return False
    accounts = {a for i in items if (a := i.account_sid) is not None}
    if not all(is_sid(account, "AC") for account in accounts):
        return False
    if {d.year for d in dates} & _EDGE_YEARS:
        return False  # its UTC form may not exist: only the slow path judges it
    return all(map(_attributes_storable, {i.attributes for i in items} - _KNOWN_GOOD_ATTRIBUTES))


# Attribute texts already found storable: a conversation's attributes come again in the page of
# each of its members. Bounded (cleared whole when full): at most ~KNOWN_GOOD_ATTRIBUTES texts.
KNOWN_GOOD_ATTRIBUTES = 8192
_KNOWN_GOOD_ATTRIBUTES: set[str | None] = {None, "{}"}


def _attributes_storable(text: str | None) -> bool:
    """Whether msgspec reads ``text`` as JSON (so jsonb will: no NaN, numbers in range)."""
    try:
        _ANY.decode(text)  # type: ignore[arg-type]  # None and "{}" never get here
    except (msgspec.MsgspecError, RecursionError):
        return False
    if len(_KNOWN_GOOD_ATTRIBUTES) >= KNOWN_GOOD_ATTRIBUTES:
        _KNOWN_GOOD_ATTRIBUTES.clear()
        _KNOWN_GOOD_ATTRIBUTES.update((None, "{}"))
    _KNOWN_GOOD_ATTRIBUTES.add(text)
    return True


# The fields of a membership and of a conversation, in the order the page statement reads
# them (worker/store.py): positional arrays, not objects, because PostgreSQL parses a page's
# document whole, and each item's keys (a fifth of its bytes) cost it more than its values.
MEMBER_FIELDS = (
    "conversation_sid", "participant_sid", "notification_level", "unread_messages_count",
    "last_read_message_index", "url", "links",  # links last (``_member``)
)  # fmt: skip
CONVERSATION_FIELDS = (
    "conversation_sid", "account_sid", "friendly_name", "unique_name", "attributes",
    "conversation_state", "created_by", "date_created", "date_updated", "date_inactive",
    "date_closed",
)  # fmt: skip
_member_fields = operator.attrgetter(*MEMBER_FIELDS)  # a decoded item's, read in C


def _member(item: MembershipRow) -> tuple[Any, ...]:
    """A parsed membership's fields (``MEMBER_FIELDS``); its links, last, are JSON text
    already, sent as the value they hold."""
    *fields, links = _member_fields(item)
    return (*fields, None if links is None else msgspec.Raw(links.encode()))


def _conversation(item: _UserConversation | ConversationRow) -> tuple[Any, ...]:
    """The conversation fields of an item (``CONVERSATION_FIELDS``)."""
    if isinstance(item, ConversationRow):
        inactive, closed = item.date_inactive, item.date_closed
    else:
        timers = item.timers
        inactive, closed = (timers.date_inactive, timers.date_closed) if timers else (None, None)
    return (
        item.conversation_sid,
        item.account_sid,
        item.friendly_name,
        item.unique_name,
        # JSON text already checked: sent as the JSON value it holds, so that PostgreSQL
        # parses it once with the document rather than a second time from a string.
        None if item.attributes is None else msgspec.Raw(item.attributes.encode()),
        item.conversation_state,
        item.created_by,
        item.date_created,
        item.date_updated,
        inactive,
        closed,
    )


def _fast_sids(items: list[_UserConversation], service_sid: str, user_sid: str) -> list[str] | None:
    """The items' SIDs when every item is storable as it is; None sends the page the slow way.
    (Set and list comprehensions: a page's checks cost a few C loops, not Python per field.)"""
    if not {i.user_sid for i in items} <= {None, user_sid}:
        return None
    sids = [i.conversation_sid for i in items]
    if len(set(sids)) != len(sids) or not _CH_RUNS.fullmatch("".join(sids)):
        return None
    participants = [p for i in items if (p := i.participant_sid) is not None]
    if not _MB_RUNS.fullmatch("".join(participants)):
        return None
    dates = [d for i in items for d in (i.date_created, i.date_updated) if d is not None]
    dates += [
        d
        for i in items
        if (t := i.timers) is not None
        for d in (t.date_inactive, t.date_closed)
        if d is not None
    ]
    return sids if _shared_fields_storable(items, service_sid, dates) else None


_EDGE_YEARS = frozenset({1, 9999})
