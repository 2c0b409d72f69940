"""The simulator's dataset: determinism, realism, laziness and the mutation overlay."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from typing import Any

import pytest

from convsync_tools.simdata import Dataset, twilio_date

SID = {p: re.compile(rf"^{p}[0-9a-f]{{32}}$") for p in ("AC", "IS", "US", "CH", "MB", "RL")}
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
BASE = "http://sim.test:1234"


@pytest.fixture(scope="module")
def data() -> Dataset:
    return Dataset.generate(seed=5, services=2, users_per_service=300)


@pytest.fixture(scope="module")
def memberships(data: Dataset) -> list[dict[str, Any]]:
    return list(data.expected_memberships(BASE))


def test_same_seed_same_data_other_seed_other_data() -> None:
    one = Dataset.generate(seed=9, services=1, users_per_service=40)
    two = Dataset.generate(seed=9, services=1, users_per_service=40)
    other = Dataset.generate(seed=10, services=1, users_per_service=40)
    assert list(one.expected_memberships()) == list(two.expected_memberships())
    assert list(one.expected_users()) == list(two.expected_users())
    assert one.services() == two.services()
    assert set(one.user_sids(one.default_service_sid)).isdisjoint(
        other.user_sids(other.default_service_sid)
    )


def test_sids_are_twilio_shaped_and_listings_sorted(
    data: Dataset, memberships: list[dict[str, Any]]
) -> None:
    services = [s["sid"] for s in data.services()]
    assert services == sorted(services)
    assert len(set(services)) == 2
    for service in services:
        users = data.user_sids(service)
        assert users == sorted(users)
        assert len(set(users)) == 300
        assert all(SID["US"].match(u) for u in users)
    assert SID["AC"].match(data.account_sid)
    by_user: dict[str, list[str]] = {}
    for item in memberships:
        for field, prefix in (
            ("account_sid", "AC"),
            ("chat_service_sid", "IS"),
            ("conversation_sid", "CH"),
            ("participant_sid", "MB"),
            ("user_sid", "US"),
        ):
            assert SID[prefix].match(item[field]), (field, item[field])
        by_user.setdefault(item["user_sid"], []).append(item["conversation_sid"])
    for conversations in by_user.values():
        assert conversations == sorted(conversations)
        assert len(set(conversations)) == len(conversations)
    participants = [item["participant_sid"] for item in memberships]
    assert len(set(participants)) == len(participants)
    for user in data.expected_users():
        assert SID["RL"].match(user["role_sid"])


def test_positions_invert_sids(data: Dataset) -> None:
    for prefix, scope in (("IS", 0), ("US", 1), ("CH", 0)):
        for index in (0, 1, 77, 123_456):
            sid = data.position_sid(prefix, scope, index)
            assert data.position_of(prefix, scope, sid) == index
        assert data.position_of(prefix, scope, prefix + "0" * 32) is None
    assert data.position_of("US", 0, data.position_sid("US", 1, 5)) is None


def test_membership_counts_are_skewed(data: Dataset) -> None:
    service = data.default_service_sid
    counts = [data.membership_count(service, user) for user in data.user_sids(service)]
    assert sum(c == 0 for c in counts) >= 20  # many users with none
    assert sum(1 <= c <= 60 for c in counts) > len(counts) / 2  # most have a few dozen
    assert max(counts) > 100  # some need three pages of 50
    small = Dataset.generate(seed=1, services=3, users_per_service=3)
    for sid in small.service_sids():
        small_counts = [small.membership_count(sid, u) for u in small.user_sids(sid)]
        assert max(small_counts) > 100
        assert min(small_counts) == 0


def test_conversations_are_shared_with_the_same_conversation_fields(
    memberships: list[dict[str, Any]],
) -> None:
    shared = (
        "friendly_name",
        "unique_name",
        "attributes",
        "conversation_state",
        "created_by",
        "date_created",
        "date_updated",
        "timers",
    )
    by_conversation: dict[str, list[dict[str, Any]]] = {}
    for item in memberships:
        by_conversation.setdefault(item["conversation_sid"], []).append(item)
    members = Counter(len(items) for items in by_conversation.values())
    assert sum(n for size, n in members.items() if size >= 3) > len(by_conversation) / 3
    for items in by_conversation.values():
        first = {field: items[0][field] for field in shared}
        for item in items[1:]:
            assert {field: item[field] for field in shared} == first


def test_values_are_varied_nullable_and_well_formed(memberships: list[dict[str, Any]]) -> None:
    def seen(field: str) -> Counter[str]:
        return Counter(json.dumps(item[field], ensure_ascii=False) for item in memberships)

    assert "null" in seen("friendly_name")
    assert "null" in seen("unique_name")
    assert any(v != "null" for v in seen("unique_name"))
    assert "null" in seen("unread_messages_count")
    assert "null" in seen("last_read_message_index")
    assert "null" in seen("created_by")
    assert {json.loads(v) for v in seen("conversation_state")} == {"active", "inactive", "closed"}
    assert {json.loads(v) for v in seen("notification_level")} == {"default", "muted"}
    timer_keys = {tuple(sorted(item["timers"])) for item in memberships}
    assert timer_keys == {
        (),
        ("date_inactive",),
        ("date_closed",),
        ("date_closed", "date_inactive"),
    }
    attributes = [json.loads(item["attributes"]) for item in memberships]
    assert {} in attributes
    assert any(isinstance(v, dict) for a in attributes for v in a.values())
    names = "".join(item["friendly_name"] or "" for item in memberships)
    for sample in ("🚀", "项目", "فريق", "צוות"):
        assert sample in names
    for item in memberships:
        assert DATE.match(item["date_created"])
        assert DATE.match(item["date_updated"])
        assert item["date_updated"] >= item["date_created"]
        assert all(DATE.match(v) for v in item["timers"].values())
        assert item["friendly_name"] is None or len(item["friendly_name"]) <= 256
        assert item["url"].startswith(f"{BASE}/v1/Services/{item['chat_service_sid']}/Users/")


def test_users_have_read_and_fetch_forms(data: Dataset) -> None:
    users = list(data.expected_users(BASE, data.default_service_sid))
    assert all(u["is_online"] is None and u["is_notifiable"] is None for u in users)
    assert any(u["friendly_name"] is None for u in users)
    assert len({u["identity"] for u in users}) == len(users)
    fetched = [data.user_resource(0, u, BASE, fetch=True) for u in range(50)]
    assert {f["is_online"] for f in fetched} == {True, False, None}
    assert fetched[3]["sid"] == users[3]["sid"]


def test_users_are_found_by_sid_or_identity(data: Dataset) -> None:
    users = list(data.expected_users(service_sid=data.service_sids()[1]))
    for index, user in enumerate(users):
        assert data.user_index(1, user["sid"]) == index
        assert data.user_index(1, user["identity"]) == index
        assert data.user_index(0, user["sid"]) is None
    assert data.user_index(1, users[0]["identity"].upper()) is None
    assert data.user_index(1, "nobody") is None
    assert data.user_index(1, "agent99999") is None


def test_a_hundred_thousand_users_are_derived_lazily() -> None:
    started = time.monotonic()
    big = Dataset.generate(seed=3, services=2, users_per_service=100_000)
    page, more = big.user_page(1, 70_000, None, 50)
    assert page == list(range(70_001, 70_051))
    assert more
    user = big.user_resource(1, 99_999)
    assert big.user_index(1, user["identity"]) == 99_999
    assert big.user_page(1, 99_998, None, 50) == ([99_999], False)
    assert len(big.memberships(big.service_sids()[1], user["sid"])) == 0  # the last one is empty
    assert time.monotonic() - started < 5


def test_a_derived_dataset_serves_the_same_records_and_derives_nothing_more() -> None:
    """``derive`` does up front what the first walk would (the demo's simulator, so that its
    pass is convsync's cost, not the simulator's first derivations), and changes nothing."""
    lazy = Dataset.generate(seed=7, services=2, users_per_service=60)
    derived = Dataset.generate(seed=7, services=2, users_per_service=60)
    derived.derive()
    caches = (derived._user, derived._base_memberships, derived._conversation)
    derivations = [cache.cache_info().misses for cache in caches]
    assert min(derivations) > 0
    assert list(derived.expected_users(BASE)) == list(lazy.expected_users(BASE))
    assert list(derived.expected_memberships(BASE)) == list(lazy.expected_memberships(BASE))
    assert [cache.cache_info().misses for cache in caches] == derivations, "nothing more"


def test_keyset_pages_survive_removals(data: Dataset) -> None:
    mutable = Dataset.generate(seed=5, services=1, users_per_service=30)
    service = mutable.default_service_sid
    heavy = mutable.user_sids(service)[10]  # n // 3
    items, _ = mutable.membership_page(0, 10, None, None, 20)
    after = items[9]
    expected = items[10:20]
    conversation = mutable.position_sid("CH", 0, after)
    mutable.remove_membership(service, heavy, conversation)
    assert mutable.membership_page(0, 10, after, None, 10)[0] == expected
    assert mutable.membership_page(0, 10, None, items[10], 10)[0] == items[:9]


def test_mutations_show_in_expectations() -> None:
    data = Dataset.generate(seed=8, services=1, users_per_service=12)
    service = data.default_service_sid
    users = data.user_sids(service)
    alice = users[4]  # n // 3: the heavy one
    bob = max(users[5:], key=lambda u: data.membership_count(service, u))
    before = data.memberships(service, alice)
    version = data.version

    gone = before[0]["conversation_sid"]
    data.remove_membership(service, alice, gone)
    assert gone not in [m["conversation_sid"] for m in data.memberships(service, alice)]
    with pytest.raises(KeyError):
        data.remove_membership(service, alice, gone)

    theirs = next(
        m["conversation_sid"]
        for m in data.memberships(service, bob)
        if m["conversation_sid"] not in {x["conversation_sid"] for x in before}
    )
    joined = data.add_membership(service, alice, theirs, notification_level="muted")
    assert joined == theirs
    mine = {m["conversation_sid"]: m for m in data.memberships(service, alice)}
    assert mine[theirs]["notification_level"] == "muted"
    assert list(mine) == sorted(mine)
    with pytest.raises(ValueError, match="already a member"):
        data.add_membership(service, alice, theirs)

    fresh = data.add_membership(service, alice)
    assert fresh in [m["conversation_sid"] for m in data.memberships(service, alice)]
    assert data.memberships(service, alice)[-1]["conversation_sid"] == fresh

    data.remove_membership(service, alice, theirs)
    rejoined = data.add_membership(service, alice, theirs)
    assert rejoined == theirs
    participant = {m["conversation_sid"]: m for m in data.memberships(service, alice)}[theirs]
    assert participant["participant_sid"] != mine[theirs]["participant_sid"]
    assert data.version > version


def test_update_conversation_is_seen_by_every_member() -> None:
    data = Dataset.generate(seed=8, services=1, users_per_service=60)
    service = data.default_service_sid
    by_conversation: dict[str, list[dict[str, Any]]] = {}
    for item in data.expected_memberships():
        by_conversation.setdefault(item["conversation_sid"], []).append(item)
    conversation, members = max(by_conversation.items(), key=lambda kv: len(kv[1]))
    assert len(members) >= 2
    old = members[0]["date_updated"]
    data.update_conversation(
        service, conversation, friendly_name="Renamed ✨", conversation_state="closed"
    )
    for member in members:
        seen = {m["conversation_sid"]: m for m in data.memberships(service, member["user_sid"])}[
            conversation
        ]
        assert seen["friendly_name"] == "Renamed ✨"
        assert seen["conversation_state"] == "closed"
        assert seen["date_updated"] > old
        assert seen["participant_sid"] == member["participant_sid"]
    with pytest.raises(ValueError, match="not conversation fields"):
        data.update_conversation(service, conversation, participant_sid="MB" + "0" * 32)
    with pytest.raises(ValueError, match="conversation_state"):
        data.update_conversation(service, conversation, conversation_state="open")
    with pytest.raises(KeyError):
        data.update_conversation(service, "CH" + "0" * 32, friendly_name="x")


def test_set_unread_touches_one_membership() -> None:
    data = Dataset.generate(seed=8, services=1, users_per_service=60)
    service = data.default_service_sid
    items = list(data.expected_memberships())
    target = items[0]
    data.set_unread(service, target["user_sid"], target["conversation_sid"], 7, 93)
    after = list(data.expected_memberships())
    changed = [(a, b) for a, b in zip(items, after, strict=True) if a != b]
    assert len(changed) == 1
    assert changed[0][1]["unread_messages_count"] == 7
    assert changed[0][1]["last_read_message_index"] == 93


def test_deleted_and_added_users() -> None:
    data = Dataset.generate(seed=8, services=1, users_per_service=10)
    service = data.default_service_sid
    users = data.user_sids(service)
    data.delete_user(service, users[3])
    assert users[3] not in data.user_sids(service)
    assert data.user_index(0, users[3]) is None
    assert all(m["user_sid"] != users[3] for m in data.expected_memberships())
    with pytest.raises(KeyError):
        data.memberships(service, users[3])
    new = data.add_user(service, identity="new.person@example.com", friendly_name="Nuevo 🆕")
    assert data.user_sids(service)[-1] == new
    assert new > users[-1]
    assert data.user_index(0, "new.person@example.com") == data.user_index(0, new)
    assert data.memberships(service, new) == []
    with pytest.raises(ValueError, match="taken"):
        data.add_user(service, identity="new.person@example.com")


def test_mutations_are_thread_safe() -> None:
    data = Dataset.generate(seed=4, services=1, users_per_service=40)
    service = data.default_service_sid
    users = data.user_sids(service)
    counts = {u: data.membership_count(service, u) for u in users}
    errors: list[BaseException] = []

    def work(user: str) -> None:
        try:
            for _ in range(20):
                data.add_membership(service, user)
                assert data.memberships(service, user)
                assert len(data.user_sids(service)) == 40
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(u,)) for u in users[:8]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for user in users[:8]:
        assert data.membership_count(service, user) == counts[user] + 20


def test_twilio_date_format() -> None:
    assert twilio_date(1_438_286_400) == "2015-07-30T20:00:00Z"


def test_a_dataset_of_the_benchmarks_middle_size_keeps_every_record_derived() -> None:
    # Otherwise a page costs the simulator more the larger the dataset (records derived again
    # after falling out of its caches), and the benchmark's pages/s at 40,000 users against
    # 4,000 measures the simulator rather than the worker.
    data = Dataset.generate(1, 1, 40_000)
    bounds = {
        "conversations": (data._conversation.cache_parameters()["maxsize"], data._pool),
        "users": (data._user.cache_parameters()["maxsize"], 40_000),
        "memberships": (data._base_memberships.cache_parameters()["maxsize"], 40_000),
    }
    assert all(kept is not None and kept >= needed for kept, needed in bounds.values()), bounds
