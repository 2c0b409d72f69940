"""Which database errors are passing, how the runtime waits them out, and how a busy caller
keeps its connection.

A database that goes away, turns read-only or is in recovery (a failover) is "not available
yet": ``RetryingStore`` re-runs a store operation through ``worker.retry`` until it answers,
for at most ``CONVSYNC_DB_WAIT_SECONDS``, then raises DatabaseUnavailable. An error that means
"PostgreSQL refused these values" is no such thing: it fails the page's listing, not the pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import asyncpg
import structlog

from worker.errors import ConfigError, DatabaseUnavailable
from worker.logs import redact
from worker.metrics import Metrics
from worker.retry import Backoff, retrying
from worker.shutdown import RECORD_SECONDS
from worker.store import Store

log = structlog.get_logger(__name__)
T = TypeVar("T")
P = ParamSpec("P")

# A pinned connection idle this long goes back to the pool (``PinnedConnection``).
IDLE_CONNECTION_SECONDS = 5.0
# The smallest pool whose connections are pinned: up to two callers keep one (a pass's writer
# and the daemon's re-lister's), and a pass's other callers need up to three at once beside
# them (its two discovery loops' users pages, the feeder's claims, lease renewals). A smaller
# pool lends each connection call by call, or the others would wait for a writer.
PIN_FROM_POOL_SIZE = 5

# A server that refuses writes: a demoted primary still in DNS, a standby in recovery. Pooled
# connections keep the read-only default of the session they opened with: they are dropped.
READ_ONLY_ERRORS: tuple[type[BaseException], ...] = (asyncpg.ReadOnlySQLTransactionError,)
# Errors that mean "the database is not available (yet)", not "the statement is wrong".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    *READ_ONLY_ERRORS,
    asyncpg.CrashShutdownError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    # What asyncpg raises on a pooled connection whose backend was terminated under it
    # ("cannot switch to state 15; another operation (2) is in progress", MagicStack/asyncpg
    # #784, #1069); the pool's reset then fails and the connection is dropped.
    asyncpg.InternalClientError,
)
# Anything the database, or the way to it, can answer with: what code that must outlive the
# database catches (a readiness probe, the progress line, claims given back, a wait for it).
DATABASE_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)
# Errors that mean "PostgreSQL refused this page's values": that listing fails, not the pass.
VALUES_REFUSED_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
)
# The database answered but refused us: as wrong as a bad setting, and retrying will not help.
LOGIN_REFUSED_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
)


async def database_read_only(conn: asyncpg.Connection) -> bool:
    """True when the server on ``conn`` refuses writes (in recovery, or read-only)."""
    return bool(
        await conn.fetchval(
            "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only')::bool"
        )
    )


class RetryingStore:
    """Calls store operations, each one transaction, waiting out an unavailable database.

    A retried operation is safe: its transaction either committed or rolled back, and the page
    guards turn a replay of a committed page into LeaseLost, never a double write.
    """

    def __init__(self, store: Store, wait_seconds: float, metrics: Metrics) -> None:
        self.store = store
        self.wait_seconds = wait_seconds
        self.metrics = metrics

    async def call(
        self, operation: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """``operation(*args, **kwargs)``, retried while the database is unavailable, for at
        most ``wait_seconds`` (then DatabaseUnavailable)."""

        async def attempt() -> T:
            try:
                return await operation(*args, **kwargs)
            except asyncpg.ClientConfigurationError as error:
                raise ConfigError(f"DATABASE_URL is not usable: {redact(str(error))}") from None

        async def reconnect(error: BaseException) -> None:
            if isinstance(error, READ_ONLY_ERRORS):
                # Reconnect (when each connection is next released): DNS may by now name the
                # new primary.
                await self.store.pool.expire_connections()

        def unavailable(error: BaseException, _attempts: int, _waited: float) -> BaseException:
            return DatabaseUnavailable(
                f"PostgreSQL unavailable (down, read-only or in recovery) for "
                f"{self.wait_seconds:.0f}s: {type(error).__name__}"
            )

        return await retrying(
            attempt,
            target="database",
            retry_on=CONNECTION_ERRORS,
            backoff=Backoff(max_attempts=None, max_seconds=self.wait_seconds, base=0.1, cap=5),
            give_up=unavailable,
            metrics=self.metrics,
            before_retry=reconnect,
            level="warning",
        )


class PinnedConnection:
    """One pooled connection kept from call to call, for a caller that makes many in a row (a
    page writer): handing a connection back is a task and a turn of the event loop, which every
    page of the batch would wait for. Given back after any failure (a broken or expired
    connection is replaced on the next call), after ``idle_seconds`` without a call, and by
    ``release``; in a pool smaller than ``PIN_FROM_POOL_SIZE``, after every call. Not for
    concurrent calls: one per task."""

    def __init__(self, pool: asyncpg.Pool, idle_seconds: float = IDLE_CONNECTION_SECONDS) -> None:
        self._pool = pool
        self._idle_seconds = idle_seconds
        self._keep = pool.get_max_size() >= PIN_FROM_POOL_SIZE
        self._conn: asyncpg.Connection | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._releasing: set[asyncio.Task[None]] = set()

    async def run(self, operation: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``operation(connection)`` on the kept connection (acquired first if none is)."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._conn is None:
            self._conn = await self._pool.acquire()
        try:
            result = await operation(self._conn)
        except BaseException:
            await self.release()
            raise
        if self._keep:
            self._idle_timer = asyncio.get_running_loop().call_later(
                self._idle_seconds, self._release_idle
            )
        else:
            await self.release()
        return result

    async def release(self) -> None:
        """Give the connection back to the pool now (and wait for one given back idle)."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._pool.release(conn)
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)

    def _release_idle(self) -> None:
        self._idle_timer = None
        conn, self._conn = self._conn, None
        if conn is not None:
            task = asyncio.ensure_future(self._pool.release(conn))
            self._releasing.add(task)
            task.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releasing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # asyncpg terminates a connection it could not reset: nothing is lost.
            log.debug("idle_connection_release_failed", error=type(task.exception()).__name__)


async def close_store(store: Store, at_once: bool = False) -> None:
    """Close the pool; a database that does not answer (or ``at_once``) gets its connections
    cut instead of waited for."""
    if not at_once:
        try:
            async with asyncio.timeout(RECORD_SECONDS):
                await store.close()
            return
        except TimeoutError:
            log.warning("database_close_timeout")
    store.pool.terminate()
