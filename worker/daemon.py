"""``convsync run``, the daemon: scheduled passes, /healthz /readyz /metrics, graceful shutdown.

The scheduler only ticks; PostgreSQL decides who works (a pass is created once per tick, users
are leased), so any number of replicas can run this against one database.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from aiohttp import web
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobExecutionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from worker.client import TwilioClient
from worker.config import Settings
from worker.database import (
    DATABASE_ERRORS,
    LOGIN_REFUSED_ERRORS,
    RetryingStore,
    close_store,
    database_read_only,
)
from worker.errors import ConfigError, ConvsyncError, DatabaseUnavailable, FatalError
from worker.metrics import metrics
from worker.migrate import pending_migrations
from worker.relist import Relister
from worker.shutdown import HTTP_CLOSE_SECONDS, RECORD_SECONDS, Shutdown
from worker.store import Store
from worker.sync import Scope, SyncPass
from worker.targets import TargetQueue
from worker.webhooks import PATH as WEBHOOK_PATH
from worker.webhooks import Event, Recorded, WebhookReceiver

log = structlog.get_logger(__name__)
# What stops a pass for this tick alone (transient, or the pass's own): the next one continues.
PASS_TROUBLE: tuple[type[BaseException], ...] = (ConvsyncError, *DATABASE_ERRORS)
DEFAULT_INTERVAL = 3600.0
DATABASE_POLL_SECONDS = 1.0  # after a pass lost to the database: how often to ask if it is back
RELISTER_RESTART_SECONDS = 5.0  # after the re-lister stopped on an error
WEBHOOK_DB_WAIT_SECONDS = 3.0  # then 503: Twilio retries (it waits 15 s for an answer)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def build_trigger(settings: Settings) -> CronTrigger | IntervalTrigger:
    """Cron (CONVSYNC_SCHEDULE) or an interval aligned to the epoch, so replicas tick together."""
    if settings.schedule:
        try:
            return CronTrigger.from_crontab(settings.schedule, timezone=UTC)
        except ValueError as error:
            raise ConfigError(f"CONVSYNC_SCHEDULE is not a cron expression: {error}") from None
    seconds = settings.interval or DEFAULT_INTERVAL
    return IntervalTrigger(seconds=seconds, start_date=EPOCH, timezone=UTC)


def current_tick(settings: Settings, now: datetime | None = None) -> datetime:
    """The schedule tick ``now`` belongs to: the same on every replica."""
    now = now or datetime.now(UTC)
    if settings.schedule:
        return now.replace(second=0, microsecond=0)
    seconds = settings.interval or DEFAULT_INTERVAL
    elapsed = (now - EPOCH).total_seconds()
    return EPOCH + timedelta(seconds=elapsed - elapsed % seconds)


class Daemon:
    """The long-running worker (``convsync run``): one pass at a time, stopped cleanly by
    SIGTERM along ``worker.shutdown``'s path."""

    def __init__(
        self, settings: Settings, store: Store, client: TwilioClient, shutdown: Shutdown
    ) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        self.shutdown = shutdown
        self.stop = shutdown.stop
        self.fatal: FatalError | None = None
        self._pass_task: asyncio.Task[Any] | None = None
        self._started = time.time()
        self.relister: Relister | None = None
        self.receiver: WebhookReceiver | None = None
        self._webhook_db = RetryingStore(store, WEBHOOK_DB_WAIT_SECONDS, metrics)
        if settings.webhooks:
            self._targets = TargetQueue(store.pool)
            self.relister = Relister(settings, store, client, shutdown, metrics)
            self.receiver = WebhookReceiver(
                settings.require_webhook_key(),
                settings.webhook_url,
                self._record_webhook,
                metrics,
                services=settings.services,
                on_recorded=self.relister.wake.set,
            )
        self._relister_task: asyncio.Task[None] | None = None

    async def _record_webhook(self, event: Event | None, key: str) -> Recorded:
        """Record a webhook, waiting out a database that is briefly away (a read-only answer
        drops the pooled sessions, as in a pass) for at most ``WEBHOOK_DB_WAIT_SECONDS``."""
        return await self._webhook_db.call(
            self._targets.record, event, key, self.settings.webhook_coalesce_seconds
        )

    def start_relister(self) -> None:
        """Serve webhooks' targeted re-lists beside the schedule (CONVSYNC_WEBHOOKS)."""
        if self.relister is not None and self._relister_task is None:
            self._relister_task = asyncio.create_task(self._run_relister(self.relister))

    async def _run_relister(self, relister: Relister) -> None:
        """The re-lister until stop; started again after an error that stopped it (a database
        away past its wait, a bug), so targets recorded meanwhile are served once it can."""
        while not self.stop.is_set():
            try:
                await relister.run()
            except FatalError as error:
                self._stop_fatally(error)
                return
            except DatabaseUnavailable as error:
                log.error("relister_stopped", error=str(error), error_kind=type(error).__name__)
            except Exception:
                log.exception("relister_crashed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), RELISTER_RESTART_SECONDS)

    async def tick(self) -> None:
        """A schedule tick: start a pass in a task the daemon owns, and return.

        APScheduler only starts the pass: its shutdown cancels running jobs, and a pass must
        instead get its grace (``Shutdown.wait_for``). A tick while a pass runs is skipped."""
        if self._pass_task is not None and not self._pass_task.done():
            log.warning("tick_skipped", reason="a pass is still running")
            return
        if self.stop.is_set():
            return
        self._pass_task = asyncio.create_task(self._run_pass(current_tick(self.settings)))

    async def _run_pass(self, tick: datetime) -> None:
        """One pass; its errors are logged (a lost pass is continued by a later tick, or at
        once when it stopped for a database that accepts writes again)."""
        while await self._one_pass(tick):
            pass

    async def _one_pass(self, tick: datetime) -> bool:
        """Run the pass; True when it stopped for the database and should go on now."""
        sync = SyncPass(
            self.settings,
            self.store,
            self.client,
            Scope(services=self.settings.services),
            shutdown=self.shutdown,
            tick=tick,
        )
        try:
            await sync.run()
        except LOGIN_REFUSED_ERRORS as error:
            self._stop_fatally(ConfigError(f"DATABASE_URL was refused: {type(error).__name__}"))
        except FatalError as error:
            self._stop_fatally(error)
        except DatabaseUnavailable as error:
            log.error("pass_stopped", error=str(error), error_kind=type(error).__name__)
            if await self._database_back():
                log.info("pass_continued", reason="the database accepts writes again")
                await self._release_claims()
                return True
        except PASS_TROUBLE as error:
            # Transient or per-pass trouble: this tick is lost, the next one continues.
            log.error("pass_stopped", error=str(error), error_kind=type(error).__name__)
            await self._release_claims()
        except Exception:
            log.exception("pass_crashed")
            await self._release_claims()
        return False

    async def _database_back(self) -> bool:
        """Wait until the database accepts writes (True), or shutdown or a refused login (False;
        the latter stops the service, as in a pass). Every poll asks a new connection: one
        opened before a failover keeps its session's read-only default. Whatever else refuses
        a poll meanwhile (connections not allowed yet, a privilege), the next one asks again."""
        refused = ""  # the kind of error the polls last met: said once, not at every poll
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), DATABASE_POLL_SECONDS)
            try:
                await self.store.pool.expire_connections()
                async with asyncio.timeout(5), self.store.pool.acquire() as conn:
                    if not self.stop.is_set() and not await database_read_only(conn):
                        return True
            except LOGIN_REFUSED_ERRORS as error:
                self._stop_fatally(ConfigError(f"DATABASE_URL was refused: {type(error).__name__}"))
                return False
            except DATABASE_ERRORS as error:
                if type(error).__name__ != refused:
                    refused = type(error).__name__
                    log.warning("database_not_back", error_kind=refused)
        return False

    def _stop_fatally(self, error: FatalError) -> None:
        log.error("pass_fatal", error=str(error))
        self.fatal = error
        self.stop.set()

    async def wait_for_pass(self) -> None:
        """Let the running pass and re-lists commit their in-flight pages and record
        themselves."""
        running = [t for t in (self._pass_task, self._relister_task) if t is not None]
        await asyncio.gather(*(self.shutdown.wait_for(task) for task in running))

    async def _release_claims(self) -> None:
        try:
            async with asyncio.timeout(RECORD_SECONDS):
                await self.store.release_all(self.settings.worker_id)
        except DATABASE_ERRORS as error:
            log.warning("claims_not_released", error=type(error).__name__)

    # --- HTTP -----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        metrics.registry  # noqa: B018  # prometheus_client imported now, not in the first scrape
        if self.receiver is not None:
            app.router.add_post(WEBHOOK_PATH, self.receiver.handle)
        return app

    async def healthz(self, _request: web.Request) -> web.Response:
        """The event loop answers: the process is alive."""
        return web.json_response(
            {"status": "ok", "uptime_seconds": round(time.time() - self._started)}
        )

    async def readyz(self, _request: web.Request) -> web.Response:
        """Ready when the database answers, accepts writes and every migration is applied."""
        try:
            async with asyncio.timeout(3):
                async with self.store.pool.acquire() as conn:
                    missing = await pending_migrations(conn)
                    read_only = await database_read_only(conn)
        except DATABASE_ERRORS as error:
            return web.json_response(
                {"status": "database unavailable", "error": type(error).__name__}, status=503
            )
        if read_only:
            await self.store.pool.expire_connections()  # the next probe asks a new session
            return web.json_response({"status": "database read-only"}, status=503)
        if missing:
            return web.json_response(
                {"status": "migrations pending", "pending": missing}, status=503
            )
        return web.json_response({"status": "ready"})

    async def metrics(self, request: web.Request) -> web.Response:
        """prometheus_client's exposition: OpenMetrics when the scraper asks for it."""
        metrics.set("convsync_concurrency_limit", self.client.limiter.limit)
        metrics.set("convsync_requests_in_flight", self.client.limiter.in_flight)
        body, content_type = metrics.render(request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})


