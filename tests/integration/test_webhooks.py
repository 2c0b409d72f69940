"""Twilio webhooks end to end: the simulator posts signed post-event webhooks to a real
`convsync run`, which re-lists the users they name between scheduled passes."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from convsync_tools.simdata import Dataset
from convsync_tools.simulator import Simulator, SimulatorServer
from tests.faults.common import record
from tests.harness import (
    Replica,
    assert_mirrors,
    convsync,
    failure,
    fetch,
    scalar,
    until,
    worker_env,
)
from worker.webhooks import HANDLED_EVENTS, PATH, twilio_signature

USERS = 600
FIGURES = Path("/tmp/convsync-webhook-figures.json")


@pytest.fixture
def server() -> Iterator[SimulatorServer]:
    sim = Simulator(Dataset.generate(seed=13, services=1, users_per_service=USERS))
    with SimulatorServer(sim) as s:
        yield s


HOUR_MARGIN = 120  # seconds before the hour in which a test waits for the tick to pass


async def clear_of_the_hour() -> None:
    """The schedule ticks on the hour (an interval of 3600 s is aligned to the epoch): a test
    that must see no second pass starts clear of it. Such a test is marked ``outlasts_the_hour``:
    the wait comes on top of its own time."""
    seconds_into_hour = time.time() % 3600
    if seconds_into_hour > 3600 - HOUR_MARGIN:
        await asyncio.sleep(3600 - seconds_into_hour + 2)


# The suite's timeout (pyproject.toml: 120 s), plus the longest wait in clear_of_the_hour.
outlasts_the_hour = pytest.mark.timeout(120 + HOUR_MARGIN + 2)


def webhook_env(server: SimulatorServer, db_url: str, **overrides: str) -> dict[str, str]:
    settings = {
        "CONVSYNC_INTERVAL": "3600",
        "CONVSYNC_WEBHOOKS": "true",
        "CONVSYNC_WEBHOOK_COALESCE_SECONDS": "2",
        "CONVSYNC_SHUTDOWN_GRACE": "5",
    }
    return worker_env(server, db_url, **{**settings, **overrides})


def a_membership(server: SimulatorServer) -> tuple[str, str, str]:
    """(service, user, conversation) of the first user with a conversation."""
    data = server.sim.dataset
    service = data.service_sids()[0]
    user = next(u for u in data.user_sids(service) if data.membership_count(service, u))
    return service, user, data.memberships(service, user)[0]["conversation_sid"]


async def first_pass_done(db_url: str) -> None:
    async def succeeded() -> bool:
        status = await scalar(db_url, "SELECT status FROM sync_runs ORDER BY run_id LIMIT 1")
        return bool(status == "succeeded")

    await until(succeeded, timeout=120, what="the first pass")


def conversation_pages(server: SimulatorServer) -> int:
    stats = server.sim.stats()
    return sum(n for (path, _), n in stats.pages_ok.items() if path.endswith("/Conversations"))


async def targets_left(db_url: str) -> int:
    return int(await scalar(db_url, "SELECT count(*) FROM relist_targets"))


async def mirrors(server: SimulatorServer, db_url: str) -> bool:
    try:
        await assert_mirrors(server, db_url)
    except AssertionError:
        return False
    return True


async def metric_values(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        text = await response.text()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def mutate_randomly(server: SimulatorServer, rng: random.Random) -> dict[str, Any]:
    """20 memberships added, 20 removed and 30 changed (read horizons, notification levels,
    conversations' fields and states, messages), on random users."""
    data, sim = server.sim.dataset, server.sim
    service = data.service_sids()[0]
    users = data.user_sids(service)
    removed: list[tuple[str, str]] = []
    members = [u for u in users if data.membership_count(service, u) > 0]
    for user in rng.sample(members, 20):
        conversation = rng.choice(data.memberships(service, user))["conversation_sid"]
        data.remove_membership(service, user, conversation)
        removed.append((user, conversation))
    for user in rng.sample(users, 20):
        if rng.random() < 0.5:
            data.add_membership(service, user)  # a new conversation
        else:
            other = rng.choice(members)
            mine = {m["conversation_sid"] for m in data.memberships(service, user)}
            theirs = [m["conversation_sid"] for m in data.memberships(service, other)]
            candidates = [c for c in theirs if c not in mine]
            if candidates:
                data.add_membership(service, user, rng.choice(candidates))
            else:
                data.add_membership(service, user)
    changes = 0
    while changes < 30:
        user = rng.choice(members)
        items = data.memberships(service, user)
        if not items:
            continue
        conversation = rng.choice(items)["conversation_sid"]
        kind = changes % 5
        if kind == 0:
            data.set_unread(service, user, conversation, rng.randrange(0, 40), rng.randrange(0, 9))
        elif kind == 1:
            level = rng.choice(["default", "muted"])
            sim.mutate(
                "set_notification_level",
                user=user,
                conversation_sid=conversation,
                notification_level=level,
            )
        elif kind == 2:
            data.update_conversation(service, conversation, friendly_name=f"renamed {changes}")
        elif kind == 3:
            data.update_conversation(service, conversation, conversation_state="inactive")
        else:
            data.add_message(service, user, conversation)
        changes += 1
    return {"removed": removed, "service": service}


@outlasts_the_hour
async def test_webhooks_keep_the_mirror_fresh_between_passes(
    server: SimulatorServer, db_url: str, tmp_path: Path
) -> None:
    await clear_of_the_hour()
    replica = Replica(webhook_env(server, db_url), tmp_path / "run.log")
    try:
        await first_pass_done(db_url)
        full_pass_pages = conversation_pages(server)
        server.sim.configure(webhook_url=f"{replica.url}{PATH}")
        server.sim.reset_stats()

        changed_at = time.monotonic()
        changes = mutate_randomly(server, random.Random(5))
        # A user who joined since the pass: its webhook names it by identity alone.
        data = server.sim.dataset
        service = data.service_sids()[0]
        newcomer = data.add_user(service, "late.joiner@example.org")
        data.add_membership(service, newcomer)
        try:
            await until(lambda: mirrors(server, db_url), timeout=30, what="the mirror")
        except AssertionError:
            await assert_mirrors(server, db_url)  # says how it differs
        caught_up = time.monotonic() - changed_at
        assert await asyncio.to_thread(server.sim.webhooks_idle, 10)

        sent = server.sim.webhook_stats()
        assert sent.failed == 0, sent
        assert sent.delivered == sent.sent, sent
        assert await scalar(db_url, "SELECT count(*) FROM sync_runs") == 1, "no new pass"
        relist_pages = conversation_pages(server)
        assert relist_pages < full_pass_pages / 5, (relist_pages, full_pass_pages)
        for user, conversation in changes["removed"]:
            gone = await scalar(
                db_url,
                """SELECT removed_at IS NOT NULL FROM memberships
                   WHERE user_sid = $1 AND conversation_sid = $2""",
                user,
                conversation,
            )
            assert gone, f"{user} left {conversation}: kept with removed_at"
        await until(lambda: _none_left(db_url), timeout=10, what="every target served")
        # The newcomer, looked up by identity, is stored as a listing has users (presence is
        # a fetch's alone, null in every listing): no row flips at the next pass.
        assert await scalar(db_url, "SELECT count(*) FROM users WHERE user_sid = $1", newcomer)
        assert await scalar(db_url, "SELECT count(*) FROM users WHERE is_online IS NOT NULL") == 0
        assert (
            await scalar(db_url, "SELECT count(*) FROM users WHERE is_notifiable IS NOT NULL") == 0
        )
        values = await metric_values(replica.url)
    finally:
        assert replica.stop() == 0
    accepted = sum(
        v
        for (name, labels), v in values.items()
        if name == "convsync_webhooks_total" and ("outcome", "accepted") in labels
    )
    coalesced = values.get(("convsync_relist_requests_total", (("outcome", "coalesced"),)), 0)
    new = values.get(("convsync_relist_requests_total", (("outcome", "new"),)), 0)
    relisted = values.get(("convsync_relists_total", (("outcome", "done"),)), 0)
    delays = values.get(("convsync_relist_delay_seconds_sum", ()), 0.0)
    handled = sum(c["delivered"] for t, c in sent.by_event.items() if t in HANDLED_EVENTS)
    assert handled >= 60, sent.by_event  # the 70 changes, less those that sent no event
    assert accepted == handled, "every delivered event that changes rows was accepted"
    assert relisted >= 1
    figures = {
        "webhooks_sent": sent.sent,
        "webhooks_accepted": accepted,
        "targets_new": new,
        "targets_coalesced": coalesced,
        "relists_done": relisted,
        "seconds_change_to_mirror": round(caught_up, 2),
        "mean_relist_delay_seconds": round(delays / max(relisted, 1), 2),
        "conversation_pages_full_pass": full_pass_pages,
        "conversation_pages_relists": relist_pages,
        "pages_per_event": round(relist_pages / handled, 2),
    }
    FIGURES.write_text(json.dumps(figures, indent=2))
    record(webhook_relist_pages=relist_pages, webhook_full_pass_pages=full_pass_pages)
    print("convsync webhook figures:", " ".join(f"{k}={v}" for k, v in figures.items()))


async def _none_left(db_url: str) -> bool:
    return await targets_left(db_url) == 0


async def post_form(
    url: str, params: list[tuple[str, str]], headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=params, headers=headers) as response,
    ):
        return response.status, await response.json()


