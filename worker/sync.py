"""One pass: discover services and users, list every user's conversations, record the outcome.

The pass reads top to bottom: ``SyncPass.run`` creates or resumes the ``sync_runs`` row,
discovers services, then runs discovery loops (users of each service, streamed page by page into
``sync_cursors``; the next page is fetched while one is saved) beside a feeder (claims pending
users in batches into a bounded queue, refilled by halves) and user loops (walk a user's pages
from its cursor; each page goes to the group-commit writer, ``worker/writer.py``, and the next
is fetched once it committed). Work is claimed through PostgreSQL, so replicas and restarts
share a pass.

Failure policy, in one place (``sync_user``): a user that is gone (404) is marked removed; a
rejected page token restarts that user's listing once; other per-user errors fail that user
only; fatal errors (credentials) stop the pass; a database that goes away, turns read-only or
is in recovery (a failover) is waited for, within a bound (``SyncPass.db``), and otherwise
stops the pass with every committed page kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ParamSpec, TypeVar

import asyncpg
import structlog

from worker import client as api
from worker.client import ListingGuard, TwilioClient
from worker.config import Settings
from worker.errors import (
    ConfigError,
    DatabaseUnavailable,
    FatalError,
    Interrupted,
    LeaseLost,
    PageRefused,
    PageTokenRejected,
    UserGone,
    UserSyncError,
)
from worker.logs import redact
from worker.metrics import Metrics
from worker.metrics import metrics as default_metrics
from worker.model import (
    ServiceRow,
    decode_conversations_page,
    parse_services_page,
    parse_users_page,
)
from worker.retry import Backoff, retrying
from worker.store import (
    DiscoveryClaim,
    PageWrite,
    PassSummary,
    Store,
    UserClaim,
    new_claim_token,
)
from worker.writer import PageWriter

log = structlog.get_logger(__name__)
T = TypeVar("T")
P = ParamSpec("P")

# A server that refuses writes: a demoted primary still in DNS, a standby in recovery. Pooled
# connections keep the read-only default of the session they opened with: they are dropped.
DB_READ_ONLY_ERRORS: tuple[type[BaseException], ...] = (asyncpg.ReadOnlySQLTransactionError,)
# Errors that mean "the database is not available (yet)", not "the statement is wrong".
DB_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    *DB_READ_ONLY_ERRORS,
    asyncpg.CrashShutdownError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    # What asyncpg raises on a pooled connection whose backend was terminated under it
    # ("cannot switch to state 15; another operation (2) is in progress", MagicStack/asyncpg
    # #784, #1069); the pool's reset then fails and the connection is dropped.
    asyncpg.InternalClientError,
)
# Errors that mean "PostgreSQL refused this page's values": that listing fails, not the pass.
PAGE_REFUSED_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
)
WRITERS = 2  # group-commit batches in flight at once
# Errors that end the pass, recorded as its error: fatal ones, and a services listing that
# could not be read or stored (nothing of the pass can go on without it).
PASS_ENDING_ERRORS: tuple[type[BaseException], ...] = (
    FatalError,
    UserSyncError,
    *PAGE_REFUSED_ERRORS,
)


def parse_owner(owner: str) -> tuple[str, str, int] | None:
    """(host, pid namespace, pid) of a default worker id; None for a configured one."""
    parts = owner.rsplit(":", 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _internal(error: BaseException) -> str:
    return redact(f"internal error: {type(error).__name__}: {error}")[:2000]


async def database_read_only(conn: asyncpg.Connection) -> bool:
    """True when the server on ``conn`` refuses writes (in recovery, or read-only)."""
    return bool(
        await conn.fetchval(
            "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only')::bool"
        )
    )


def _refused(path: str, error: BaseException) -> str:
    return f"{path.split('?', 1)[0]}: PostgreSQL refused the page: {type(error).__name__}: {error}"


@dataclass(frozen=True)
class Scope:
    """What a pass covers: some services (or all discovered), some users (or all listed)."""

    services: tuple[str, ...] = ()
    users: tuple[str, ...] = ()

    def as_json(self) -> dict[str, list[str] | None]:
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
    # Set once every users listing of the pass is closed: from then on, a user finished here
    # may be the pass's last, so it wakes the feeder at once (no polling interval at the end).
    discovery_closed: bool = False
    # Set by a user loop that took a claim from a queue at most half full: the feeder refills.
    hungry: asyncio.Event = field(default_factory=asyncio.Event)


class SyncPass:
    """Runs one pass to its end (or until ``stop`` is set) and returns its summary."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        client: TwilioClient,
        scope: Scope | None = None,
        *,
        stop: asyncio.Event | None = None,
        metrics: Metrics | None = None,
        db_wait_seconds: float | None = None,
        idle_poll_seconds: float = 0.5,
        tick: datetime | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        self.scope = scope or Scope(services=settings.services)
        self.stop = stop or asyncio.Event()
        self.metrics = metrics or default_metrics
        self.owner = settings.worker_id
        self.lease = settings.lease_seconds
        self.page_size = settings.page_size
        self.db_wait_seconds = (
            settings.db_wait_seconds if db_wait_seconds is None else db_wait_seconds
        )
        self.idle_poll_seconds = idle_poll_seconds
        self.tick = tick
        self.state = PassState()
        self.held: set[str] = set()  # claim tokens this process is working on
        self.writer = PageWriter(
            store,
            self.lease,
            run_store=self.db,
            refused=PAGE_REFUSED_ERRORS,
            max_pages=settings.batch_pages,
            max_wait=settings.batch_ms / 1000,
            metrics=self.metrics,
        )

    # --- the pass, top to bottom ----------------------------------------------------------

    async def release_dead_local_claims(self) -> None:
        """Free claims of earlier processes in this host's pid namespace that are dead (e.g.
        SIGKILLed, or a container restarted as the same pid), so a restart continues at once
        instead of waiting for their leases to expire."""
        mine = parse_owner(self.owner)
        if mine is None:
            return
        for owner in await self.db(self.store.claim_owners):
            theirs = parse_owner(owner)
            if theirs is None or owner == self.owner or theirs[:2] != mine[:2]:
                continue  # not provably in our pid namespace: its lease will tell
            if theirs[2] == mine[2] or not pid_alive(theirs[2]):
                log.info("dead_claims_released", owner=owner)
                await self.db(self.store.release_all, owner)

    async def run(self) -> PassSummary | None:
        """The pass's summary; None when its schedule tick was already served elsewhere."""
        info = await self.db(self.store.begin_or_resume_pass, self.scope.as_json(), self.tick)
        if info is None:
            log.info("tick_already_served", tick=self.tick.isoformat() if self.tick else None)
            return None
        self.state.run_id = info.run_id
        await self.release_dead_local_claims()
        with structlog.contextvars.bound_contextvars(run_id=info.run_id):
            started = time.monotonic()
            try:
                services = await self.discover_services()
                log.info("pass_started", resumed=info.resumed, services=len(services))
                if self.scope.users:
                    for service, users in (await self.services_of_users(services)).items():
                        await self.db(self.store.enqueue_users, info.run_id, service, users)
                else:
                    await self.db(self.store.open_discovery, info.run_id, services)
                await self.run_loops()
            except PASS_ENDING_ERRORS as error:
                await self.db(self.store.finish_pass, info.run_id, redact(str(error)))
                raise
            if self.stop.is_set():
                # Claims given back; 'interrupted' unless another replica still works the pass.
                recorded = await self.db(self.store.interrupt_pass, info.run_id, self.owner)
                log.info(
                    "pass_interrupted",
                    seconds=round(time.monotonic() - started, 3),
                    status="interrupted" if recorded else "running",
                )
                return await self.db(self.store.pass_summary, info.run_id)
            summary = await self.db(self.store.finish_pass, info.run_id)
            self.record(summary)
            log.info("pass_finished", **summary.__dict__)
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
            await self.db(self.store.quarantine, self.state.run_id, None, source, parsed.rejected)
        await self.db(self.store.upsert_services, rows)
        await self.db(self.store.ensure_services, kept)
        return [r.chat_service_sid for r in rows] + kept

    async def services_of_users(self, services: list[str]) -> dict[str, list[str]]:
        """Group ``--user`` SIDs by service: known from the database, or the only service."""
        known = await self.db(self.store.services_of_users, self.scope.users)
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
            asyncio.ensure_future(self.heartbeat()),
            asyncio.ensure_future(self.cancel_after_grace(tasks)),
        ]
        # Two batches in flight: one fills while the other commits.
        helpers += [asyncio.ensure_future(self.writer.run()) for _ in range(WRITERS)]
        try:
            # Fail fast: the first loop to raise cancels the rest.
            for finished in asyncio.as_completed(tasks):
                try:
                    await finished
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise  # the pass itself is cancelled, not one loop by the grace timer
        finally:
            for task in tasks + helpers:
                task.cancel()
            await asyncio.gather(*tasks, *helpers, return_exceptions=True)

    async def heartbeat(self) -> None:
        """Renew the leases this process holds, so a slow user (retries, a long listing) is
        never taken over while its worker lives; a dead worker's leases simply expire."""
        while True:
            await asyncio.sleep(self.lease / 3)
            with contextlib.suppress(*DB_CONNECTION_ERRORS):
                await self.store.renew_leases(sorted(self.held), self.lease)

    async def cancel_after_grace(self, tasks: Sequence[asyncio.Future[None]]) -> None:
        """After stop, in-flight pages get ``shutdown_grace`` seconds to commit; then the loops
        are cancelled (an uncommitted page is dropped, its cursor left where it was)."""
        await self.stop.wait()
        await asyncio.sleep(self.settings.shutdown_grace)
        log.warning("shutdown_grace_exceeded", grace_seconds=self.settings.shutdown_grace)
        for task in tasks:
            task.cancel()

    async def discovery_loop(self) -> None:
        """Claim service users listings until none is open (one held by a dead worker is
        taken over when its lease expires)."""
        while not self.stop.is_set():
            claim = await self.claim(self.store.claim_discovery)
            if claim is not None:
                with structlog.contextvars.bound_contextvars(service_sid=claim.chat_service_sid):
                    self.held.add(claim.token)
                    try:
                        await self.discover_users(claim)
                    except (FatalError, DatabaseUnavailable):
                        raise
                    except Exception as error:
                        # A bug must cost one users listing, not the pass.
                        log.exception("users_listing_crashed")
                        await self.db(self.store.fail_discovery, claim, _internal(error))
                    finally:
                        self.held.discard(claim.token)
                continue
            progress = await self.db(self.store.pass_progress, self.state.run_id)
            if not progress.discovery_open or not progress.running:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.idle_poll_seconds)

    async def discover_users(self, claim: DiscoveryClaim) -> None:
        """Walk one service's users listing from its cursor, queueing users page by page.

        A users listing needs no commit between its pages, so the next page is fetched while
        this one is saved (after a crash it is simply fetched again)."""
        first_page = api.users_path(claim.chat_service_sid, self.page_size)
        path = claim.next_page_path or first_page
        page_number = claim.pages
        restarted = False
        guard = ListingGuard(self.settings.max_pages, page_number)

        async def fetch(path: str) -> api.Page:
            guard.check(path)
            return await self.client.get_page(path, "users")

        ahead: asyncio.Future[api.Page] | None = None
        try:
            while not self.stop.is_set():
                fetching, ahead = ahead, None
                try:
                    page = await (fetching or fetch(path))
                except Interrupted:
                    return  # the claim is released with the others at the end of the pass
                except PageTokenRejected:
                    if restarted or page_number == 0:
                        raise
                    log.warning("users_page_token_rejected", pages=page_number)
                    if not await self.db(self.store.restart_discovery, claim, page_number):
                        return  # taken over meanwhile
                    path, page_number, restarted = first_page, 0, True
                    guard = ListingGuard(self.settings.max_pages)
                    continue
                except UserSyncError as error:
                    # Without its last page the listing proves nothing gone: nobody is marked.
                    message = redact(str(error))
                    log.error(
                        "users_listing_failed", error=message, error_kind=type(error).__name__
                    )
                    await self.db(self.store.fail_discovery, claim, message)
                    return
                if page.next_page_path is not None:
                    ahead = asyncio.ensure_future(fetch(page.next_page_path))
                parsed = parse_users_page(page.items, claim.chat_service_sid)
                try:
                    gone = await self.db(
                        self.store.save_users_page,
                        claim,
                        self.lease,
                        page_number,
                        page.path,
                        parsed.rows,
                        parsed.rejected,
                        page.next_page_path,
                    )
                except LeaseLost:
                    # Taken over, or our own page committed with its reply lost: give the claim
                    # back if it is still ours (then it is continued at once, not after its
                    # lease).
                    log.warning("discovery_taken_over")
                    await self.db(self.store.release_discovery, claim)
                    return
                except PAGE_REFUSED_ERRORS as error:
                    message = redact(_refused(page.path, error))
                    log.error("users_listing_failed", error=message, error_kind="PageRefused")
                    await self.db(self.store.fail_discovery, claim, message)
                    return
                self.metrics.inc("convsync_pages_total", kind="users")
                self.state.work_available.set()
                page_number += 1
                if page.next_page_path is None:
                    log.info("users_listed", pages=page_number, users_gone=gone)
                    return
                path = page.next_page_path
        finally:
            if ahead is not None:  # not needed after all: dropped, its outcome consumed
                ahead.cancel()
                ahead.add_done_callback(lambda done: done.cancelled() or done.exception())

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
            claims = await self.claim(functools.partial(self.store.claim_users, limit=room))
            for claim in claims:
                self.held.add(claim.token)  # renewed by the heartbeat while it waits
                queue.put_nowait(claim)  # only the feeder puts: there is room
            if claims:
                continue
            if await self.finished():
                break
            self.state.work_available.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.state.work_available.wait(), self.idle_poll_seconds)
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
            with structlog.contextvars.bound_contextvars(
                service_sid=claim.chat_service_sid, user_sid=claim.user_sid
            ):
                try:
                    await self.sync_user(claim)
                except (FatalError, DatabaseUnavailable):
                    raise
                except Exception as error:
                    # A bug must cost one user, not the pass (and not every later pass).
                    log.exception("user_crashed")
                    self.metrics.inc("convsync_users_total", outcome="failed")
                    await self.db(self.store.mark_user_failed, claim, _internal(error))
                finally:
                    self.held.discard(claim.token)
                    if self.state.discovery_closed:
                        self.state.work_available.set()

    async def finished(self) -> bool:
        """True once discovery is complete and no user of the pass is pending anywhere."""
        if self.state.done.is_set():
            return True
        progress = await self.db(self.store.pass_progress, self.state.run_id)
        self.state.discovery_closed = not progress.discovery_open
        if not progress.running or (not progress.discovery_open and not progress.users_pending):
            self.state.done.set()
            self.state.work_available.set()
            return True
        return False

    async def sync_user(self, claim: UserClaim) -> None:
        """List one user from its cursor to its last page; the failure policy lives here."""
        first_page = api.user_conversations_path(
            claim.chat_service_sid, claim.user_sid, self.page_size
        )
        path = claim.next_page_path or first_page
        page_number = claim.listing_pages
        restarted = False
        guard = ListingGuard(self.settings.max_pages, page_number)
        try:
            while True:
                if self.stop.is_set():
                    await self.db(self.store.release_user, claim)
                    return
                try:
                    guard.check(path)
                    page = await self.client.get_page(path, "conversations")
                except PageTokenRejected:
                    if restarted or page_number == 0:
                        raise
                    log.warning("page_token_rejected", listing_pages=page_number)
                    await self.db(self.store.restart_listing, claim)
                    path, page_number, restarted = first_page, 0, True
                    guard = ListingGuard(self.settings.max_pages)
                    continue
                parsed = decode_conversations_page(
                    page.body, page.items, claim.chat_service_sid, claim.user_sid
                )
                for rejected in parsed.rejected:
                    log.warning("item_quarantined", reason=rejected.reason, sid=rejected.sid)
                write = PageWrite(claim, page_number, path, parsed, page.next_page_path)
                try:
                    outcome = await self.writer.write(write)
                except PAGE_REFUSED_ERRORS as error:
                    raise PageRefused(_refused(path, error)) from error
                self.metrics.inc("convsync_pages_total", kind="conversations")
                for name in ("inserted", "updated", "unchanged", "removed", "quarantined"):
                    self.metrics.inc("convsync_rows_total", getattr(outcome, name), outcome=name)
                page_number += 1
                if outcome.removals_skipped:
                    log.warning("removals_skipped", reason="an item without a readable SID")
                if page.next_page_path is None:
                    self.metrics.inc("convsync_users_total", outcome="done")
                    log.debug("user_synced", pages=page_number)
                    return
                path = page.next_page_path
        except UserGone:
            log.info("user_gone")
            self.metrics.inc("convsync_users_total", outcome="gone")
            await self.db(self.store.mark_user_gone, claim)
        except LeaseLost:
            # Taken over, or our own page committed with its reply lost (the retry then finds
            # the cursor moved): give the claim back if it is still ours, so that the listing is
            # continued at once rather than after its lease.
            log.warning("user_taken_over")
            await self.db(self.store.release_user, claim)
        except Interrupted:
            log.info("user_interrupted", listing_pages=page_number)
            await self.db(self.store.release_user, claim)
        except UserSyncError as error:
            message = redact(str(error))
            log.error("user_failed", error=message, error_kind=type(error).__name__)
            self.metrics.inc("convsync_users_total", outcome="failed")
            await self.db(self.store.mark_user_failed, claim, message)

    # --- helpers --------------------------------------------------------------------------

    async def claim(self, operation: Callable[..., Awaitable[T]]) -> T:
        """Claim through ``operation`` with one token across database retries: a claim that
        committed with its reply lost is found again, not left leased to nobody."""
        token = new_claim_token(self.owner)
        tries = 0

        async def attempt() -> T:
            nonlocal tries
            tries += 1
            return await operation(
                self.state.run_id, self.owner, self.lease, token, recover=tries > 1
            )

        return await self.db(attempt)

    async def db(
        self, operation: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run one store operation (one transaction), waiting out a database that went away,
        turned read-only or is in recovery (a failover): not available yet, for at most
        ``db_wait_seconds``.

        A retried operation is safe: its transaction either committed or rolled back, and the
        page guards turn a replay of a committed page into LeaseLost, never a double write.
        """

        async def attempt() -> T:
            try:
                return await operation(*args, **kwargs)
            except asyncpg.ClientConfigurationError as error:
                raise ConfigError(f"DATABASE_URL is not usable: {redact(str(error))}") from None

        async def reconnect(error: BaseException) -> None:
            if isinstance(error, DB_READ_ONLY_ERRORS):
                # Reconnect (when each connection is next released): DNS may by now name the
                # new primary.
                await self.store.pool.expire_connections()

        def unavailable(error: BaseException, _attempts: int, _waited: float) -> BaseException:
            return DatabaseUnavailable(
                f"PostgreSQL unavailable (down, read-only or in recovery) for "
                f"{self.db_wait_seconds:.0f}s: {type(error).__name__}"
            )

        return await retrying(
            attempt,
            target="database",
            retry_on=DB_CONNECTION_ERRORS,
            backoff=Backoff(max_attempts=None, max_seconds=self.db_wait_seconds, base=0.1, cap=5),
            give_up=unavailable,
            metrics=self.metrics,
            before_retry=reconnect,
            level="warning",
        )

    def record(self, summary: PassSummary) -> None:
        self.metrics.inc("convsync_passes_total", status=summary.status)
        self.metrics.set("convsync_pass_duration_seconds", summary.seconds)
        if summary.status == "succeeded":
            self.metrics.set("convsync_last_success_timestamp_seconds", time.time())
