"""The parser agrees with Twilio's spec, keeps good items and rejects bad ones with a reason."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from tests.twilio_spec import USER_CONVERSATION, resolve, schema, spec
from worker import model, sids
from worker.errors import InvalidItem

SERVICE = "IS" + "a" * 32
USER = "US" + "a" * 32


def spec_example() -> list[dict[str, Any]]:
    path = spec()["paths"]["/v1/Services/{ChatServiceSid}/Users/{UserSid}/Conversations"]
    content = path["get"]["responses"]["200"]["content"]["application/json"]
    items: list[dict[str, Any]] = content["examples"]["readFull"]["value"]["conversations"]
    return items


def good_item(**overrides: Any) -> dict[str, Any]:
    item = copy.deepcopy(spec_example()[0])
    item.update(overrides)
    return item


def test_sid_patterns_are_the_specs() -> None:
    props = schema(USER_CONVERSATION)["properties"]
    for field, prefix in [
        ("account_sid", "AC"),
        ("chat_service_sid", "IS"),
        ("conversation_sid", "CH"),
        ("participant_sid", "MB"),
        ("user_sid", "US"),
    ]:
        assert props[field]["pattern"] == sids.SID_PATTERNS[prefix].pattern
    assert (
        schema("conversations.v1.service.service_user")["properties"]["role_sid"]["pattern"]
        == sids.SID_PATTERNS["RL"].pattern
    )


def test_enums_are_the_specs() -> None:
    props = schema(USER_CONVERSATION)["properties"]
    assert set(resolve(props["conversation_state"])["enum"]) == model.CONVERSATION_STATES
    assert set(resolve(props["notification_level"])["enum"]) == model.NOTIFICATION_LEVELS


def test_every_spec_field_is_mapped_to_a_column() -> None:
    """Each field of the API resource lands in the conversation or membership row."""
    columns = set(model.ConversationRow.__slots__) | set(model.MembershipRow.__slots__)
    for field in schema(USER_CONVERSATION)["properties"]:
        if field == "timers":
            assert {"date_inactive", "date_closed"} <= columns
        else:
            assert field in columns or field == "account_sid" or field == "user_sid", field


def test_spec_example_parses_field_by_field() -> None:
    item = spec_example()[0]
    conversation, membership = model.parse_user_conversation(
        item, item["chat_service_sid"], item["user_sid"]
    )
    assert conversation.conversation_sid == item["conversation_sid"]
    assert conversation.friendly_name == item["friendly_name"]
    assert conversation.conversation_state == item["conversation_state"]
    assert conversation.attributes == item["attributes"]
    assert conversation.date_created == datetime(2015, 7, 30, 20, 0, tzinfo=UTC)
    assert conversation.date_inactive == datetime(2015, 12, 16, 22, 19, 38, tzinfo=UTC)
    assert conversation.date_closed == datetime(2015, 12, 16, 22, 28, 38, tzinfo=UTC)
    assert membership.unread_messages_count == item["unread_messages_count"]
    assert membership.participant_sid == item["participant_sid"]
    assert membership.notification_level == item["notification_level"]
    assert membership.url == item["url"]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"conversation_sid": None}, "conversation_sid is missing"),
        ({"conversation_sid": "CHnothex"}, "not a valid CH SID"),
        ({"participant_sid": "XX" + "0" * 32}, "not a valid MB SID"),
        ({"unread_messages_count": "3"}, "must be an integer"),
        ({"unread_messages_count": True}, "must be an integer"),
        ({"conversation_state": "archived"}, "unknown value"),
        ({"notification_level": "loud"}, "unknown value"),
        ({"attributes": "{not json"}, "not valid JSON"),
        ({"attributes": '{"a": "\\u0000"}'}, "NUL"),
        ({"friendly_name": "a\x00b"}, "NUL"),
        ({"date_created": "yesterday"}, "not an ISO 8601"),
        ({"date_updated": "2015-07-30T20:00:00"}, "no time zone"),
        ({"timers": "soon"}, "timers must be an object"),
        ({"links": ["x"]}, "links must be an object"),
        ({"user_sid": "US" + "b" * 32}, "does not match"),
    ],
)
def test_bad_items_are_rejected_with_a_reason(overrides: dict[str, Any], reason: str) -> None:
    item = good_item(**overrides)
    page = model.parse_conversations_page(
        [good_item(conversation_sid="CH" + "1" * 32), item],
        item.get("chat_service_sid") or SERVICE,
        "US" + "a" * 32,
    )
    assert len(page.memberships) == 1, "the good item of the page is kept"
    assert len(page.rejected) == 1
    assert reason in page.rejected[0].reason


def test_dates_with_offsets_and_milliseconds_are_exact() -> None:
    item = good_item(date_updated="2020-01-02T03:04:05.678+02:00")
    conversation, _ = model.parse_user_conversation(item, SERVICE, USER)
    assert conversation.date_updated == datetime(2020, 1, 2, 1, 4, 5, 678000, tzinfo=UTC)


def test_rejected_items_with_a_readable_sid_still_count_as_seen() -> None:
    sid = "CH" + "2" * 32
    page = model.parse_conversations_page(
        [good_item(conversation_sid=sid, conversation_state="bogus")], SERVICE, USER
    )
    assert page.memberships == []
    assert page.seen_sids == [sid]


def test_extra_fields_and_null_timers_are_accepted() -> None:
    page = model.parse_conversations_page(
        [good_item(brand_new_field={"x": 1}, timers=None, unique_name=None)], SERVICE, USER
    )
    assert page.rejected == []
    assert page.conversations[0].date_closed is None
    assert page.conversations[0].unique_name is None


def test_non_object_items_are_rejected() -> None:
    page = model.parse_conversations_page([["not", "an", "object"], 7], SERVICE, USER)
    assert [r.reason for r in page.rejected] == [
        "item must be an object, got list",
        "item must be an object, got int",
    ]


def test_duplicates_within_a_page_collapse_and_rows_are_sorted() -> None:
    sids = ["CH" + c * 32 for c in "3a1"]
    items = [good_item(conversation_sid=s) for s in [*sids, sids[0]]]
    page = model.parse_conversations_page(items, SERVICE, USER)
    assert [m.conversation_sid for m in page.memberships] == sorted(set(sids))
    assert [c.conversation_sid for c in page.conversations] == sorted(set(sids))


def test_users_page_follows_the_user_schema() -> None:
    props = schema("conversations.v1.service.service_user")["properties"]
    columns = set(model.UserRow.__slots__)
    for field in props:
        assert (field if field != "sid" else "user_sid") in columns, field
    row = model.parse_user(
        {
            "sid": USER,
            "chat_service_sid": SERVICE,
            "identity": "ада",
            "is_online": None,
            "attributes": '{"deep": {"x": [1, 2]}}',
            "date_created": "2021-05-06T07:08:09Z",
        },
        SERVICE,
    )
    assert row.identity == "ада"
    assert re.match(sids.SID_PATTERNS["US"], row.user_sid)
    with pytest.raises(InvalidItem, match="is_online must be a boolean"):
        model.parse_user({"sid": USER, "is_online": "yes"}, SERVICE)


def test_deeply_nested_attributes_are_quarantined_not_fatal() -> None:
    deep = "[" * 5000 + "]" * 5000
    page = model.parse_conversations_page(
        [good_item(attributes=deep), good_item(conversation_sid="CH" + "9" * 32)], SERVICE, USER
    )
    assert len(page.memberships) == 1
    assert "nested too deeply" in page.rejected[0].reason


def test_a_deeply_nested_item_is_quarantined_with_a_marker() -> None:
    item: Any = {}
    for _ in range(5000):
        item = {"x": item}
    page = model.parse_conversations_page(
        [{"conversation_sid": "CH" + "1" * 32, "links": item}], SERVICE, USER
    )
    assert len(page.rejected) == 1
    assert page.rejected[0].sid == "CH" + "1" * 32
    assert "nested too deeply" in page.rejected[0].item


@pytest.mark.parametrize("number", ["1e999999", "-1e131072", "1e-20000", "0.5e-16383"])
def test_numbers_numeric_cannot_hold_are_quarantined(number: str) -> None:
    page = model.parse_conversations_page(
        [good_item(attributes='{"a": ' + number + "}")], SERVICE, USER
    )
    assert "out of range for PostgreSQL's numeric" in page.rejected[0].reason


@pytest.mark.parametrize(
    "attributes",
    [
        '{"a": 1e400}',  # beyond a float's range, within numeric's
        '{"a": -1e131071, "b": 1e-16383}',
        '{"a": ' + "9" * 5000 + "}",  # more digits than Python's int() reads
        '{"path": "C:\\\\u0000dir"}',  # a backslash, then "u0000": no NUL escape
    ],
)
def test_attributes_jsonb_holds_are_kept_whichever_path_decodes_the_page(attributes: str) -> None:
    good = good_item(attributes=attributes)
    for items, page in decoded_both_ways(good):
        assert len(page.rejected) == len(items) - 1, page.rejected
        assert page.sids == [good["conversation_sid"]]


def test_an_escaped_nul_is_quarantined_even_after_escaped_backslashes() -> None:
    for attributes in ('{"a": "\\u0000"}', '{"a": "\\\\\\u0000"}'):
        page = model.parse_conversations_page([good_item(attributes=attributes)], SERVICE, USER)
        assert page.rejected[0].reason == "attributes contains a NUL character", attributes


def test_a_sid_ending_in_a_newline_is_rejected_as_the_database_would() -> None:
    """PostgreSQL's ``~ '^CH...$'`` refuses a trailing newline; Python's ``$`` would not."""
    sid = good_item()["conversation_sid"]
    page = model.parse_conversations_page(
        [good_item(conversation_sid=sid + "\n"), good_item()], SERVICE, USER
    )
    assert [m.conversation_sid for m in page.memberships] == [sid], "the neighbour is kept"
    assert page.rejected[0].reason == "conversation_sid is not a valid CH SID"
    assert page.rejected[0].sid is None, "not readable: it proves no membership"
    users = model.parse_users_page([{"sid": USER + "\n"}], SERVICE)
    assert users.rejected[0].reason == "sid is not a valid US SID"
    services = model.parse_services_page([{"sid": SERVICE + "\n"}])
    assert services.rejected[0].reason == "sid is not a valid IS SID"


def test_attributes_travel_to_the_database_as_json_values_not_strings() -> None:
    """The page statement reads attributes as jsonb from the batch document: each must be the
    JSON value its text holds (one parse), whichever path decoded the page."""
    attributes = '{"tier": "gold", "note": "\\u6771\\u4eac \\"x\\"", "n": [1, 2.5, null]}'
    good = good_item(attributes=attributes)
    for items, page in decoded_both_ways(good):
        assert len(page.rejected) == len(items) - 1
        fields = _conversation_fields(page, 0)
        assert fields["attributes"] == json.loads(attributes)
    no_attributes = good_item(attributes=None)
    body = json.dumps({"conversations": [no_attributes], "meta": {}}).encode()
    page = model.decode_conversations_page(body, [no_attributes], SERVICE, USER)
    assert _conversation_fields(page, 0)["attributes"] is None


def decoded_both_ways(
    good: dict[str, Any],
) -> list[tuple[list[dict[str, Any]], model.ConversationsPage]]:
    """``good``'s page decoded as the client does, alone (the typed path) and beside an item
    that sends the page the slow way (the parser)."""
    bad = good_item(conversation_sid="CH" + "b" * 31 + "!")
    decoded = []
    for items in ([good], [good, bad]):
        body = json.dumps({"conversations": items, "meta": {}}).encode()
        typed = model.decode_typed_page("conversations", body)
        page = model.decode_conversations_page(body, typed[0] if typed else items, SERVICE, USER)
        decoded.append((items, page))
    return decoded


def _conversation_fields(page: model.ConversationsPage, index: int) -> dict[str, Any]:
    """Item ``index``'s conversation fields as sent (a positional array), by name."""
    return dict(
        zip(
            model.CONVERSATION_FIELDS,
            json.loads(msgspec.json.encode(page.conversation_fields(index))),
            strict=True,
        )
    )


