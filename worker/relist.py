"""Targeted re-lists: the users a webhook named, listed again from page one, between passes.

``Relister`` runs beside the schedule in ``convsync run`` (CONVSYNC_WEBHOOKS=true). It claims
due targets (``worker.targets``) and serves each with at most CONVSYNC_RELIST_CONCURRENCY at
once, through the client the passes use (one concurrency limit for both, so a burst of events
never exceeds it, and the pass keeps its own user loops: it is never starved):

1. a target named by identity only (a user the mirror does not know yet) is resolved through
   Twilio's ``GET /v1/Services/{IS}/Users/{identity}``; one Twilio does not know is dropped;
2. the user's cursor is claimed from page one (a listing already under way is left to finish,
   and the target is tried again a second later);
3. the listing is walked exactly as a pass walks it (``worker.listing``, the pages through a
   group-commit writer): its last page marks what it no longer lists removed;
4. the target is then served, unless an event came while it ran (then it is re-listed again).

It wakes when a webhook was recorded here, and otherwise polls for targets other replicas
recorded (or that became due) every ``POLL_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from urllib.parse import quote

import structlog

from worker import client as api
from worker.client import TwilioClient
from worker.config import Settings
from worker.database import CONNECTION_ERRORS, RetryingStore
from worker.errors import DatabaseUnavailable, FatalError, Interrupted, UserGone, UserSyncError
from worker.leases import HeldClaims
from worker.listing import walk
from worker.logs import redact
from worker.loop import first_set
from worker.metrics import Metrics
from worker.model import parse_users_page
from worker.shutdown import Shutdown
from worker.sids import is_sid
from worker.store import RELIST_OWNER_SUFFIX, Store, new_claim_token
from worker.sync import ConversationsListing, ListingContext
from worker.targets import BUSY_RETRY_SECONDS, Target, TargetQueue
from worker.writer import PageWriter

log = structlog.get_logger(__name__)
POLL_SECONDS = 1.0
FAILED_RETRY_SECONDS = 30.0  # a target whose re-list failed is tried again after this
MAX_ATTEMPTS = 5  # then it is left to the next pass (the safety net)
PRUNE_SECONDS = 3600.0  # how often old idempotency keys are forgotten


class Relister:
    """Serves targeted re-lists until its shutdown's stop (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        client: TwilioClient,
        shutdown: Shutdown,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.client = client
        self.shutdown = shutdown
        self.metrics = metrics
        self.db = RetryingStore(store, settings.db_wait_seconds, metrics)
        self.queue = TargetQueue(store.pool)
        self.lease = settings.lease_seconds
        self.held = HeldClaims(self.db, self.lease)
        # No conversation version cache: a re-list is asked for because something changed.
        self.writer = PageWriter(
            self.db,
            self.lease,
            max_pages=settings.batch_pages,
            known_conversations=0,
            async_commit=settings.async_commit,
            role="relist",
        )
        self.listings = ListingContext(self.db, self.writer, metrics, settings.page_size)
        self.wake = asyncio.Event()  # set when a webhook was recorded by this process
        self.owner = settings.worker_id + RELIST_OWNER_SUFFIX
        # Set by a re-list that met an error that must stop the re-lister (a fatal one, the
        # database away past its wait); ``run`` raises it.
        self.failure: BaseException | None = None
        self._failed = asyncio.Event()

    async def run(self) -> None:
        """Claim and serve due targets until stopped; in-flight re-lists get the grace.
        Raises what stopped it; run again (the daemon does, after a pause), it starts afresh."""
        self.failure = None
        self._failed.clear()
        stop = self.shutdown.stop
        serving: set[asyncio.Task[None]] = set()
        helpers = [
            asyncio.ensure_future(self.held.renew_forever()),
            asyncio.ensure_future(self.writer.run()),
            asyncio.ensure_future(self.shutdown.cancel_after_grace(serving)),
        ]
        pruned_at = -PRUNE_SECONDS
        try:
            while not stop.is_set() and self.failure is None:
                if time.monotonic() - pruned_at >= PRUNE_SECONDS:
                    with contextlib.suppress(*CONNECTION_ERRORS):
                        await self.queue.prune_events()
                    pruned_at = time.monotonic()
                free = self.settings.relist_concurrency - len(serving)
                if free <= 0:  # every slot busy: wait for one
                    await asyncio.wait(set(serving), return_when=asyncio.FIRST_COMPLETED)
                    continue
                targets = await self._claim(free)
                for target in targets:
                    task = asyncio.create_task(self._serve_claimed(target))
                    serving.add(task)
                    task.add_done_callback(serving.discard)
                if len(targets) < free:
                    await self._wait_for_work()
            if serving:
                await asyncio.wait(set(serving))
        finally:
            for task in (*serving, *helpers):
                task.cancel()
            await asyncio.gather(*serving, *helpers, return_exceptions=True)
            with contextlib.suppress(*CONNECTION_ERRORS):
                await self.db.store.release_all(self.owner)
        if self.failure is not None:
            raise self.failure

    async def _claim(self, limit: int) -> list[Target]:
        token = new_claim_token(self.owner)
        tries = 0

        async def attempt() -> list[Target]:
            nonlocal tries
            tries += 1
            return await self.queue.claim_due(token, self.lease, limit, recover=tries > 1)

        targets = await self.db.call(attempt)
        for target in targets:
            self.held.add(target.token)
        return targets

    async def _wait_for_work(self) -> None:
        """Until a webhook is recorded here, a target is due, ``POLL_SECONDS`` or stop."""
        self.wake.clear()
        due_in = await self.db.call(self.queue.next_due_in)
        wait = POLL_SECONDS if due_in is None else min(POLL_SECONDS, due_in)
        if wait <= 0:
            return
        await first_set((self.wake, self.shutdown.stop, self._failed), wait)

    async def _serve_claimed(self, target: Target) -> None:
        try:
            with structlog.contextvars.bound_contextvars(service_sid=target.chat_service_sid):
                await self.serve(target)
        except (FatalError, DatabaseUnavailable) as error:
            # The re-lister stops (``run`` raises it): the daemon stops fatally, or starts it
            # again once the database is back. The target's lease expires meanwhile.
            self.failure = self.failure or error
            self._failed.set()
        except Exception:
            log.exception("relist_crashed")
            with contextlib.suppress(DatabaseUnavailable, *CONNECTION_ERRORS):
                await self._failed_before_listing(target, "internal error")
        finally:
            self.held.discard(target.token)

    async def serve(self, target: Target) -> None:
        """Re-list one target's user from page one and record how it went."""
        user_sid = await self._user_sid(target)
        if user_sid is None:
            return
        with structlog.contextvars.bound_contextvars(user_sid=user_sid):
            claim = await self.db.call(self.queue.claim_cursor, target, user_sid, self.lease)
            if claim is None:
                # A listing of this user is under way (a pass's, or a replica's re-list).
                self.metrics.inc("convsync_relists_total", outcome="busy")
                await self.db.call(self.queue.postpone, target, BUSY_RETRY_SECONDS)
                return
            listing = ConversationsListing(self.listings, claim, relist=True)
            await walk(listing, self.client.get_page, self.settings.max_pages, self.shutdown.stop)
            self.metrics.inc("convsync_relists_total", outcome=listing.outcome)
            if listing.outcome == "released":  # stopped or taken over: again, at once
                await self.db.call(self.queue.postpone, target, 0.0)
                return
            if listing.outcome == "failed" and target.attempts + 1 < MAX_ATTEMPTS:
                log.warning("relist_postponed", attempts=target.attempts + 1)
                await self.db.call(self.queue.postpone, target, FAILED_RETRY_SECONDS, failed=True)
                return
            delay = await self.db.call(self.queue.served, target)
            if delay is not None:
                self.metrics.observe("convsync_relist_delay_seconds", delay)
            log.info(
                "relist_done",
                outcome=listing.outcome,
                pages=listing.pages_written,
                delay_seconds=None if delay is None else round(delay, 3),
            )

    async def _failed_before_listing(self, target: Target, message: str) -> None:
        """A failure before any listing (the identity look-up, an internal error): tried again
        later, ``MAX_ATTEMPTS`` times at most as a failed listing is; then dropped, the user
        left to the next pass (which lists every user)."""
        if target.attempts + 1 >= MAX_ATTEMPTS:
            log.warning("relist_dropped", reason="failed too often", error=message)
            self.metrics.inc("convsync_relists_total", outcome="failed")
            await self.db.call(self.queue.drop, target)
            return
        log.warning("relist_postponed", error=message, attempts=target.attempts + 1)
        await self.db.call(self.queue.postpone, target, FAILED_RETRY_SECONDS, message, failed=True)

    async def _user_sid(self, target: Target) -> str | None:
        """The target's user SID: as named, or its identity resolved through Twilio (the
        user is then known to the mirror); None when it cannot be (the target dropped or
        postponed)."""
        if is_sid(target.user_ref, "US"):
            return target.user_ref
        path = (
            f"{api.service_path(target.chat_service_sid)}/Users/{quote(target.user_ref, safe='')}"
        )
        try:
            body = await self.client.get_json(path)
        except UserGone:
            log.info("relist_dropped", reason="no such identity")
            self.metrics.inc("convsync_relists_total", outcome="unknown_user")
            await self.db.call(self.queue.drop, target)
            return None
        except Interrupted:  # stopping while the look-up waited to retry: due again at once
            await self.db.call(self.queue.postpone, target, 0.0)
            return None
        except UserSyncError as error:
            await self._failed_before_listing(target, redact(str(error)))
            return None
        parsed = parse_users_page([body], target.chat_service_sid)
        if not parsed.rows:
            log.warning("relist_dropped", reason="the user's record cannot be stored")
            self.metrics.inc("convsync_relists_total", outcome="unknown_user")
            await self.db.call(self.queue.drop, target)
            return None
        # A fetch has is_online and is_notifiable, which a listing never has (null in every
        # Read, Twilio says): stored as the listings store them, the row does not flip between
        # a value and null at each pass, nor keep a stale snapshot no other user has.
        row = dataclasses.replace(parsed.rows[0], is_online=None, is_notifiable=None)
        await self.db.call(self.db.store.upsert_users, [row])
        return row.user_sid
