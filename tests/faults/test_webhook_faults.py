"""Webhooks under faults, for real: SIGKILL between a webhook's 200 and its re-list, and a
database that turns read-only (a failover) while webhooks arrive."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from convsync_tools.simdata import Dataset
from convsync_tools.simulator import Simulator, SimulatorServer
from tests.faults.common import Failover, record
from tests.harness import (
    Replica,
    assert_mirrors,
    convsync,
    fetch,
    scalar,
    until,
    worker_env,
)
from tests.integration.test_webhooks import (
    a_membership,
    clear_of_the_hour,
    first_pass_done,
    mirrors,
    outlasts_the_hour,
    overlapping_listings,
    post_form,
    targets_left,
    webhook_env,
)
from worker.relist import MAX_ATTEMPTS
from worker.webhooks import PATH, twilio_signature


@pytest.fixture
def server() -> Iterator[SimulatorServer]:
    sim = Simulator(Dataset.generate(seed=17, services=1, users_per_service=80))
    with SimulatorServer(sim) as s:
        yield s


def participant_updated(
    server: SimulatorServer, url: str, service: str, user: str, conversation: str
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """An onParticipantUpdated webhook for ``user``, signed as Twilio signs it for ``url``:
    its form and its headers."""
    data = server.sim.dataset
    identity = next(u["identity"] for u in data.expected_users(service) if u["sid"] == user)
    params = [
        ("AccountSid", server.sim.config.account_sid),
        ("EventType", "onParticipantUpdated"),
        ("ChatServiceSid", service),
        ("ConversationSid", conversation),
        ("Identity", str(identity)),
    ]
    return params, {
        "X-Twilio-Signature": twilio_signature(server.sim.config.auth_token, url, params)
    }


async def _none_left(db_url: str) -> bool:
    return await targets_left(db_url) == 0


@outlasts_the_hour
async def test_sigkill_after_the_200_loses_no_relist(
    server: SimulatorServer, db_url: str, tmp_path: Path
) -> None:
    await clear_of_the_hour()
    # A coalescing window of 3 s: killed right after the 200, the re-list has not begun.
    env = webhook_env(server, db_url, CONVSYNC_WEBHOOK_COALESCE_SECONDS="3")
    replica = Replica(env, tmp_path / "first.log")
    await first_pass_done(db_url)
    server.sim.configure(webhook_url=f"{replica.url}{PATH}")
    data = server.sim.dataset
    service, user, conversation = a_membership(server)
    data.remove_membership(service, user, conversation)
    assert await asyncio.to_thread(server.sim.webhooks_idle, 10)
    assert server.sim.webhook_stats().delivered == 1
    assert await targets_left(db_url) == 1
    replica.stop(signal.SIGKILL)
    assert not await mirrors(server, db_url), "the removal is not in the mirror yet"
    status = convsync(["status", "--json"], webhook_env(server, db_url))
    assert status.returncode == 0, status.stderr[-2000:]
    assert json.loads(status.stdout)["relists"]["pending"] == 1, "status shows it pending"

    # The next start serves it (its first pass was this tick's: no new pass either).
    again = Replica(env, tmp_path / "second.log")
    try:
        await until(lambda: _none_left(db_url), timeout=30, what="the re-list after restart")
        await assert_mirrors(server, db_url)
        removed_at = await scalar(
            db_url,
            "SELECT removed_at FROM memberships WHERE user_sid = $1 AND conversation_sid = $2",
            user,
            conversation,
        )
        assert isinstance(removed_at, datetime)
        assert removed_at <= datetime.now(UTC)
        assert await scalar(db_url, "SELECT count(*) FROM sync_runs") == 1, "no new pass"
    finally:
        assert again.stop() == 0


@outlasts_the_hour
async def test_webhooks_while_the_database_is_read_only_get_503_and_lose_nothing(
    server: SimulatorServer, db_url: str, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    await clear_of_the_hour()
    replica = Replica(
        webhook_env(server, db_url, CONVSYNC_WEBHOOK_COALESCE_SECONDS="0"), tmp_path / "run.log"
    )
    try:
        await first_pass_done(db_url)
        url = f"{replica.url}{PATH}"
        service, user, conversation = a_membership(server)
        # upstream changed (no webhook URL configured: the test sends the webhook)
        server.sim.dataset.set_unread(service, user, conversation, 21, 2)
        params, headers = participant_updated(server, url, service, user, conversation)
        headers["I-Twilio-Idempotency-Token"] = "while-read-only"
        failover = Failover(admin, db_url)
        await failover.demote()
        try:
            refused = 0
            for _ in range(3):  # Twilio's retries, all while the database refuses writes
                status, body = await post_form(url, params, headers)
                assert status == 503, body
                refused += 1
        finally:
            await failover.promote()
        assert await scalar(db_url, "SELECT count(*) FROM webhook_events") == 0
        status, body = await post_form(url, params, headers)  # the retry after the failover
        assert status == 200, body
        assert body["status"] == "accepted", body
        await until(lambda: mirrors(server, db_url), timeout=30, what="the re-list")
        record(webhook_503_while_read_only=refused)
    finally:
        assert replica.stop() == 0


async def _participant_updated(
    server: SimulatorServer, url: str, service: str, user: str, conversation: str
) -> None:
    params, headers = participant_updated(server, url, service, user, conversation)
    status, body = await post_form(url, params, headers)
    assert (status, body["status"]) == (200, "accepted"), body


@outlasts_the_hour
async def test_a_relist_that_lost_the_database_past_its_wait_leaves_the_relister_serving(
    server: SimulatorServer, db_url: str, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    # A re-list's page write meets a read-only database for longer than
    # CONVSYNC_DB_WAIT_SECONDS: the re-lister stops, and once the database is back it must
    # serve that target (after its lease) and those recorded since, not stop again at once.
    await clear_of_the_hour()
    env = webhook_env(
        server,
        db_url,
        CONVSYNC_WEBHOOK_COALESCE_SECONDS="0",
        CONVSYNC_DB_WAIT_SECONDS="1",
        CONVSYNC_LEASE_SECONDS="3",
        # one re-list at a time: while it runs the re-lister only waits for it, so its page
        # write is what meets the read-only database (not the next claim of a target)
        CONVSYNC_RELIST_CONCURRENCY="1",
    )
    replica = Replica(env, tmp_path / "run.log")
    try:
        await first_pass_done(db_url)
        url = f"{replica.url}{PATH}"
        data = server.sim.dataset
        service = data.service_sids()[0]
        users = [u for u in data.user_sids(service) if data.membership_count(service, u)]
        cut_off, later = users[0], users[1]
        conversation = data.memberships(service, cut_off)[0]["conversation_sid"]
        data.set_unread(service, cut_off, conversation, 31, 4)
        server.sim.reset_stats()
        server.sim.hold()  # the re-list's page waits at the upstream
        await _participant_updated(server, url, service, cut_off, conversation)
        assert await asyncio.to_thread(server.sim.wait_until, lambda s: s.in_flight >= 1, 20)
        failover = Failover(admin, db_url)
        await failover.demote()
        try:
            server.sim.release()  # its page comes back to a database that refuses writes

            async def stopped() -> bool:
                return any(e["event"] == "relister_stopped" for e in replica.events())

            await until(stopped, timeout=30, what="the re-lister stopped")
        finally:
            await failover.promote()
        other = data.memberships(service, later)[0]["conversation_sid"]
        data.set_unread(service, later, other, 32, 5)
        await _participant_updated(server, url, service, later, other)
        await until(lambda: mirrors(server, db_url), timeout=40, what="both re-lists")
        assert await targets_left(db_url) == 0
    finally:
        server.sim.release()
        assert replica.stop() == 0


@outlasts_the_hour
async def test_a_stop_while_an_identity_look_up_waits_to_retry_keeps_its_target_quietly(
    server: SimulatorServer, db_url: str, tmp_path: Path
) -> None:
    # SIGTERM while the re-lister's look-up of an unknown identity waits out a 503: the
    # target is given back, due at once, and the shutdown logs no crash.
    await clear_of_the_hour()
    env = webhook_env(server, db_url, CONVSYNC_WEBHOOK_COALESCE_SECONDS="0")
    replica = Replica(env, tmp_path / "run.log")
    stopped = False
    try:
        await first_pass_done(db_url)
        url = f"{replica.url}{PATH}"
        service, _user, conversation = a_membership(server)
        server.sim.reset_stats()
        server.sim.fail_next("/Users/newcomer", 503, count=1000)
        params = [
            ("AccountSid", server.sim.config.account_sid),
            ("EventType", "onParticipantAdded"),
            ("ChatServiceSid", service),
            ("ConversationSid", conversation),
            ("Identity", "newcomer"),
        ]
        signed = twilio_signature(server.sim.config.auth_token, url, params)
        status, body = await post_form(url, params, {"X-Twilio-Signature": signed})
        assert (status, body["status"]) == (200, "accepted"), body
        refused = await asyncio.to_thread(
            server.sim.wait_until, lambda s: s.by_status[503] >= 1, 20
        )
        assert refused, "the look-up never reached the upstream"
        assert replica.stop() == 0
        stopped = True
    finally:
        server.sim.clear_faults()
        if not stopped:
            replica.stop()
    log = (tmp_path / "run.log").read_text()
    assert "relister_crashed" not in log
    assert "Traceback" not in log
    targets = await fetch(
        db_url, "SELECT claimed_by, due_at <= now() AS due, last_error FROM relist_targets"
    )
    assert [dict(t) for t in targets] == [{"claimed_by": None, "due": True, "last_error": None}]


@outlasts_the_hour
async def test_a_new_pass_waits_for_a_relist_under_way_rather_than_list_its_user_beside_it(
    server: SimulatorServer, db_url: str, tmp_path: Path
) -> None:
    # A pass starts (`convsync sync`, beside the service) while a re-list's page of a user is
    # slow to come: the pass queues the user but lists it only once the re-list gave it back.
    await clear_of_the_hour()
    replica = Replica(
        webhook_env(server, db_url, CONVSYNC_WEBHOOK_COALESCE_SECONDS="0"), tmp_path / "run.log"
    )
    try:
        await first_pass_done(db_url)
        url = f"{replica.url}{PATH}"
        service, user, conversation = a_membership(server)
        server.sim.dataset.set_unread(service, user, conversation, 41, 3)
        server.sim.reset_stats()
        # long enough for the pass beside it to queue the user while the page is on its way
        server.sim.configure(slow_seconds=8.0)
        server.sim.fail_next(f"Users/{user}/Conversations", "slow")
        await _participant_updated(server, url, service, user, conversation)
        assert await asyncio.to_thread(server.sim.wait_until, lambda s: s.in_flight >= 1, 20)
        beside = await asyncio.to_thread(convsync, ["sync"], worker_env(server, db_url))
        assert beside.returncode == 0, beside.stderr[-2000:]
        await until(lambda: _none_left(db_url), timeout=30, what="the re-list served")
        # (the slow request is recorded once answered: after the pass, by then)
        assert overlapping_listings(server) == []
        await assert_mirrors(server, db_url)
    finally:
        assert replica.stop() == 0


@outlasts_the_hour
async def test_a_relist_failing_during_a_pass_is_not_the_pass_s_failure(
    server: SimulatorServer, db_url: str, tmp_path: Path
) -> None:
    # A user the running pass already listed changes; its re-list fails (Twilio answers 500
    # past every retry). That is the re-list's failure, retried later, not the pass's: the
    # pass takes the user back and lists it itself, and ends succeeded, not partial.
    await clear_of_the_hour()
    server.sim.configure(latency_ms=60)
    env = webhook_env(
        server,
        db_url,
        CONVSYNC_WEBHOOK_COALESCE_SECONDS="0",
        CONVSYNC_CONCURRENCY="2",
        CONVSYNC_MAX_ATTEMPTS="2",
        CONVSYNC_MAX_RETRY_SECONDS="1",
    )
    replica = Replica(env, tmp_path / "run.log")
    try:
        url = f"{replica.url}{PATH}"
        data = server.sim.dataset
        service = data.service_sids()[0]

        async def a_listed_user() -> str | None:
            done = await fetch(
                db_url, "SELECT user_sid FROM sync_cursors WHERE state = 'done' ORDER BY 1"
            )
            users = [r["user_sid"] for r in done if data.membership_count(service, r["user_sid"])]
            return users[0] if users else None

        user = await until(a_listed_user, timeout=60, what="a user listed by the pass")
        assert await scalar(db_url, "SELECT status FROM sync_runs") == "running"
        conversation = data.memberships(service, user)[0]["conversation_sid"]
        data.set_unread(service, user, conversation, 61, 2)
        server.sim.fail_next(f"Users/{user}/Conversations", 500, count=2)  # both attempts
        await _participant_updated(server, url, service, user, conversation)
        await until(
            lambda: scalar(db_url, "SELECT finished_at IS NOT NULL FROM sync_runs"),
            timeout=120,
            what="the pass's end",
        )
        postponed = [e for e in replica.events() if e.get("event") == "relist_postponed"]
        assert postponed, "the re-list failed"
        finished = await scalar(db_url, "SELECT finished_at FROM sync_runs")
        assert datetime.fromisoformat(postponed[0]["timestamp"]) < finished, "during the pass"
        assert await scalar(db_url, "SELECT status FROM sync_runs") == "succeeded"
        assert await scalar(db_url, "SELECT users_failed FROM sync_runs") == 0
        await assert_mirrors(server, db_url)  # the user's change too: the pass listed it
    finally:
        assert replica.stop() == 0


@outlasts_the_hour
async def test_an_identity_look_up_failing_every_time_is_given_up_like_a_failed_relist(
    server: SimulatorServer, db_url: str, tmp_path: Path
) -> None:
    # A target named by an identity whose look-up Twilio keeps refusing (500 past every
    # retry) is tried MAX_ATTEMPTS times, as a failed listing is, then dropped (the next pass
    # lists every user); it was postponed every 30 s for ever.
    await clear_of_the_hour()
    replica = Replica(
        webhook_env(server, db_url, CONVSYNC_MAX_ATTEMPTS="1", CONVSYNC_MAX_RETRY_SECONDS="1"),
        tmp_path / "run.log",
    )
    try:
        await first_pass_done(db_url)
        service = server.sim.dataset.service_sids()[0]
        server.sim.fail_next("/Users/someone.new", 500, count=1000)
        await fetch(
            db_url,
            "INSERT INTO relist_targets (chat_service_sid, user_ref, due_at, attempts)"
            " VALUES ($1, 'someone.new', now(), $2)",
            service,
            MAX_ATTEMPTS - 1,  # its last try
        )
        await until(lambda: _none_left(db_url), timeout=20, what="the target given up")
        dropped = [e for e in replica.events() if e.get("event") == "relist_dropped"]
        assert [e["reason"] for e in dropped] == ["failed too often"], dropped
    finally:
        assert replica.stop() == 0
