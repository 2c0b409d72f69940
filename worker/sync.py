"""One pass: discover services and users, list every user's conversations, record the outcome.

The pass reads top to bottom: ``SyncPass.run`` creates or resumes the ``sync_runs`` row,
discovers services, then runs discovery loops (each walks a service's users listing,
``UsersListing``, streamed page by page into ``sync_cursors``) beside a feeder (claims pending
users in batches into a bounded queue, refilled by halves) and user loops (each walks a user's
conversations listing, ``ConversationsListing``, whose pages go to the group-commit writer,
``worker/writer.py``). Work is claimed through PostgreSQL, so replicas and restarts share a pass.

What each failure costs is decided once, by the walker (``worker/listing.py``); store calls
wait out an unavailable database (``worker/database.py``); the claims held are renewed by
``worker/leases.py``; a stop gets its grace from ``worker/shutdown.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import structlog

from worker import client as api
from worker.client import ListingGuard, Page, TwilioClient
from worker.config import Settings
from worker.database import CONNECTION_ERRORS, VALUES_REFUSED_ERRORS, RetryingStore
from worker.errors import ConfigError, FatalError, Interrupted, UserGone, UserSyncError
from worker.leases import HeldClaims, release_dead_local_claims
from worker.listing import Listing, walk
from worker.logs import redact
from worker.loop import first_set
from worker.metrics import ROW_OUTCOMES, Metrics, Series
from worker.metrics import metrics as default_metrics
from worker.model import (
    ServiceRow,
    decode_conversations_page,
    decode_users_page,
    parse_services_page,
)
from worker.shutdown import Shutdown
from worker.store import (
    DiscoveryClaim,
    PageWrite,
    PassProgress,
    PassSummary,
    Store,
    UserClaim,
    new_claim_token,
)
from worker.writer import PageWriter

log = structlog.get_logger(__name__)
_stdlib_log = logging.getLogger(__name__)  # where ``log`` goes (worker/logs.py)
T = TypeVar("T")

# Errors that end the pass, recorded as its error: fatal ones, and a services listing that
# could not be read or stored (nothing of the pass can go on without it).
PASS_ENDING_ERRORS: tuple[type[BaseException], ...] = (
    FatalError,
    UserSyncError,
    *VALUES_REFUSED_ERRORS,
)


@dataclass(frozen=True)
class Scope:
    """What a pass covers: some services (or all discovered), some users (or all listed)."""

    services: tuple[str, ...] = ()
    users: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, list[str] | None]:
        """The scope as recorded with its pass (``sync_runs.scope``)."""
        return {
            "services": sorted(self.services) or None,
            "users": sorted(self.users) or None,
        }


@dataclass
class PassState:
    """In-process view of the pass, for the loops to coordinate."""

    run_id: int = 0
    work_available: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # Users listings walked here that ended, and an event set at each end: an idle discovery
    # loop looks again at once.
    listings_ended: int = 0
    listing_ended: asyncio.Event = field(default_factory=asyncio.Event)
    # Set by a user loop that took a claim from a queue at most half full: the feeder refills.
    hungry: asyncio.Event = field(default_factory=asyncio.Event)


class SyncPass:
    """Runs one pass to its end (or until its shutdown's stop) and returns its summary."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        client: TwilioClient,
        scope: Scope | None = None,
        *,
        shutdown: Shutdown | None = None,
        metrics: Metrics | None = None,
        db_wait_seconds: float | None = None,
        idle_poll_seconds: float = 0.5,
        tick: datetime | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.scope = scope or Scope(services=settings.services)
        self.shutdown = shutdown or Shutdown(settings.shutdown_grace)
        self.stop = self.shutdown.stop
        self.metrics = metrics or default_metrics
        self.owner = settings.worker_id
        self.lease = settings.lease_seconds
        self.page_size = settings.page_size
        wait = settings.db_wait_seconds if db_wait_seconds is None else db_wait_seconds
        self.db = RetryingStore(store, wait, self.metrics)
        self.store = store
        self.idle_poll_seconds = idle_poll_seconds
        self.tick = tick
        self.state = PassState()
        self.held = HeldClaims(self.db, self.lease)
        self.start_token: str | None = None  # its start of the pass, until it holds a claim
        self.writer = PageWriter(
            self.db,
            self.lease,
            max_pages=settings.batch_pages,
            max_wait=settings.batch_ms / 1000,
            async_commit=settings.async_commit,
        )
        self.listings = ListingContext(self.db, self.writer, self.metrics, self.page_size)

    # --- the pass, top to bottom ----------------------------------------------------------

    async def run(self) -> PassSummary | None:
        """The pass's summary; None when its schedule tick was already served elsewhere."""
        db = self.db
        # First: a pass a dead predecessor of this host was starting would stay busy until the
        # lease of its start ran out.
        await release_dead_local_claims(db, self.owner)
        # Until it holds a claim (a users listing, users), this worker has nothing live on the
        # pass: its start is leased instead (``end_start``), so that the pass is neither
        # superseded by a pass of another scope nor recorded interrupted by a stopping replica
        # while it lists the services (retried through an outage, that can take minutes).
        self.start_token = new_claim_token(self.owner)
        info = await db.call(
            self.store.begin_or_resume_pass,
            self.scope.to_dict(),
            self.tick,
            starter=self.start_token,
            lease_seconds=self.lease,
        )
        if info is None:
            log.info("tick_already_served", tick=self.tick.isoformat() if self.tick else None)
            return None
        self.state.run_id = info.run_id
        self.held.add(self.start_token)
        with structlog.contextvars.bound_contextvars(run_id=info.run_id):
            started, cpu = time.monotonic(), time.process_time()
            limiter = self.client.limiter
            # (The client may outlive passes: its limiter's counts are taken as differences.)
            decreases, probes, slots = limiter.decreases, limiter.probes, limiter.slot_seconds
            try:
                async with self.held.renewing():
                    try:
                        services = await self.discover_services()
                        log.info("pass_started", resumed=info.resumed, services=len(services))
                        if self.scope.users:
                            for service, users in (await self.services_of_users(services)).items():
                                await db.call(self.store.enqueue_users, info.run_id, service, users)
                        else:
                            await db.call(self.store.open_discovery, info.run_id, services)
                        await self.run_loops()
                    finally:
                        await self.end_start()
            except Interrupted:
                if not self.stop.is_set():
                    raise
                # Stopped while the services' or users' look-up waited to retry: interrupted.
            except PASS_ENDING_ERRORS as error:
                await db.call(self.store.finish_pass, info.run_id, redact(str(error)))
                raise
            if self.stop.is_set():
                # Claims given back; 'interrupted' unless another replica still works the pass.
                recorded = await db.call(self.store.interrupt_pass, info.run_id, self.owner)
                log.info(
                    "pass_interrupted",
                    seconds=round(time.monotonic() - started, 3),
                    status="interrupted" if recorded else "running",
                )
                return await db.call(self.store.pass_summary, info.run_id)
            summary = await db.call(self.store.finish_pass, info.run_id)
            if summary.status == "interrupted" and await self.resume_complete(info.run_id):
                summary = await db.call(self.store.finish_pass, info.run_id)
            self.record(summary)
            log.info(
                "pass_finished",
                **summary.__dict__,
                concurrency_limit=limiter.limit,  # where Twilio's 429s left it (worker/limiter.py)
                limit_decreases=limiter.decreases - decreases,
                limit_probes=limiter.probes - probes,
                # The client's limiter's slot-seconds during the pass (a daemon's re-lists,
                # sharing it, included); over the pass's seconds, the requests it kept in
                # flight on average by its own count (worker/limiter.py).
                limiter_slot_seconds=round(limiter.slot_seconds - slots, 3),
                # This process's group commit: busy near the pass's seconds, the writer was
                # the pass's bottleneck (worker/writer.py).
                writer_batches=self.writer.batches,
                writer_pages=self.writer.pages,
                writer_busy_seconds=round(self.writer.busy_seconds, 3),
                # This process's CPU over the pass, every thread's (a daemon's webhooks and
                # re-lists meanwhile included; a resumed pass's since this process took it up):
                # per page, what the pass cost the worker, start-up apart.
                cpu_seconds=round(time.process_time() - cpu, 3),
            )
            return summary

    async def discover_services(self) -> list[str]:
        """The services of this pass: the configured ones (fetched), or every listed one."""
        wanted = self.scope.services
        rows: list[ServiceRow] = []
        kept: list[str] = []  # services whose record was quarantined but whose SID is readable
        pages: list[tuple[str, list[Any]]] = []
        if wanted:
            for sid in wanted:
                try:
                    body = await self.client.get_json(api.service_path(sid))
                except UserGone:
                    raise ConfigError(f"service {sid} does not exist (CONVSYNC_SERVICES)") from None
                pages.append((api.service_path(sid), [body]))
        else:
            path: str | None = api.services_path(self.page_size)
            guard = ListingGuard(self.settings.max_pages)
            while path is not None:
                guard.check(path)
                page = await self.client.get_page(path, "services")
                pages.append((page.path, page.items))
                path = page.next_page_path
        for source, items in pages:
            parsed = parse_services_page(items)
            rows.extend(parsed.rows)
            for rejected in parsed.rejected:
                log.error("service_quarantined", reason=rejected.reason, sid=rejected.sid)
                if rejected.sid is not None:
                    kept.append(rejected.sid)
            await self.db.call(
                self.store.quarantine, self.state.run_id, None, source, parsed.rejected
            )
        await self.db.call(self.store.upsert_services, rows)
        await self.db.call(self.store.ensure_services, kept)
        return [r.chat_service_sid for r in rows] + kept

    async def services_of_users(self, services: list[str]) -> dict[str, list[str]]:
        """Group ``--user`` SIDs by service: known from the database, or the only service."""
        known = await self.db.call(self.store.services_of_users, self.scope.users)
        grouped: dict[str, list[str]] = {}
        for user in self.scope.users:
            service = known.get(user)
            if service is None and len(services) == 1:
                service = services[0]
            if service is None or service not in services:
                raise ConfigError(
                    f"--user {user}: its service is unknown here; name it with --service"
                )
            grouped.setdefault(service, []).append(user)
        return grouped

    async def run_loops(self) -> None:
        """Discovery loops and user loops until the pass's work is done (or stop is set)."""
        queue: asyncio.Queue[UserClaim | None] = asyncio.Queue(self.settings.concurrency)
        loops: list[Awaitable[None]] = [self.discovery_loop() for _ in range(2)]
        loops.append(self.feed_users(queue))
        loops += [self.user_loop(queue) for _ in range(self.settings.concurrency)]
        tasks = [asyncio.ensure_future(loop) for loop in loops]
        helpers = [
            asyncio.ensure_future(self.shutdown.cancel_after_grace(tasks)),
            # One writer: the next batch fills while one commits (worker/writer.py).
            asyncio.ensure_future(self.writer.run()),
        ]
        try:
            # Fail fast: the first loop to raise cancels the rest.
            for finished in asyncio.as_completed(tasks):
                try:
                    await finished
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise  # the pass itself is cancelled, not one loop after the grace
        finally:
            for task in tasks + helpers:
                task.cancel()
            await asyncio.gather(*tasks, *helpers, return_exceptions=True)

    async def discovery_loop(self) -> None:
        """Claim service users listings until none is open (one held by a dead worker is
        taken over when its lease expires)."""
        state = self.state
        while not self.stop.is_set():
            ended = state.listings_ended  # as this look begins
            claim = await self.claim(self.store.claim_discovery)
            if claim is not None:
                with structlog.contextvars.bound_contextvars(service_sid=claim.chat_service_sid):
                    self.held.add(claim.token)
                    try:
                        await self.walk(UsersListing(self, claim))
                    finally:
                        self.held.discard(claim.token)
                        state.listings_ended += 1
                        state.listing_ended.set()
                continue
            progress = await self.progress()
            if not progress.discovery_open or not progress.running:
                return
            if state.listings_ended == ended:
                # A listing another loop or replica holds, and none ended here since this look
                # began: wait for one to, or poll (one held by a dead worker is taken over
                # when its lease expires).
                state.listing_ended.clear()
                await first_set((self.stop, state.listing_ended), self.idle_poll_seconds)

    async def feed_users(self, queue: asyncio.Queue[UserClaim | None]) -> None:
        """Claim pending users in batches (one statement for up to a queue's worth) and hand
        them to the user loops; when the pass has no more work, tell each loop to stop."""
        while not self.stop.is_set():
            if queue.qsize() > queue.maxsize // 2:
                # Refill by halves: one claim statement per half a queue, not one per user.
                self.state.hungry.clear()
                await self.state.hungry.wait()
                continue
            room = queue.maxsize - queue.qsize()
            self.state.work_available.clear()  # before looking: work found meanwhile wakes it
            claims = await self.claim(functools.partial(self.store.claim_users, limit=room))
            for claim in claims:
                self.held.add(claim.token)  # renewed while it waits
                queue.put_nowait(claim)  # only the feeder puts: there is room
            if claims:
                continue
            if await self.finished():
                break
            # Users pending elsewhere (another replica's, or being discovered): wait for work,
            # a stop (the user loops wait for this loop's word to end), or the next poll.
            await first_set((self.stop, self.state.work_available), self.idle_poll_seconds)
        for _ in range(self.settings.concurrency):
            await queue.put(None)

    async def user_loop(self, queue: asyncio.Queue[UserClaim | None]) -> None:
        """List the users the feeder hands over, one at a time."""
        while (claim := await queue.get()) is not None:
            if queue.qsize() <= queue.maxsize // 2:
                self.state.hungry.set()
            if self.stop.is_set():  # released with every claim of this worker at the end
                self.held.discard(claim.token)
                continue
            # Bound and reset by token: a third of what bound_contextvars costs, once a user.
            tokens = structlog.contextvars.bind_contextvars(
                service_sid=claim.chat_service_sid, user_sid=claim.user_sid
            )
            try:
                await self.walk(ConversationsListing(self.listings, claim))
            finally:
                self.held.discard(claim.token)
                # The feeder, if it waits for work, looks again: this user may have been
                # the pass's last (no polling interval at the end).
                self.state.work_available.set()
                structlog.contextvars.reset_contextvars(**tokens)

    async def finished(self) -> bool:
        """True once discovery is complete and no user of the pass is pending anywhere."""
        if self.state.done.is_set():
            return True
        progress = await self.progress()
        if not progress.running or (not progress.discovery_open and not progress.users_pending):
            self.state.done.set()
            self.state.work_available.set()
            return True
        return False

    async def resume_complete(self, run_id: int) -> bool:
        """Set the pass running again if a replica stopping after this worker found it complete
        (it saw no claim live) recorded it interrupted meanwhile, so that it is recorded
        finished now, not by the next tick with nothing to do; False if it is not complete."""
        progress = await self.db.call(self.store.pass_progress, run_id)
        if progress.discovery_open or progress.users_pending:
            return False
        resumed = await self.db.call(self.store.resume_pass, run_id)
        if resumed:
            log.info("pass_resumed", reason="another worker stopped as this one finished it")
        return resumed

    async def progress(self) -> PassProgress:
        """The pass's progress. A pass another worker recorded interrupted (stopping, it found
        no claim live: this one was between claims) while this one is still on it is resumed:
        this worker goes on with what is left, or records the pass done when nothing is,
        rather than leave it to the next tick."""
        progress = await self.db.call(self.store.pass_progress, self.state.run_id)
        if progress.interrupted and not self.stop.is_set():
            if await self.db.call(self.store.resume_pass, self.state.run_id):
                log.info("pass_resumed", reason="another worker stopped; this one goes on")
            progress = await self.db.call(self.store.pass_progress, self.state.run_id)
        return progress

    # --- helpers --------------------------------------------------------------------------

    async def walk(self, listing: Listing) -> None:
        """Walk one claimed listing to its end (``worker.listing`` holds the failure policy)."""
        await walk(listing, self.client.get_page, self.settings.max_pages, self.stop)

    async def claim(self, operation: Callable[..., Awaitable[T]]) -> T:
        """Claim through ``operation`` with one token across database retries: a claim that
        committed with its reply lost is found again, not left leased to nobody. The first
        claim held ends this worker's start (it keeps the pass busy from then on)."""
        token = new_claim_token(self.owner)
        tries = 0

        async def attempt() -> T:
            nonlocal tries
            tries += 1
            return await operation(
                self.state.run_id, self.owner, self.lease, token, recover=tries > 1
            )

        claimed = await self.db.call(attempt)
        if claimed and self.start_token is not None:
            await self.end_start()
        return claimed

    async def end_start(self) -> None:
        """Give back this worker's start of the pass (``run``): it holds a claim, or leaves the
        pass. Best effort: a start the database did not delete lapses within its lease."""
        start, self.start_token = self.start_token, None
        if start is None:
            return
        self.held.discard(start)
        with contextlib.suppress(*CONNECTION_ERRORS, asyncpg.PostgresError):
            await self.store.end_pass_start(self.state.run_id, start)

    def record(self, summary: PassSummary) -> None:
        self.metrics.inc("convsync_passes_total", status=summary.status)
        self.metrics.set("convsync_pass_duration_seconds", summary.seconds)
        if summary.status == "succeeded":
            self.metrics.set("convsync_last_success_timestamp_seconds", time.time())


class UsersListing(Listing):
    """A service's users listing: each page queues its users for the pass. It needs no commit
    between its pages, so the next page is fetched while one is saved (after a crash it is
    simply fetched again)."""

    kind = "users"
    prefetch = True

    def __init__(self, sync: SyncPass, claim: DiscoveryClaim) -> None:
        first = api.users_path(claim.chat_service_sid, sync.page_size)
        super().__init__(first, claim.next_page_path, claim.pages)
        self.sync, self.claim = sync, claim
        self.users_gone = 0

    async def save(self, page: Page) -> None:
        sync = self.sync
        parsed = decode_users_page(page.body, page.items, self.claim.chat_service_sid)
        self.users_gone = await sync.db.call(
            sync.store.save_users_page,
            self.claim,
            sync.lease,
            self.pages_written,
            page.path,
            parsed.rows,
            parsed.rejected,
            page.next_page_path,
        )
        sync.metrics.inc("convsync_pages_total", kind="users")
        sync.state.work_available.set()

    async def restart(self) -> bool:
        store = self.sync.store
        return await self.sync.db.call(store.restart_discovery, self.claim, self.pages_written)

    async def release(self) -> None:
        await self.sync.db.call(self.sync.store.release_discovery, self.claim)

    async def fail(self, message: str, *, restart: bool = False) -> None:
        # Without its last page the listing proves nothing gone: nobody is marked. (The next
        # pass lists users from page one whatever ``restart`` says.)
        await self.sync.db.call(self.sync.store.fail_discovery, self.claim, message)

    async def done(self) -> None:
        log.info("users_listed", pages=self.pages_written, users_gone=self.users_gone)


@dataclass(frozen=True)
class ListingContext:
    """What a conversations listing needs (a pass's, or a targeted re-list's)."""

    db: RetryingStore
    writer: PageWriter
    metrics: Metrics
    page_size: int

    @property
    def store(self) -> Store:
        return self.db.store

    @functools.cached_property
    def pages_total(self) -> Series:
        """convsync_pages_total of conversations pages."""
        return self.metrics.series("convsync_pages_total", kind="conversations")

    @functools.cached_property
    def rows_total(self) -> tuple[tuple[str, Series], ...]:
        """convsync_rows_total: each outcome a page's rows are counted by, with its series."""
        return tuple(
            (outcome, self.metrics.series("convsync_rows_total", outcome=outcome))
            for outcome in ROW_OUTCOMES
        )


class ConversationsListing(Listing):
    """A user's conversations listing: each page goes to the group-commit writer, and the next
    is fetched only once it committed (so a crash refetches at most the pages in flight).
    ``outcome`` says how it ended: done, failed, gone, or released (to be continued)."""

    kind = "conversations"
    prefetch = False

    def __init__(self, sync: ListingContext, claim: UserClaim, *, relist: bool = False) -> None:
        first = api.user_conversations_path(claim.chat_service_sid, claim.user_sid, sync.page_size)
        super().__init__(first, claim.next_page_path, claim.listing_pages)
        self.sync, self.claim = sync, claim
        self.relist = relist  # a webhook's re-list, outside any pass: its failure is its own
        self.outcome = "released"

    async def save(self, page: Page) -> None:
        claim, sync = self.claim, self.sync
        parsed = decode_conversations_page(
            page.body, page.items, claim.chat_service_sid, claim.user_sid
        )
        for rejected in parsed.rejected:
            log.warning("item_quarantined", reason=rejected.reason, sid=rejected.sid)
        write = PageWrite(
            claim, self.pages_written, page.path, parsed, page.next_page_path, not self.relist
        )
        outcome = await sync.writer.write(write)
        sync.pages_total.inc()
        for name, series in sync.rows_total:
            if rows := getattr(outcome, name):
                series.inc(rows)
        if outcome.removals_skipped:
            log.warning("removals_skipped", reason="an item without a readable SID")

    async def restart(self) -> bool:
        await self.sync.db.call(self.sync.store.restart_listing, self.claim)
        return True

    async def release(self) -> None:
        await self.sync.db.call(self.sync.store.release_user, self.claim)

    async def fail(self, message: str, *, restart: bool = False) -> None:
        self.outcome = "failed"
        self.sync.metrics.inc("convsync_users_total", outcome="failed")
        store = self.sync.store
        if self.relist:
            await self.sync.db.call(store.relist_failed, self.claim, message)
            return
        await self.sync.db.call(store.mark_user_failed, self.claim, message, restart=restart)

    async def gone(self, message: str) -> None:
        self.outcome = "gone"
        self.sync.metrics.inc("convsync_users_total", outcome="gone")
        await self.sync.db.call(self.sync.store.mark_user_gone, self.claim)

    async def done(self) -> None:
        self.outcome = "done"
        self.sync.metrics.inc("convsync_users_total", outcome="done")
        if _stdlib_log.isEnabledFor(logging.DEBUG):  # once a user: skip structlog's chain
            log.debug("user_synced", pages=self.pages_written)