@outlasts_the_hour
async def test_a_forged_or_replayed_webhook_changes_nothing(
    server: SimulatorServer, db_url: str, tmp_path: Path
) -> None:
    await clear_of_the_hour()
    replica = Replica(
        webhook_env(server, db_url, CONVSYNC_WEBHOOK_COALESCE_SECONDS="0"), tmp_path / "run.log"
    )
    try:
        await first_pass_done(db_url)
        url = f"{replica.url}{PATH}"
        server.sim.configure(webhook_url=url)
        data = server.sim.dataset
        service, user, conversation = a_membership(server)
        server.sim.configure(webhook_filters=["onParticipantUpdated"])
        server.sim.reset_stats()
        data.set_unread(service, user, conversation, 17, 3)
        assert await asyncio.to_thread(server.sim.webhooks_idle, 10)
        await until(lambda: mirrors(server, db_url), timeout=20, what="the re-list")
        await until(lambda: _none_left(db_url), timeout=10, what="its target served")
        served = await scalar(db_url, "SELECT count(*) FROM webhook_events")
        pages_before = conversation_pages(server)

        # Tampered: the same body signed with another key, or unsigned: 403, nothing recorded.
        for mode in ("bad", "none"):
            sent = await asyncio.to_thread(server.sim.send_webhook, "onParticipantUpdated", mode)
            assert sent.status == 403, (mode, sent)
        # Hand-made: a valid signature over other parameters than those sent.
        params = [("EventType", "onMessageAdded"), ("ChatServiceSid", service)]
        signed = twilio_signature(server.sim.config.auth_token, url, params)
        status, _ = await post_form(
            url, [*params, ("ConversationSid", conversation)], {"X-Twilio-Signature": signed}
        )
        assert status == 403
        # Sent to a Host that names no host:port (no CONVSYNC_WEBHOOK_URL to sign against):
        # refused, nothing raised.
        for host in ("x:abc", "x:99999"):
            status, _ = await post_form(url, params, {"X-Twilio-Signature": signed, "Host": host})
            assert status == 400, host
        # Too large to be read, let alone checked: 413 before any signature is computed.
        huge = [("EventType", "onMessageAdded"), ("Body", "x" * 70_000)]
        status, _ = await post_form(url, huge, {"X-Twilio-Signature": signed})
        assert status == 413
        # Replayed, byte for byte (same signature, same idempotency token): 200, no new target.
        replayed = await asyncio.to_thread(server.sim.replay_webhook)
        assert replayed.status == 200
        assert await scalar(db_url, "SELECT count(*) FROM webhook_events") == served
        assert await targets_left(db_url) == 0
        # A correctly signed copy under a new idempotency token is a new request: it is served.
        resent = await asyncio.to_thread(server.sim.send_webhook, "onParticipantUpdated", "good")
        assert resent.status == 200
        await until(lambda: _none_left(db_url), timeout=10, what="the resent one served")
        assert conversation_pages(server) > pages_before
        # Signed, but naming an identity no text column holds (a NUL): ignored, not a
        # database failure (503) that Twilio would retry.
        params = [
            ("EventType", "onParticipantAdded"),
            ("ChatServiceSid", service),
            ("ConversationSid", conversation),
            ("Identity", "some\x00one"),
        ]
        signed = twilio_signature(server.sim.config.auth_token, url, params)
        status, answer = await post_form(url, params, {"X-Twilio-Signature": signed})
        assert (status, answer) == (200, {"status": "ignored"})
        assert await targets_left(db_url) == 0
        values = await metric_values(replica.url)
    finally:
        assert replica.stop() == 0
    refused = sum(
        v
        for (name, labels), v in values.items()
        if name == "convsync_webhooks_total" and ("outcome", "refused") in labels
    )
    assert refused == 6
    duplicate = values[
        (
            "convsync_webhooks_total",
            (("event_type", "onParticipantUpdated"), ("outcome", "duplicate")),
        )
    ]
    assert duplicate == 1
    log = (tmp_path / "run.log").read_text()
    assert "Traceback" not in log
    for delivery in server.sim.webhook_deliveries():
        if delivery.signature:
            assert delivery.signature not in log, "a signature reached the logs"
    assert server.sim.config.auth_token not in log


