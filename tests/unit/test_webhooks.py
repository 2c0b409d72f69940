"""Webhook signatures (Twilio's scheme) and what each event means for the mirror."""

from __future__ import annotations

from worker.webhooks import parse_event, signature_valid, twilio_signature

# Twilio's documented example ("Validating Signatures from Twilio").
DOCS_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
DOCS_PARAMS = [
    ("CallSid", "CA1234567890ABCDE"),
    ("Caller", "+14158675310"),
    ("Digits", "1234"),
    ("From", "+14158675310"),
    ("To", "+18005551212"),
]
SERVICE = "IS" + "a" * 32
CONVERSATION = "CH" + "b" * 32


def test_the_signature_is_twilios_documented_one() -> None:
    assert twilio_signature("12345", DOCS_URL, DOCS_PARAMS) == "GvWf1cFY/Q7PnoempGyD5oXAezc="


def test_parameters_are_signed_sorted_by_name_whatever_order_they_came_in() -> None:
    shuffled = list(reversed(DOCS_PARAMS))
    assert twilio_signature("12345", DOCS_URL, shuffled) == "GvWf1cFY/Q7PnoempGyD5oXAezc="


def test_anything_changed_breaks_the_signature() -> None:
    good = twilio_signature("12345", DOCS_URL, DOCS_PARAMS)
    assert signature_valid("12345", DOCS_URL, DOCS_PARAMS, good)
    assert not signature_valid("12346", DOCS_URL, DOCS_PARAMS, good), "another key"
    assert not signature_valid("12345", DOCS_URL + "&x=1", DOCS_PARAMS, good), "another URL"
    tampered = [*DOCS_PARAMS[:-1], ("To", "+18005551213")]
    assert not signature_valid("12345", DOCS_URL, tampered, good), "another value"
    added = [*DOCS_PARAMS, ("Extra", "")]
    assert not signature_valid("12345", DOCS_URL, added, good), "a parameter more"
    assert not signature_valid("12345", DOCS_URL, DOCS_PARAMS, None), "no signature"
    assert not signature_valid("12345", DOCS_URL, DOCS_PARAMS, ""), "an empty one"
    assert not signature_valid("12345", DOCS_URL, DOCS_PARAMS, good + "\u00e9"), "not ASCII"


def test_participant_events_name_the_participant() -> None:
    for name in ("onParticipantAdded", "onParticipantRemoved", "onParticipantUpdated"):
        form = {
            "EventType": name,
            "ChatServiceSid": SERVICE,
            "ConversationSid": CONVERSATION,
            "Identity": "ana@example.org",
        }
        event = parse_event(form)
        assert event is not None
        assert (event.scope, event.identity) == ("participant", "ana@example.org")
        # A participant without an identity (SMS, WhatsApp) is no user of the mirror.
        assert parse_event({**form, "Identity": ""}) is None


def test_conversation_events_name_one_member_or_every_member() -> None:
    base = {"ChatServiceSid": SERVICE, "ConversationSid": CONVERSATION}
    scopes = {
        "onConversationUpdated": "one_member",
        "onConversationStateUpdated": "one_member",
        "onMessageAdded": "members",
        "onConversationRemoved": "members",
    }
    for name, scope in scopes.items():
        event = parse_event({**base, "EventType": name})
        assert event is not None
        assert event.scope == scope, name
        assert parse_event({"EventType": name, "ChatServiceSid": SERVICE}) is None


def test_other_or_malformed_events_change_nothing() -> None:
    base = {"ChatServiceSid": SERVICE, "ConversationSid": CONVERSATION, "Identity": "a"}
    assert parse_event({**base, "EventType": "onUserUpdated"}) is None
    assert parse_event({**base, "EventType": "onParticipantAdded", "ChatServiceSid": ""}) is None
    bad_sid = {**base, "EventType": "onMessageAdded", "ConversationSid": CONVERSATION + "\n"}
    assert parse_event(bad_sid) is None


def test_a_url_signed_with_or_without_its_default_port_is_the_same_url() -> None:
    signed = twilio_signature("12345", "https://mycompany.com:443/hook?x=1", DOCS_PARAMS)
    assert signature_valid("12345", "https://mycompany.com/hook?x=1", DOCS_PARAMS, signed)
    plain = twilio_signature("12345", "http://h.example/hook", DOCS_PARAMS)
    assert signature_valid("12345", "http://h.example:80/hook", DOCS_PARAMS, plain)
    # Another port is another URL.
    other = twilio_signature("12345", "https://mycompany.com:8443/hook", DOCS_PARAMS)
    assert not signature_valid("12345", "https://mycompany.com/hook", DOCS_PARAMS, other)
