"""The simulator's post-event webhooks, received by a real aiohttp server on loopback: the
events and their fields, Twilio's signature, retries, filters, replays, ``/_sim/mutate``."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import pytest
from aiohttp import web

from convsync_tools.simdata import DEMO_AUTH_TOKEN, Change, Dataset
from convsync_tools.simulator import Simulator, SimulatorConfig, SimulatorServer
from convsync_tools.webhook_sender import twilio_signature

TOKEN = "webhook-test-token"
SID = {p: re.compile(rf"^{p}[0-9a-f]{{32}}$") for p in ("AC", "IS", "US", "CH", "MB", "RL", "IM")}
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.000Z$")
COMMON = ("AccountSid", "EventType", "Source", "ChatServiceSid", "ConversationSid")
TWILIO_DOC_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"


# -- the signature ---------------------------------------------------------------------------


def doc_params(caller: str) -> list[tuple[str, str]]:
    return [
        ("CallSid", "CA1234567890ABCDE"),
        ("Caller", caller),
        ("Digits", "1234"),
        ("From", caller),
        ("To", "+18005551212"),
    ]


def test_signature_matches_twilio_worked_examples() -> None:
    # Twilio's security docs: Caller/From +14158675310 sign to GvWf1cFY... (the vector the
    # vendor SDKs pin too); with +12349013030 the same algorithm gives another value.
    assert twilio_signature(TWILIO_DOC_URL, doc_params("+14158675310"), "12345") == (
        "GvWf1cFY/Q7PnoempGyD5oXAezc="
    )
    assert twilio_signature(TWILIO_DOC_URL, doc_params("+14158675309"), "12345") == (
        "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    )
    assert twilio_signature(TWILIO_DOC_URL, doc_params("+12349013030"), "12345") == (
        "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    )


def test_signature_sorts_params_and_signs_the_url_verbatim() -> None:
    params = doc_params("+14158675310")
    signed = twilio_signature(TWILIO_DOC_URL, params, "12345")
    assert twilio_signature(TWILIO_DOC_URL, list(reversed(params)), "12345") == signed
    assert twilio_signature(TWILIO_DOC_URL + "&baz=3", params, "12345") != signed
    assert twilio_signature(TWILIO_DOC_URL, params, "12346") != signed
    assert twilio_signature(TWILIO_DOC_URL, [*params[:-1], ("To", "+1")], "12345") != signed
    assert twilio_signature("https://x.test/", [("b", "2"), ("a", "1")], "k") == expected_signature(
        "https://x.test/", b"a=1&b=2", "k"
    )


def expected_signature(url: str, body: bytes, token: str) -> str:
    """The receiver's side, written apart from the sender: URL + sorted name+value pairs."""
    pairs = parse_qsl(body.decode(), keep_blank_values=True)
    data = url + "".join(name + value for name, value in sorted(pairs))
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


# -- a receiver ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    path_qs: str
    headers: dict[str, str]
    body: bytes

    @property
    def form(self) -> dict[str, str]:
        pairs = parse_qsl(self.body.decode(), keep_blank_values=True)
        assert len({name for name, _ in pairs}) == len(pairs), "a field sent twice"
        return dict(pairs)

    @property
    def event(self) -> str:
        return self.form["EventType"]