def _users_body(users: list[Any]) -> tuple[bytes, list[Any]]:
    body = json.dumps({"users": users, "meta": {"next_page_url": None}}).encode()
    return body, model.ENVELOPES["users"].decode(body).users


def _comparable(page: model.ParsedPage[model.UserRow]) -> tuple[list[Any], list[Any]]:
    """Rows with their links as values (the text's spacing is the two paths' only difference:
    the column is jsonb), and the rejections as they are."""
    rows = [(*dataclasses.astuple(r)[:-1], r.links and json.loads(r.links)) for r in page.rows]
    return rows, page.rejected


GOOD_USER = {
    "sid": USER,
    "account_sid": "AC" + "b" * 32,
    "chat_service_sid": SERVICE,
    "role_sid": "RL" + "c" * 32,
    "identity": "ада.smith@example.com",
    "friendly_name": "Ада 🚀",
    "attributes": '{"tier": "gold", "n": [1, 2.5, null]}',
    "is_online": True,
    "is_notifiable": None,
    "date_created": "2021-05-06T07:08:09Z",
    "date_updated": "2021-05-06T08:08:09.123+01:00",
    "url": "https://conversations.twilio.com/v1/Services/x/Users/y",
    "links": {"user_conversations": "https://example.com/c", "z": {"a": 1}},
    "unknown_field": {"kept": False},
}


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"sid": "US" + "d" * 32, "links": None, "attributes": None, "role_sid": None},
        {"sid": USER + "\n"},
        {"sid": "USnothex" + "0" * 26},
        {"role_sid": "XX" + "0" * 32},
        {"account_sid": "AC" + "0" * 31},
        {"chat_service_sid": "IS" + "f" * 32},
        {"is_online": "yes"},
        {"is_notifiable": 1},
        {"attributes": "{not json"},
        {"attributes": '{"a": "\\u0000"}'},
        {"attributes": '{"a": 1e999999}'},
        {"attributes": '{"a": NaN}'},
        {"attributes": "[" * 5000 + "]" * 5000},
        {"friendly_name": "a\x00b"},
        {"identity": "\ud800"},
        {"date_created": "2015-07-30T20:00:00"},
        {"date_updated": "0001-01-01T00:30:00+01:00"},
        {
            "date_created": "2021-05-06T07:08:09.12345650Z",
            "date_updated": "2021-05-06T07:08:09.99999951+01:00",
        },
        {"links": ["x"]},
        {"links": {"nan": float("nan")}},
        {"identity": 7},
    ],
)
def test_a_users_page_decoded_in_c_matches_the_parser(
    overrides: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows and rejections of the fast path are the parser's, whatever the page holds; a page
    it cannot vouch for goes to the parser."""
    parse = model.parse_users_page
    parsed: list[str] = []

    def counted(items: list[Any], service_sid: str) -> model.ParsedPage[model.UserRow]:
        parsed.append(service_sid)
        return parse(items, service_sid)

    other = {**GOOD_USER, "sid": "US" + "e" * 32}
    user = {**GOOD_USER, **overrides}
    for users in ([other, user], [user, user]):  # with a good neighbour, and duplicated
        try:
            body, items = _users_body(users)
        except ValueError:  # a NaN: json.dumps writes it, no JSON decoder reads it
            continue
        slow = parse(items, SERVICE)
        clean = not slow.rejected and len({u["sid"] for u in users}) == len(users)
        typed = model.decode_typed_page("users", body)
        assert typed is not None or not clean, "a clean page is decoded in one pass"
        # As the client splits a page: typed where msgspec vouches for it, else undecoded.
        for split in (items, typed[0] if typed else None):
            if split is None:
                continue
            parsed.clear()
            monkeypatch.setattr(model, "parse_users_page", counted)
            fast = model.decode_users_page(body, split, SERVICE)
            monkeypatch.setattr(model, "parse_users_page", parse)
            assert _comparable(fast) == _comparable(slow)
            in_c = clean and split is not items
            assert bool(parsed) != in_c, "a clean page typed by the split is not parsed"


def test_a_user_listed_twice_keeps_its_last_occurrence() -> None:
    """One row a user, as conversations have: the users upsert cannot write a row twice, and
    PostgreSQL would refuse the whole page (and with it the service's discovery)."""
    other = "US" + "e" * 32
    users = [
        {**GOOD_USER, "friendly_name": "first"},
        {**GOOD_USER, "sid": other, "friendly_name": "other"},
        {**GOOD_USER, "friendly_name": "last"},
    ]
    body, items = _users_body(users)
    page = model.decode_users_page(body, items, SERVICE)
    assert [(r.user_sid, r.friendly_name) for r in page.rows] == [(USER, "last"), (other, "other")]
    assert page.rejected == []


def _conversations_comparable(page: model.ConversationsPage) -> tuple[Any, ...]:
    """What a decoded page sends the database, as values: membership fields, each item's
    conversation fields and the SIDs, in SID order (the parser sorts, the statement too), and
    the rejections."""
    conversations = [_conversation_fields(page, i) for i in range(len(page.sids))]

    def by_sid(rows: list[Any]) -> list[Any]:
        return sorted(rows, key=lambda row: str(row["conversation_sid"]))

    members = by_sid(
        [dict(zip(model.MEMBER_FIELDS, row, strict=True)) for row in json.loads(page.members)]
    )
    return members, by_sid(conversations), sorted(page.sids), page.rejected


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"conversation_sid": "CHnothex" + "0" * 26},
        {"participant_sid": "MB" + "0" * 31 + "\n"},
        {"user_sid": "US" + "f" * 32},
        {"chat_service_sid": "IS" + "f" * 32},
        {"attributes": '{"a": NaN}'},
        {"attributes": '{"a": 1e999999}'},
        {"friendly_name": "a\x00b"},
        {"date_updated": "0001-01-01T00:30:00+01:00"},
        # Beyond microseconds: rounded as msgspec rounds, on either path (not truncated).
        {
            "date_created": "2021-05-06T07:08:09.1234565Z",
            "date_updated": "2021-05-06T07:08:09.9999999Z",
            "timers": {
                "date_inactive": "2021-05-06T07:08:09.0000005Z",
                "date_closed": "2021-05-06T07:08:09.1234564999Z",
            },
        },
        {"notification_level": "loud"},
        {"unread_messages_count": 2**63},
    ],
)
def test_a_conversations_page_decoded_in_c_matches_the_parser(
    overrides: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whichever way the client split the page (typed in one pass, or undecoded), the page
    sends the database what the parser makes of it, and only a clean page skips the parser."""
    parse = model.parse_conversations_page
    parsed: list[str] = []

    def counted(items: list[Any], service_sid: str, user_sid: str) -> Any:
        parsed.append(user_sid)
        return parse(items, service_sid, user_sid)

    other = good_item(conversation_sid="CH" + "e" * 32)
    item = good_item(**overrides)
    for items in ([other, item], [item, item]):  # with a good neighbour, and duplicated
        body = json.dumps({"conversations": items, "meta": {"next_page_url": None}}).encode()
        raw_items = model.ENVELOPES["conversations"].decode(body).conversations
        slow = model.decode_conversations_page(body, raw_items, SERVICE, USER)  # parsed
        clean = not slow.rejected and len({i["conversation_sid"] for i in items}) == len(items)
        typed = model.decode_typed_page("conversations", body)
        assert (typed is not None) or not clean, "a clean page is decoded in one pass"
        for split in (raw_items, typed[0] if typed else None):
            if split is None:
                continue
            parsed.clear()
            monkeypatch.setattr(model, "parse_conversations_page", counted)
            page = model.decode_conversations_page(body, split, SERVICE, USER)
            monkeypatch.setattr(model, "parse_conversations_page", parse)
            assert _conversations_comparable(page) == _conversations_comparable(slow)
            in_c = clean and split is not raw_items
            assert bool(parsed) != in_c, "a clean page typed by the split is not parsed"


def test_attribute_texts_found_storable_are_remembered_within_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A conversation's attributes come again in each member's page: checked once, then
    remembered, at most ``KNOWN_GOOD_ATTRIBUTES`` of them; a bad text is never remembered."""
    monkeypatch.setattr(model, "KNOWN_GOOD_ATTRIBUTES", 4)
    monkeypatch.setattr(model, "_KNOWN_GOOD_ATTRIBUTES", {None, "{}"})
    decodes: list[str] = []

    class Counting:
        def decode(self, text: str) -> Any:
            decodes.append(text)
            return msgspec.json.decode(text)

    monkeypatch.setattr(model, "_ANY", Counting())
    texts = [f'{{"n": {n}}}' for n in range(6)]
    for text in texts[:2] * 3:
        assert model._shared_fields_storable([model._User(sid=USER, attributes=text)], SERVICE, [])
    assert decodes == texts[:2], "each text decoded once"
    for text in texts:
        model._shared_fields_storable([model._User(sid=USER, attributes=text)], SERVICE, [])
        assert len(model._KNOWN_GOOD_ATTRIBUTES) <= 4
    bad = '{"a": NaN}'
    for _ in range(2):
        assert not model._shared_fields_storable(
            [model._User(sid=USER, attributes=bad)], SERVICE, []
        )
    assert decodes.count(bad) == 2, "a bad text is checked each time"


def _by_name(names: tuple[str, ...], fields: tuple[Any, ...]) -> list[tuple[str, Any]]:
    """Fields as the page statement receives them (the JSON array), paired with their names."""
    return list(zip(names, json.loads(model._ENCODER.encode(fields)), strict=True))


def test_the_fields_sent_follow_the_names_the_statement_reads_them_by() -> None:
    """The page statement reads each membership and conversation by position
    (``MEMBER_FIELDS``, ``CONVERSATION_FIELDS``): what the parser's rows send must sit at the
    position of its name (the typed path reads the names themselves)."""
    moment = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    conversation = model.ConversationRow(
        SERVICE, "CH" + "c" * 32, "AC" + "a" * 32, "friendly", "unique", '{"k": [1]}',
        "closed", "creator", moment, moment.replace(year=2025), moment.replace(year=2026),
        moment.replace(year=2027),
    )  # fmt: skip
    for name, value in _by_name(model.CONVERSATION_FIELDS, model._conversation(conversation)):
        expected = getattr(conversation, name)
        if name == "attributes":
            assert value == json.loads(expected), "attributes travel as the JSON they hold"
        elif isinstance(expected, datetime):
            assert datetime.fromisoformat(value) == expected, name
        else:
            assert value == expected, name
    membership = model.MembershipRow(
        SERVICE, USER, "CH" + "c" * 32, "MB" + "b" * 32, "muted", 3, 9, "https://x/y",
        '{"conversation": "https://x"}',
    )  # fmt: skip
    for name, value in _by_name(model.MEMBER_FIELDS, model._member(membership)):
        expected = getattr(membership, name)
        assert value == (json.loads(expected) if name == "links" else expected), name


def test_a_date_whose_offset_has_seconds_keeps_its_instant() -> None:
    # Python reads +05:30:15; the encoder writes offsets in whole minutes (15 s lost): the date
    # goes to the database in UTC, the instant upstream meant.
    item = good_item(date_updated="2024-01-02T03:04:05+05:30:15")
    body = json.dumps({"conversations": [item], "meta": {}}).encode()
    typed = model.decode_typed_page("conversations", body)
    page = model.decode_conversations_page(body, typed[0] if typed else [item], SERVICE, USER)
    assert page.rejected == []
    sent = datetime.fromisoformat(_conversation_fields(page, 0)["date_updated"])
    assert sent == datetime(2024, 1, 1, 21, 33, 50, tzinfo=UTC)
