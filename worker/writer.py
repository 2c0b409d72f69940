"""Group commit: the pages of many users' listings, written a batch per transaction.

User loops hand their pages to one ``PageWriter`` and wait for their page's outcome before
fetching the next one, so a listing still advances one committed page at a time. The writer
takes whatever pages are waiting (up to ``max_pages``, after lingering at most ``max_wait``
seconds for a batch to fill) and writes them with one statement (``Store.save_pages``): one
round trip and one commit for the batch, each page still guarded by its own claim and page
number. One batch is written at a time, on a pooled connection the writer keeps while batches
follow each other (in a pool big enough to lend it: ``PinnedConnection``); the pages that come
meanwhile make the next batch. (Two writers side by side cost more than they hid: smaller
batches, two backends competing for the cores with the worker and each other's rows.) A stale
page is answered ``LeaseLost`` alone; a page whose values PostgreSQL refuses is isolated by
halving the batch, so it never costs the other pages.

A conversation is shared by its members, so most pages list conversations another user's page
already brought. The writer remembers the ``date_updated`` it committed for the conversations
it wrote lately (between ``KNOWN_CONVERSATIONS`` / 2 and ``KNOWN_CONVERSATIONS`` of them, in two
generations: the older one is dropped whole when the newer fills), and leaves a page's
conversation out of its statement when the page has that same version: the row is already
stored at least as new (it only ever moves forward), and its upsert would cost a row lock and a
comparison for nothing. What it remembers holds only while no connection was opened since
(``Store.connections_opened``): batches commit asynchronously by default, and the server crash
or failover that could lose one also ends every connection of the pool, so the first batch
after it, on a new connection, finds the count moved and forgets before it leaves anything out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import datetime
from typing import cast

import asyncpg

from worker.database import (
    IDLE_CONNECTION_SECONDS,
    VALUES_REFUSED_ERRORS,
    PinnedConnection,
    RetryingStore,
)
from worker.errors import LeaseLost
from worker.store import PageOutcome, PageWrite

KNOWN_CONVERSATIONS = 32_768  # ~8 MB: a bounded memory, whatever the size of the pass


class PageWriter:
    """Writes pages handed over by ``write`` in batches, while ``run`` runs (in one task: it
    holds one pooled connection while batches follow each other)."""

    def __init__(
        self,
        db: RetryingStore,
        lease_seconds: float,
        *,
        max_pages: int,  # CONVSYNC_BATCH_PAGES (its default is the settings')
        max_wait: float = 0.0,
        known_conversations: int = KNOWN_CONVERSATIONS,
        idle_seconds: float = IDLE_CONNECTION_SECONDS,
        async_commit: bool = False,
        role: str = "pass",  # its metrics' label: a pass's writer, or the re-lister's
    ) -> None:
        self._db = db
        self._lease = lease_seconds
        self.max_pages = max_pages
        self.max_wait = max_wait
        self.async_commit = async_commit
        self._idle_seconds = idle_seconds
        self._commit_seconds = db.metrics.histogram("convsync_page_commit_seconds")
        self._busy_total = db.metrics.series("convsync_writer_busy_seconds_total", writer=role)
        self._queue: asyncio.Queue[tuple[PageWrite, asyncio.Future[PageOutcome]]] = asyncio.Queue()
        self._carried: list[tuple[PageWrite, asyncio.Future[PageOutcome]]] = []
        self._full = asyncio.Event()
        self._room = max_pages  # pages the batch being filled still takes
        # SID -> date_updated written: this generation, and the one before it
        self._known: dict[str, datetime] = {}
        self._older: dict[str, datetime] = {}
        self._generation = known_conversations // 2  # 0: remember none
        self._opened = db.store.connections_opened  # the pool's count the memory holds for
        self.batches = 0  # batch statements that ran (a refused one, halved, is not counted)
        self.pages = 0  # pages committed (a stale page, answered LeaseLost, is not)
        # Seconds held by batches: their statements, waits for a connection, retries.
        self.busy_seconds = 0.0

    async def write(self, write: PageWrite) -> PageOutcome:
        """Queue a page and wait until it is committed (or refused: the refusal is raised)."""
        done: asyncio.Future[PageOutcome] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((write, done))
        if self._queue.qsize() >= self._room:
            self._full.set()
        return await done

    async def run(self) -> None:
        """Write batches until cancelled, on a connection kept while batches follow each other.
        A batch that fails (the database away past its wait, a statement cancelled) fails its
        pages' writers, and the next batch is written."""
        connection = PinnedConnection(self._db.store.pool, self._idle_seconds)
        try:
            while True:
                batch = await self._next_batch()
                try:
                    await self._commit(batch, connection)
                except asyncio.CancelledError:
                    for _, done in batch:
                        done.cancel()
                    raise
                except Exception as error:
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(error)
        finally:
            await connection.release()

    async def _next_batch(self) -> list[tuple[PageWrite, asyncio.Future[PageOutcome]]]:
        """The waiting pages, at most ``max_pages`` and one per claim (a second page of a
        user waits for the next batch, so that its first is committed before)."""
        pending = self._carried
        self._carried = []
        if not pending:
            pending = [await self._queue.get()]
        self._room = self.max_pages - len(pending)
        if self.max_wait > 0 and self._queue.qsize() < self._room:
            self._full.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self.max_wait)
        while len(pending) < self.max_pages and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        batch: list[tuple[PageWrite, asyncio.Future[PageOutcome]]] = []
        claims: set[str] = set()
        for entry in pending:
            token = entry[0].claim.token
            if entry[1].done():
                continue  # its loop was cancelled: nobody waits for it
            if token in claims:
                self._carried.append(entry)
            else:
                claims.add(token)
                batch.append(entry)
        # Cursors locked in one order, (service, user) as a users page queues them: a batch and
        # a discovery re-queuing its users never wait on each other's rows in a cycle.
        batch.sort(key=lambda entry: (entry[0].claim.chat_service_sid, entry[0].claim.user_sid))
        return batch

    async def _commit(
        self,
        batch: list[tuple[PageWrite, asyncio.Future[PageOutcome]]],
        connection: PinnedConnection,
    ) -> None:
        if not batch:
            return
        writes = [write for write, _ in batch]
        store = self._db.store

        async def save(conn: asyncpg.Connection) -> tuple[list[PageOutcome | None], int]:
            # On the connection it runs on (a new one is counted by now), each attempt.
            opened = store.connections_opened
            if opened != self._opened:
                self._forget(opened)
            outcomes = await store.save_pages(
                writes,
                self._lease,
                self._conversations_to_write(writes),
                conn=conn,
                async_commit=self.async_commit,
            )
            return outcomes, opened

        began = time.perf_counter()
        try:
            try:
                outcomes, opened = await self._db.call(connection.run, save)
            finally:  # refused, failed or cancelled, the writer was held all the same
                took = time.perf_counter() - began
                self.busy_seconds += took
                self._busy_total.inc(took)
        except VALUES_REFUSED_ERRORS as error:
            if len(batch) == 1:
                if not batch[0][1].done():
                    batch[0][1].set_exception(error)
                return
            half = len(batch) // 2
            await self._commit(batch[:half], connection)
            await self._commit(batch[half:], connection)
            return
        self.batches += 1
        self.pages += sum(outcome is not None for outcome in outcomes)

        remember = opened == self._opened  # no connection opened since it ran
        for (write, done), outcome in zip(batch, outcomes, strict=True):
            if outcome is not None:
                if remember:
                    self._remember(write)
                self._commit_seconds.observe(took)
            if done.done():
                continue
            if outcome is None:
                done.set_exception(
                    LeaseLost(f"user {write.claim.user_sid} was taken over or its cursor moved")
                )
            else:
                done.set_result(outcome)

    def _conversations_to_write(self, writes: list[PageWrite]) -> list[list[int]]:
        """Per page, the items whose conversation the batch writes: all but those committed
        at the same ``date_updated`` already, unless the batch has an undated version of it
        too (that one alone would overwrite the row; beside it, the dated one wins)."""
        known, older = self._known, self._older
        pages = [w.page for w in writes]
        undated = {
            sid
            for p in pages
            if None in p.updated
            for sid, updated in zip(p.sids, p.updated, strict=True)
            if updated is None
        }
        return [
            [
                index
                for index, (sid, updated) in enumerate(zip(p.sids, p.updated, strict=True))
                if updated is None
                or (known.get(sid) or older.get(sid)) != updated
                or sid in undated
            ]
            for p in pages
        ]

    def _forget(self, opened: int) -> None:
        """A connection was opened since: what was committed may have been lost with a server."""
        self._known, self._older = {}, {}
        self._opened = opened

    def _remember(self, write: PageWrite) -> None:
        """The page committed: its conversations are stored at least as new as it has them."""
        if not self._generation:
            return
        updated = write.page.updated
        if None in updated:  # an undated version overwrites any: nothing to skip for it
            for sid, version in zip(write.page.sids, updated, strict=True):
                if version is None:
                    self._known.pop(sid, None)
                    self._older.pop(sid, None)
                else:
                    self._known[sid] = version
        else:
            dated = cast(list[datetime], updated)  # no None, as just checked
            self._known.update(zip(write.page.sids, dated, strict=True))
        if len(self._known) >= self._generation:
            self._older, self._known = self._known, {}