def test_webhooks_without_a_key_are_a_configuration_error(
    server: SimulatorServer, db_url: str
) -> None:
    env = worker_env(server, db_url, CONVSYNC_WEBHOOKS="true")
    env.pop("TWILIO_AUTH_TOKEN")
    env.update(TWILIO_API_KEY_SID="SK" + "1" * 32, TWILIO_API_KEY_SECRET="key-secret")
    result = convsync(["run"], env, timeout=30)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "CONVSYNC_WEBHOOK_AUTH_TOKEN" in failure(result.stderr)["error"]


def overlapping_listings(server: SimulatorServer) -> list[str]:
    """Users whose conversations were requested twice at once: a walker has one request in
    flight per listing, so an overlap means two walkers listed one user at the same time."""
    by_user: dict[str, list[tuple[float, float]]] = {}
    for served in server.sim.served():
        path = served.key[0]
        if path.endswith("/Conversations"):
            by_user.setdefault(path, []).append((served.arrived, served.answered))
    overlapping = []
    for path, spans in by_user.items():
        spans.sort()
        if any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)):
            overlapping.append(path)
    return overlapping


@outlasts_the_hour
async def test_relists_during_a_pass_and_across_replicas_never_list_a_user_twice_at_once(
    server: SimulatorServer, db_url: str, tmp_path: Path
) -> None:
    await clear_of_the_hour()
    server.sim.configure(latency_ms=100, jitter_ms=20)
    env = webhook_env(
        server, db_url, CONVSYNC_WEBHOOK_COALESCE_SECONDS="0", CONVSYNC_CONCURRENCY="4"
    )
    first = Replica(env, tmp_path / "first.log")
    second = Replica(env, tmp_path / "second.log")
    try:
        # Webhooks go to both replicas in turn (behind one URL, as a load balancer would).
        urls = [f"{first.url}{PATH}", f"{second.url}{PATH}"]

        async def pass_under_way() -> bool:
            done = await scalar(db_url, "SELECT count(*) FROM sync_cursors WHERE state = 'done'")
            return bool(done and done >= USERS // 4)

        await until(pass_under_way, timeout=60, what="a quarter of the pass")
        data = server.sim.dataset
        service = data.service_sids()[0]
        rng = random.Random(9)
        members = [u for u in data.user_sids(service) if data.membership_count(service, u)]
        for i, user in enumerate(rng.sample(members, 40)):  # listed already, or not yet
            server.sim.configure(webhook_url=urls[i % 2])
            conversation = rng.choice(data.memberships(service, user))["conversation_sid"]
            data.set_unread(service, user, conversation, 50 + i, 1)
            assert await asyncio.to_thread(server.sim.webhooks_idle, 10)
        await first_pass_done(db_url)
        await until(lambda: _none_left(db_url), timeout=60, what="every re-list")
        await assert_mirrors(server, db_url)
        assert await scalar(db_url, "SELECT status FROM sync_runs") == "succeeded"
        assert await scalar(db_url, "SELECT count(*) FROM sync_runs") == 1
        assert overlapping_listings(server) == []
        relisted = [
            e
            for replica in (first, second)
            for e in replica.events()
            if e.get("event") == "relist_done"
        ]
        finished = await scalar(db_url, "SELECT finished_at FROM sync_runs")
        during = [e for e in relisted if datetime.fromisoformat(e["timestamp"]) < finished]
        assert during, "re-lists ran while the pass did"
    finally:
        assert first.stop() == 0
        assert second.stop() == 0


@outlasts_the_hour
async def test_a_burst_on_a_busy_conversation_stays_within_the_limit_and_the_pass_goes_on(
    server: SimulatorServer, db_url: str, tmp_path: Path
) -> None:
    await clear_of_the_hour()
    server.sim.configure(latency_ms=80, jitter_ms=20)
    limit = 6
    env = webhook_env(
        server,
        db_url,
        CONVSYNC_WEBHOOK_COALESCE_SECONDS="0",
        CONVSYNC_CONCURRENCY=str(limit),
        CONVSYNC_RELIST_CONCURRENCY="4",
    )
    replica = Replica(env, tmp_path / "run.log")
    try:

        async def pass_under_way() -> bool:
            done = await scalar(db_url, "SELECT count(*) FROM sync_cursors WHERE state = 'done'")
            return bool(done and done >= USERS // 3)

        await until(pass_under_way, timeout=90, what="a third of the pass")
        server.sim.reset_stats()
        data = server.sim.dataset
        service = data.service_sids()[0]
        listed = {
            r["user_sid"]
            for r in await fetch(db_url, "SELECT user_sid FROM sync_cursors WHERE state = 'done'")
        }
        candidates = {
            m["conversation_sid"] for u in sorted(listed)[:40] for m in data.memberships(service, u)
        }
        busiest = max(sorted(candidates), key=lambda c: len(data.conversation_members(service, c)))
        members = data.conversation_members(service, busiest)
        assert len(members) >= 5
        server.sim.configure(webhook_url=f"{replica.url}{PATH}")
        for _ in range(30):  # a lively conversation: 30 messages, each naming every member
            data.add_message(service, members[0], busiest)
        assert await asyncio.to_thread(server.sim.webhooks_idle, 20)
        await first_pass_done(db_url)
        await until(lambda: _none_left(db_url), timeout=60, what="every re-list")
        await assert_mirrors(server, db_url)
        stats = server.sim.stats()
        assert stats.max_in_flight <= limit, "re-lists and the pass share one limit"
        assert stats.by_status[429] == 0
        assert overlapping_listings(server) == []
        relists = [e for e in replica.events() if e.get("event") == "relist_done"]
        # Coalesced: far fewer re-lists than webhooks times members.
        assert len(relists) < 30 * len(members) / 3, (len(relists), len(members))
    finally:
        assert replica.stop() == 0
    record(burst_webhooks=30, burst_members=len(members), burst_relists=len(relists))