async def run_daemon(settings: Settings, shutdown: Shutdown) -> int:
    """Run until stopped (SIGTERM/SIGINT); exit 0 after a clean stop, 2 on a fatal error."""
    trigger = build_trigger(settings)
    dsn = settings.require_database()
    settings.require_credentials()
    if settings.webhooks:
        settings.require_webhook_key()
    store = await Store.connect(dsn, settings.db_pool_size, lazy=True)
    try:
        async with TwilioClient(settings, stop=shutdown.stop) as client:
            daemon = Daemon(settings, store, client, shutdown)
            return await _serve(daemon, trigger)
    finally:
        await close_store(store)


async def _serve(daemon: Daemon, trigger: CronTrigger | IntervalTrigger) -> int:
    settings = daemon.settings
    # aiohttp closes a connection idle this long, including one whose request headers are not
    # complete by then (the header read timeout).
    runner = web.AppRunner(
        daemon.app(),
        access_log=None,
        keepalive_timeout=settings.http_header_timeout,
        shutdown_timeout=HTTP_CLOSE_SECONDS,  # aiohttp's own is 60 s: past any stop grace
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port)
    await site.start()
    log.info(
        "service_started",
        host=settings.http_host,
        port=runner.addresses[0][1],  # the port bound: CONVSYNC_HTTP_PORT=0 takes a free one
        trigger=str(trigger),
        webhooks=settings.webhooks,
    )
    daemon.start_relister()

    scheduler = AsyncIOScheduler(timezone=UTC)

    def on_skipped(event: JobExecutionEvent) -> None:
        log.warning("tick_skipped", reason="a pass is still running")

    scheduler.add_listener(on_skipped, EVENT_JOB_MAX_INSTANCES)
    # No next_run_time: the first tick is the trigger's own (an interval is aligned to the
    # epoch, so replicas tick together); the run at start is a tick of its own.
    scheduler.add_job(
        daemon.tick, trigger, id="pass", max_instances=1, coalesce=True, misfire_grace_time=None
    )
    scheduler.start()
    try:
        if settings.run_at_start:
            await daemon.tick()
        await daemon.stop.wait()
        log.info("shutdown_started", grace_seconds=settings.shutdown_grace)
        scheduler.shutdown(wait=False)  # cancels no pass: the daemon owns it
        await daemon.wait_for_pass()
        await daemon._release_claims()
    finally:
        await runner.cleanup()
    if daemon.fatal is not None:
        raise daemon.fatal
    log.info("shutdown_complete")
    return 0