class Receiver:
    """Records every POST; answers the queued statuses first, then 200; ``gate`` holds it."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.statuses: deque[int] = deque()
        self.gate: asyncio.Event | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append(Received(request.path_qs, dict(request.headers), body))
        if self.gate is not None:
            await self.gate.wait()
        return web.Response(status=self.statuses.popleft() if self.statuses else 200)

    def events(self) -> list[str]:
        return [item.event for item in self.received]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/twilio", found.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    found.url = f"http://127.0.0.1:{port}/hooks/twilio?tenant=a%20b&x=1"
    try:
        yield found
    finally:
        await runner.cleanup()


@pytest.fixture
def server() -> Iterator[SimulatorServer]:
    config = SimulatorConfig(auth_token=TOKEN, webhook_backoff=0.01)
    sim = Simulator(Dataset.generate(seed=21, services=1, users_per_service=40), config)
    with SimulatorServer(sim) as running:
        yield running


async def idle(sim: Simulator) -> None:
    assert await asyncio.to_thread(sim.webhooks_idle, 10.0), sim.webhook_stats()


def busy_conversation(data: Dataset) -> tuple[str, list[str]]:
    """(conversation SID, member user SIDs) of a conversation with at least three members."""
    service = data.default_service_sid
    for user in data.user_sids(service):
        for item in data.memberships(service, user):
            members = data.conversation_members(service, item["conversation_sid"])
            if len(members) >= 3:
                return item["conversation_sid"], members
    raise AssertionError("no conversation with three members")


def membership(data: Dataset, user: str, conversation: str) -> dict[str, Any]:
    items = data.memberships(data.default_service_sid, user)
    return next(item for item in items if item["conversation_sid"] == conversation)


def identity(data: Dataset, user: str) -> str:
    users = data.expected_users(service_sid=data.default_service_sid)
    return str(next(item["identity"] for item in users if item["sid"] == user))


def check_common(item: Received, receiver: Receiver, data: Dataset, conversation: str) -> None:
    form = item.form
    assert list(form)[:5] == list(COMMON)
    assert form["AccountSid"] == data.account_sid
    assert form["Source"] == "API"
    assert form["ChatServiceSid"] == data.default_service_sid
    assert form["ConversationSid"] == conversation
    assert item.path_qs == "/hooks/twilio?tenant=a%20b&x=1"
    assert item.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert item.headers["User-Agent"] == "TwilioProxy/1.1"
    assert item.headers["X-Twilio-Signature"] == expected_signature(receiver.url, item.body, TOKEN)
    assert re.fullmatch(r"[0-9a-f-]{36}", item.headers["I-Twilio-Idempotency-Token"])


# -- the events ------------------------------------------------------------------------------


async def test_each_mutation_sends_its_event(server: SimulatorServer, receiver: Receiver) -> None:
    sim, data = server.sim, server.sim.dataset
    service = data.default_service_sid
    sim.configure(webhook_url=receiver.url)
    conversation, members = busy_conversation(data)
    users = data.user_sids(service)
    outsider = next(u for u in users if u not in members)
    author, reader = members[0], members[1]

    data.add_membership(service, outsider, conversation)
    joined = membership(data, outsider, conversation)
    data.set_unread(service, reader, conversation, 2, 7)
    level = membership(data, reader, conversation)["notification_level"]
    data.set_notification_level(
        service, reader, conversation, "muted" if level == "default" else "default"
    )
    data.update_conversation(service, conversation, friendly_name="Renamed ☕ & co")
    state = membership(data, author, conversation)["conversation_state"]
    new_state = "closed" if state != "closed" else "active"
    data.update_conversation(service, conversation, conversation_state=new_state)
    index = data.add_message(service, author, conversation, body="hi & bye = ok")
    data.remove_membership(service, outsider, conversation)
    fresh = data.add_membership(service, outsider)
    data.remove_conversation(service, fresh)
    await idle(sim)

    assert receiver.events() == [
        "onParticipantAdded",
        "onParticipantUpdated",
        "onParticipantUpdated",
        "onConversationUpdated",
        "onConversationStateUpdated",
        "onMessageAdded",
        "onParticipantRemoved",
        "onConversationAdded",
        "onParticipantAdded",
        "onConversationRemoved",
    ]
    got = receiver.received
    for item in got[:7]:
        check_common(item, receiver, data, conversation)
    for item in got[7:]:
        check_common(item, receiver, data, fresh)
    tokens = {item.headers["I-Twilio-Idempotency-Token"] for item in got}
    assert len(tokens) == len(got)

    added = got[0].form
    assert added["ParticipantSid"] == joined["participant_sid"]
    assert SID["MB"].match(added["ParticipantSid"])
    assert added["Identity"] == identity(data, outsider)
    assert SID["RL"].match(added["RoleSid"])
    assert added["Attributes"] == "{}"
    assert DATE.match(added["DateCreated"])

    unread, level_changed = got[1].form, got[2].form
    reader_row = membership(data, reader, conversation)
    for form in (unread, level_changed):
        assert form["ParticipantSid"] == reader_row["participant_sid"]
        assert form["Identity"] == identity(data, reader)
        assert form["LastReadMessageIndex"] == "7"
        assert DATE.match(form["DateUpdated"])

    updated = got[3].form
    assert updated["FriendlyName"] == "Renamed ☕ & co"
    row = membership(data, author, conversation)
    assert updated["Attributes"] == row["attributes"]
    assert updated["DateCreated"] == row["date_created"][:-1] + ".000Z"
    assert DATE.match(updated["DateUpdated"])
    assert updated.get("UniqueName") == row["unique_name"]

    state_form = got[4].form
    assert (state_form["StateFrom"], state_form["StateTo"]) == (state, new_state)
    assert state_form["Reason"] == "API"

    message = got[5].form
    assert message["Index"] == str(index)
    assert SID["IM"].match(message["MessageSid"])
    assert message["Author"] == identity(data, author)
    assert message["Body"] == "hi & bye = ok"
    assert message["ParticipantSid"] == membership(data, author, conversation)["participant_sid"]
    assert message["DateCreated"] == row["date_updated"][:-1] + ".000Z"

    removed = got[6].form
    assert removed["ParticipantSid"] == joined["participant_sid"]
    assert removed["Identity"] == identity(data, outsider)

    assert got[7].form["State"] == "active"
    assert got[8].form["Identity"] == identity(data, outsider)
    assert got[9].form["ConversationSid"] == fresh

    stats = sim.webhook_stats()
    assert (stats.sent, stats.delivered, stats.failed, stats.retried) == (10, 10, 0, 0)
    assert stats.by_event["onParticipantUpdated"]["delivered"] == 2
    assert stats.pending == 0


async def test_no_webhook_url_sends_nothing(server: SimulatorServer, receiver: Receiver) -> None:
    sim, data = server.sim, server.sim.dataset
    service = data.default_service_sid
    conversation, members = busy_conversation(data)
    data.add_message(service, members[0], conversation)
    data.update_conversation(service, conversation, friendly_name="quiet")
    await idle(sim)
    assert sim.webhook_stats().sent == 0
    assert not sim.webhook_deliveries()
    sim.configure(webhook_url=receiver.url)  # the receiver does hear what follows
    data.add_message(service, members[1], conversation)
    await idle(sim)
    sim.configure(webhook_url=None)
    data.add_message(service, members[2], conversation)
    await idle(sim)
    assert receiver.events() == ["onMessageAdded"]
    assert receiver.received[0].form["Author"] == identity(data, members[1])


async def test_filters_choose_the_events(server: SimulatorServer, receiver: Receiver) -> None:
    sim, data = server.sim, server.sim.dataset
    service = data.default_service_sid
    sim.configure(webhook_url=receiver.url, webhook_filters=("onMessageAdded",))
    conversation, members = busy_conversation(data)
    outsider = next(u for u in data.user_sids(service) if u not in members)
    data.add_membership(service, outsider, conversation)
    data.add_message(service, outsider, conversation)
    data.update_conversation(service, conversation, attributes='{"a": 1}')
    await idle(sim)
    assert receiver.events() == ["onMessageAdded"]
    stats = sim.webhook_stats()
    assert (stats.sent, stats.filtered) == (1, 2)
    assert stats.by_event["onParticipantAdded"]["filtered"] == 1


async def test_failures_are_retried_under_one_idempotency_token(
    server: SimulatorServer, receiver: Receiver
) -> None:
    sim, data = server.sim, server.sim.dataset
    service = data.default_service_sid
    sim.configure(webhook_url=receiver.url)
    conversation, members = busy_conversation(data)
    receiver.statuses.extend([500, 500])
    data.add_message(service, members[0], conversation)
    data.add_message(service, members[1], conversation)  # waits behind the first: FIFO
    await idle(sim)
    got = receiver.received
    assert len(got) == 4
    first = {item.headers["I-Twilio-Idempotency-Token"] for item in got[:3]}
    assert len(first) == 1
    assert {item.body for item in got[:3]} == {got[0].body}
    assert got[3].headers["I-Twilio-Idempotency-Token"] not in first
    assert [item.form["Author"] for item in got] == [identity(data, members[0])] * 3 + [
        identity(data, members[1])
    ]
    assert [(d.attempt, d.status) for d in sim.webhook_deliveries()] == [
        (1, 500),
        (2, 500),
        (3, 200),
        (1, 200),
    ]
    stats = sim.webhook_stats()
    assert (stats.sent, stats.delivered, stats.failed, stats.retried) == (2, 2, 0, 2)

    sim.configure(webhook_retries=1)
    receiver.statuses.extend([503, 404])
    data.add_message(service, members[2], conversation)
    await idle(sim)
    assert [d.status for d in sim.webhook_deliveries()[-2:]] == [503, 404]
    stats = sim.webhook_stats()
    assert (stats.sent, stats.delivered, stats.failed, stats.retried) == (3, 2, 1, 3)


async def test_an_unreachable_receiver_fails_after_the_retries(server: SimulatorServer) -> None:
    sim, data = server.sim, server.sim.dataset
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    sim.configure(webhook_url=f"http://127.0.0.1:{port}/gone", webhook_retries=2)
    conversation, members = busy_conversation(data)
    data.add_message(data.default_service_sid, members[0], conversation)
    await idle(sim)
    attempts = sim.webhook_deliveries()
    assert [(d.attempt, d.status) for d in attempts] == [(1, None), (2, None), (3, None)]
    assert all(d.error for d in attempts)
    assert sim.webhook_stats().failed == 1


async def test_mutations_never_wait_for_deliveries(
    server: SimulatorServer, receiver: Receiver
) -> None:
    sim, data = server.sim, server.sim.dataset
    service = data.default_service_sid
    sim.configure(webhook_url=receiver.url)
    conversation, members = busy_conversation(data)
    receiver.gate = asyncio.Event()
    try:
        started = time.monotonic()
        indices = [data.add_message(service, members[i % 3], conversation) for i in range(20)]
        assert time.monotonic() - started < 2.0
        assert not await asyncio.to_thread(sim.webhooks_idle, 0.2)
        assert sim.webhook_stats().pending == 20
    finally:
        receiver.gate.set()
    await idle(sim)
    assert [int(item.form["Index"]) for item in receiver.received] == indices
    assert indices == list(range(indices[0], indices[0] + 20))


async def test_mutations_from_many_threads_arrive_in_mutation_order(
    server: SimulatorServer, receiver: Receiver
) -> None:
    sim, data = server.sim, server.sim.dataset
    service = data.default_service_sid
    sim.configure(webhook_url=receiver.url)
    conversation, members = busy_conversation(data)
    order: list[int] = []
    lock = threading.Lock()

    def post(author: str) -> None:
        for _ in range(10):
            with lock:  # what the dataset decided, in the order it decided it
                order.append(data.add_message(service, author, conversation))

    threads = [threading.Thread(target=post, args=(m,)) for m in members[:3]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    await idle(sim)
    assert [int(item.form["Index"]) for item in receiver.received] == order


# -- replays and tampered sends --------------------------------------------------------------


async def test_replay_sends_identical_bytes(server: SimulatorServer, receiver: Receiver) -> None:
    sim, data = server.sim, server.sim.dataset
    sim.configure(webhook_url=receiver.url)
    conversation, members = busy_conversation(data)
    data.set_unread(data.default_service_sid, members[0], conversation, 0, 3)
    await idle(sim)
    replayed = await asyncio.to_thread(sim.replay_webhook)
    assert replayed.kind == "replay"
    assert replayed.status == 200
    replay_url = f"{server.url}/_sim/webhooks/replay"
    async with aiohttp.ClientSession() as control, control.post(replay_url, json={}) as response:
        assert response.status == 200
        assert (await response.json())["token"] == replayed.token
    original, *copies = receiver.received
    assert len(copies) == 2
    for copy in copies:
        assert copy.body == original.body
        assert copy.path_qs == original.path_qs
        for header in ("X-Twilio-Signature", "I-Twilio-Idempotency-Token", "Content-Type"):
            assert copy.headers[header] == original.headers[header]
    assert sim.webhook_stats().manual == 2
    assert sim.webhook_stats().sent == 1


async def test_replay_of_a_given_token_and_nothing_to_replay(
    server: SimulatorServer, receiver: Receiver
) -> None:
    sim, data = server.sim, server.sim.dataset
    with pytest.raises(LookupError):
        await asyncio.to_thread(sim.replay_webhook)
    async with aiohttp.ClientSession() as control:
        async with control.post(f"{server.url}/_sim/webhooks/replay") as response:
            assert response.status == 404
        async with control.post(f"{server.url}/_sim/webhooks/send", json={}) as response:
            assert response.status == 404
    sim.configure(webhook_url=receiver.url)
    conversation, members = busy_conversation(data)
    data.add_message(data.default_service_sid, members[0], conversation)
    data.add_message(data.default_service_sid, members[1], conversation)
    await idle(sim)
    first = receiver.received[0]
    token = first.headers["I-Twilio-Idempotency-Token"]
    async with aiohttp.ClientSession() as control:
        url = f"{server.url}/_sim/webhooks/replay"
        async with control.post(url, json={"token": token}) as response:
            assert response.status == 200
        async with control.post(url, json={"token": "nope"}) as response:
            assert response.status == 404
        async with control.post(url, json={"token": 5}) as response:
            assert response.status == 400
    assert receiver.received[-1].body == first.body


async def test_send_with_a_bad_or_no_signature(server: SimulatorServer, receiver: Receiver) -> None:
    sim, data = server.sim, server.sim.dataset
    sim.configure(webhook_url=receiver.url)
    conversation, members = busy_conversation(data)
    data.add_message(data.default_service_sid, members[0], conversation)
    data.update_conversation(data.default_service_sid, conversation, friendly_name="x")
    await idle(sim)
    bad = await asyncio.to_thread(sim.send_webhook, "onMessageAdded", "bad")
    async with aiohttp.ClientSession() as control:
        url = f"{server.url}/_sim/webhooks/send"
        async with control.post(url, json={"event": "onMessageAdded", "signature": "none"}) as r:
            assert r.status == 200
        async with control.post(url, json={"signature": "good"}) as r:
            assert r.status == 200
        for wrong in ({"signature": "meh"}, {"event": "onNothing"}, [1]):
            async with control.post(url, json=wrong) as r:
                assert r.status == 400, wrong
    original, _, bad_copy, unsigned, good = receiver.received
    assert bad.status == 200
    assert bad_copy.body == unsigned.body == original.body
    assert bad_copy.headers["X-Twilio-Signature"] != expected_signature(
        receiver.url, bad_copy.body, TOKEN
    )
    assert base64.b64decode(bad_copy.headers["X-Twilio-Signature"])  # well-formed, just wrong
    assert "X-Twilio-Signature" not in unsigned.headers
    assert good.event == "onConversationUpdated"
    assert good.headers["X-Twilio-Signature"] == expected_signature(receiver.url, good.body, TOKEN)
    tokens = [item.headers["I-Twilio-Idempotency-Token"] for item in receiver.received]
    assert len(set(tokens)) == len(tokens)


# -- /_sim/mutate, /_sim/webhooks and knobs --------------------------------------------------


async def test_mutate_endpoint_applies_ops_and_validates_input(
    server: SimulatorServer, receiver: Receiver
) -> None:
    data = server.sim.dataset
    service = data.default_service_sid
    conversation, members = busy_conversation(data)
    outsider = next(u for u in data.user_sids(service) if u not in members)
    url = f"{server.url}/_sim/mutate"
    async with aiohttp.ClientSession() as control:

        async def mutate(body: Any) -> tuple[int, Any]:
            async with control.post(url, json=body) as response:
                return response.status, await response.json()

        async with control.post(f"{server.url}/_sim/config", json={"webhook_url": receiver.url}):
            pass
        status, body = await mutate(
            {"op": "add_membership", "user": outsider, "conversation_sid": conversation}
        )
        assert (status, body) == (200, {"result": conversation})
        status, body = await mutate({"op": "add_membership", "user": outsider})
        assert status == 200
        assert SID["CH"].match(body["result"])
        status, body = await mutate(
            {"op": "add_message", "author_user": outsider, "conversation_sid": conversation}
        )
        assert status == 200
        assert isinstance(body["result"], int)
        status, body = await mutate(
            {"op": "update_conversation", "conversation_sid": conversation, "unique_name": None}
        )
        assert (status, body) == (200, {"result": None})
        status, body = await mutate({"op": "add_user", "identity": "new.one"})
        assert status == 200
        assert SID["US"].match(body["result"])

        bad_requests: list[Any] = [
            {},
            {"op": "drop_table"},
            {"op": 3},
            {"op": "add_message", "author_user": outsider},
            {"op": "add_message", "author_user": True, "conversation_sid": conversation},
            {"op": "add_message", "author_user": 1, "conversation_sid": conversation},
            {"op": "add_message", "author_user": outsider, "conversation_sid": conversation,
             "extra": 1},
            {"op": "set_unread", "user": outsider, "conversation_sid": conversation,
             "unread_messages_count": "2"},
            {"op": "set_unread", "user": outsider, "conversation_sid": conversation,
             "unread_messages_count": False},
            {"op": "update_conversation", "conversation_sid": conversation, "color": "red"},
            {"op": "update_conversation", "conversation_sid": conversation, "timers": "no"},
            {"op": "update_conversation", "conversation_sid": conversation,
             "conversation_state": "gone"},
            {"op": "add_membership", "user": outsider, "conversation_sid": conversation},
            {"op": "set_notification_level", "user": outsider, "conversation_sid": conversation,
             "notification_level": "loud"},
            [1, 2],
        ]  # fmt: skip
        for bad in bad_requests:
            status, body = await mutate(bad)
            assert status == 400, (bad, body)
            assert body["error"]
        for missing in (
            {"op": "remove_membership", "user": "nobody", "conversation_sid": conversation},
            {"op": "add_message", "author_user": outsider, "conversation_sid": "CH" + "0" * 32},
            {"op": "add_user", "service_sid": "IS" + "0" * 32},
        ):
            status, body = await mutate(missing)
            assert status == 404, (missing, body)
            assert body["error"]
        async with control.post(url, data=b"{not json") as response:
            assert response.status == 400
        async with control.get(f"{server.url}/_sim/webhooks?wait=10&last=2") as response:
            shown = await response.json()
    assert shown["idle"] is True
    assert shown["pending"] == 0
    assert shown["sent"] == shown["delivered"] == len(receiver.received) == 5
    assert [d["event_type"] for d in shown["deliveries"]] == [
        "onMessageAdded",
        "onConversationUpdated",
    ]
    assert shown["by_event"]["onParticipantAdded"] == {"sent": 2, "delivered": 2}
    assert "new.one" in {item["identity"] for item in data.expected_users()}


async def test_webhook_knobs_are_checked(server: SimulatorServer) -> None:
    async with aiohttp.ClientSession() as control:
        url = f"{server.url}/_sim/config"
        good = {"webhook_filters": ["onMessageAdded"], "webhook_retries": 0}
        async with control.post(url, json=good) as response:
            assert response.status == 200
            assert (await response.json())["webhook_filters"] == ["onMessageAdded"]
        assert server.sim.config.webhook_filters == ("onMessageAdded",)
        for bad in (
            {"webhook_url": "ftp://x"},
            {"webhook_url": 5},
            {"webhook_filters": ["onNothing"]},
            {"webhook_filters": "onMessageAdded"},
            {"webhook_filters": [1]},
            {"webhook_retries": -1},
            {"webhook_timeout": 0},
        ):
            async with control.post(url, json=bad) as response:
                assert response.status == 400, bad
        async with control.post(url, json={"webhook_filters": None}) as response:
            assert (await response.json())["webhook_filters"] is None


async def test_simulate_command_sends_webhooks(receiver: Receiver) -> None:
    code = (
        "import sys; from convsync_tools.simulator import simulate_main; "
        "sys.exit(simulate_main(sys.argv[1:]))"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, "--port", "0", "--users", "30", "--seed", "4",
        "--webhook-url", receiver.url, "--webhook-filters", "onParticipantAdded",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        first = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
        url = first.rsplit(" ", 1)[1]
        async with aiohttp.ClientSession() as control:
            async with control.get(f"{url}/_sim/config") as response:
                assert (await response.json())["webhook_url"] == receiver.url
            mirror = Dataset.generate(seed=4, services=1, users_per_service=30)
            users = mirror.user_sids(mirror.default_service_sid)
            body = {"op": "add_membership", "user": users[0]}
            async with control.post(f"{url}/_sim/mutate", json=body) as response:
                assert response.status == 200
                conversation = (await response.json())["result"]
            body = {"op": "add_message", "author_user": users[0], "conversation_sid": conversation}
            async with control.post(f"{url}/_sim/mutate", json=body) as response:
                assert response.status == 200
            async with control.get(f"{url}/_sim/webhooks?wait=10") as response:
                shown = await response.json()
        assert shown["idle"] is True
        assert (shown["delivered"], shown["filtered"]) == (1, 2)
        assert receiver.events() == ["onParticipantAdded"]
        item = receiver.received[0]
        assert item.form["ConversationSid"] == conversation
        assert item.headers["X-Twilio-Signature"] == expected_signature(
            receiver.url, item.body, DEMO_AUTH_TOKEN
        )
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) == 0


# -- the dataset's side ----------------------------------------------------------------------


def brute_members(data: Dataset, service: str) -> dict[str, list[str]]:
    """Every conversation's members, from every user's listing (users in SID order)."""
    found: dict[str, list[str]] = {}
    for item in data.expected_memberships(service_sid=service):
        found.setdefault(item["conversation_sid"], []).append(item["user_sid"])
    return found


def test_conversation_members_follow_the_overlay() -> None:
    data = Dataset.generate(seed=8, services=2, users_per_service=120)
    for service in data.service_sids():
        everyone = brute_members(data, service)
        assert len(everyone) > 100
        for conversation, members in sorted(everyone.items())[::3]:
            assert data.conversation_members(service, conversation) == members
    service = data.default_service_sid
    conversation, members = busy_conversation(data)
    outsider = next(u for u in data.user_sids(service) if u not in members)
    data.remove_membership(service, members[0], conversation)
    data.add_membership(service, outsider, conversation)
    data.delete_user(service, members[1])
    newcomer = data.add_user(service, "late.joiner")
    data.add_membership(service, newcomer, conversation)
    expected = sorted([*members[2:], outsider, newcomer])
    assert data.conversation_members(service, conversation) == expected
    assert brute_members(data, service)[conversation] == expected
    fresh = data.add_membership(service, outsider)
    assert data.conversation_members(service, fresh) == [outsider]


def test_add_message_counts_unread_for_the_other_members() -> None:
    data = Dataset.generate(seed=8, users_per_service=120)
    service = data.default_service_sid
    conversation, members = busy_conversation(data)
    author, never_read, reader = members[0], members[1], members[2]
    data.set_unread(service, never_read, conversation, None, None)
    data.set_unread(service, reader, conversation, 4, 10)
    data.set_unread(service, author, conversation, 1, 9)
    author_before = membership(data, author, conversation)
    others_before = {
        m: membership(data, m, conversation)["unread_messages_count"] for m in members[3:]
    }
    version = data.version
    first = data.add_message(service, author, conversation)
    second = data.add_message(service, author, conversation)
    assert second == first + 1
    assert first >= 15  # past the highest horizon: last read 10 + 4 unread
    assert data.version == version + 2
    assert membership(data, author, conversation) == {
        **author_before,
        "date_updated": membership(data, author, conversation)["date_updated"],
    }
    assert membership(data, author, conversation)["unread_messages_count"] == 1
    assert membership(data, never_read, conversation)["unread_messages_count"] is None
    assert membership(data, reader, conversation)["unread_messages_count"] == 6
    assert membership(data, reader, conversation)["last_read_message_index"] == 10
    for member, count in others_before.items():
        after = membership(data, member, conversation)["unread_messages_count"]
        assert after == (None if count is None else count + 2)
    assert membership(data, reader, conversation)["date_updated"] > author_before["date_updated"]
    outsider = next(u for u in data.user_sids(service) if u not in members)
    with pytest.raises(KeyError, match="not a member"):
        data.add_message(service, outsider, conversation)


def test_remove_conversation_drops_every_membership() -> None:
    data = Dataset.generate(seed=8, users_per_service=120)
    service = data.default_service_sid
    conversation, members = busy_conversation(data)
    counts = {m: data.membership_count(service, m) for m in members}
    assert data.remove_conversation(service, conversation) == members
    for member in members:
        assert data.membership_count(service, member) == counts[member] - 1
        assert conversation not in {
            m["conversation_sid"] for m in data.memberships(service, member)
        }
    with pytest.raises(KeyError):
        data.conversation_members(service, conversation)
    with pytest.raises(KeyError):
        data.add_membership(service, members[0], conversation)


def test_listeners_hear_changes_in_order_until_unsubscribed() -> None:
    data = Dataset.generate(seed=8, users_per_service=60)
    service = data.default_service_sid
    heard: list[Change] = []
    unsubscribe = data.subscribe(heard.append)
    conversation, members = busy_conversation(data)
    data.set_notification_level(service, members[0], conversation, "muted")
    data.set_notification_level(service, members[0], conversation, "muted")  # no change
    data.add_user(service)  # no event
    data.remove_membership(service, members[0], conversation)
    unsubscribe()
    data.remove_membership(service, members[1], conversation)
    assert [c.event_type for c in heard] == ["onParticipantUpdated", "onParticipantRemoved"]
    assert all(c.conversation_sid == conversation and c.service_sid == service for c in heard)
    assert dict(heard[1].fields)["EventType"] == "onParticipantRemoved"


def test_in_process_helpers_need_a_served_simulator() -> None:
    sim = Simulator(Dataset.generate(seed=8, users_per_service=10))
    with pytest.raises(RuntimeError, match="not being served"):
        sim.replay_webhook()
    assert sim.webhooks_idle(0.1)
