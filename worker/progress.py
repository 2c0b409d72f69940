"""The live progress line a person at a terminal sees during a pass (``convsync sync``, ``demo``).

On a TTY (stderr), one line redrawn in place twice a second::

    12.4 s  users 120/400+  pages 356  rows 9120  41.8 pages/s  ETA 0:07  429s 3  limit 14/16

Users done are those this process finished (listed to the end, failed or gone); known adds
those still pending in the pass (``+`` while a users listing is still open); pages and rows are
this process's; pages/s and the ETA (pending users at the recent rate) are over the last few
seconds; 429s and the concurrency limit come from the client (its limiter and metrics). The
database is asked at most once a second, two cheap statements (``Store.pending_users``, on a
partial index, and ``Store.pass_progress``). Log lines still show: each clears the line, is
written, and the line comes back under it. The last frame stays when the pass ends. Off a TTY
there is no line: logs stay JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TextIO

from worker.database import DATABASE_ERRORS
from worker.limiter import AdaptiveLimiter
from worker.metrics import Metrics
from worker.metrics import metrics as default_metrics
from worker.store import Store

REDRAW_SECONDS = 0.5
ASK_DATABASE_SECONDS = 1.0
RATE_WINDOW_SECONDS = 5.0
CLEAR = "\r\x1b[K"


@dataclass(frozen=True)
class Frame:
    """What one redraw shows."""

    seconds: float
    users_done: int
    users_known: int
    discovering: bool
    pages: int
    rows: int
    pages_per_second: float
    eta_seconds: float | None
    rate_limited: int
    limit: int
    maximum: int


def render(frame: Frame) -> str:
    """The progress line of ``frame``."""
    more = "+" if frame.discovering else ""
    eta = "?" if frame.eta_seconds is None else _clock(frame.eta_seconds)
    return (
        f"{frame.seconds:.1f} s  users {frame.users_done}/{frame.users_known}{more}  "
        f"pages {frame.pages}  rows {frame.rows}  {frame.pages_per_second:.1f} pages/s  "
        f"ETA {eta}  429s {frame.rate_limited}  limit {frame.limit}/{frame.maximum}"
    )


def _clock(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressLine:
    """Draws the line for the pass whose id ``run_id()`` gives (None until it has begun)."""

    def __init__(
        self,
        store: Store,
        limiter: AdaptiveLimiter,
        run_id: Callable[[], int | None],
        stream: TextIO,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.limiter = limiter
        self.run_id = run_id
        self.stream = stream
        self.metrics = metrics or default_metrics
        self.text = ""  # the line as last drawn
        self._started = time.monotonic()
        self._rate_limited_before = self.metrics.value("convsync_rate_limited_total")
        self._asked_at = -ASK_DATABASE_SECONDS
        self._known = 0  # users done + pending, as of the last database answer
        self._discovering = True
        self._history: deque[tuple[float, int, int]] = deque()  # (when, users done, pages)

    def frame(self, now: float) -> Frame:
        """The frame at ``now`` from the metrics, the limiter and the last database answer."""
        users = int(self.metrics.total("convsync_users_total"))
        pages = int(self.metrics.value("convsync_pages_total", kind="conversations"))
        history = self._history
        history.append((now, users, pages))
        while len(history) > 2 and now - history[1][0] >= RATE_WINDOW_SECONDS:
            history.popleft()
        since, users_then, pages_then = history[0]
        span = now - since
        users_rate = (users - users_then) / span if span > 0 else 0.0
        known = max(self._known, users)
        eta = None if self._discovering or users_rate <= 0 else (known - users) / users_rate
        return Frame(
            seconds=now - self._started,
            users_done=users,
            users_known=known,
            discovering=self._discovering,
            pages=pages,
            rows=int(self.metrics.total("convsync_rows_total")),
            pages_per_second=(pages - pages_then) / span if span > 0 else 0.0,
            eta_seconds=0.0 if not self._discovering and known == users else eta,
            rate_limited=int(self.metrics.value("convsync_rate_limited_total")
                             - self._rate_limited_before),
            limit=self.limiter.limit,
            maximum=self.limiter.maximum,
        )  # fmt: skip

    async def _ask_database(self, run_id: int) -> None:
        try:
            self._discovering = (await self.store.pass_progress(run_id)).discovery_open
            # Users done are read before the count: one finishing meanwhile is counted in
            # neither, never in both; known never shrinks, so the next quiet answer is exact.
            done = int(self.metrics.total("convsync_users_total"))
            self._known = max(self._known, done + await self.store.pending_users(run_id))
        except DATABASE_ERRORS:
            pass  # the pass rides out the database by its own policy; keep the last answer

    async def run(self) -> None:
        """Redraw until cancelled."""
        while True:
            run_id = self.run_id()
            now = time.monotonic()
            if run_id:
                if now - self._asked_at >= ASK_DATABASE_SECONDS:
                    self._asked_at = now
                    await self._ask_database(run_id)
                self.draw(render(self.frame(time.monotonic())))
            await asyncio.sleep(REDRAW_SECONDS)

    def draw(self, text: str) -> None:
        """Replace the line with ``text`` (cut to the terminal's width: a wrapped line could
        not be redrawn in place)."""
        self.text = text[: _columns(self.stream) - 1]
        self.stream.write(CLEAR + self.text)
        self.stream.flush()

    def finish(self) -> None:
        """Leave the last frame (if the pass had begun) on a line of its own."""
        if self.text:
            self.draw(render(self.frame(time.monotonic())))
            self.stream.write("\n")
            self.stream.flush()
        self.text = ""


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return 100


class _AboveTheLine:
    """The log handlers' stream while the line is shown: a log line clears it, is written, and
    the line is drawn again under it."""

    def __init__(self, line: ProgressLine) -> None:
        self._line = line
        self._stream = line.stream

    def write(self, text: str) -> int:
        again = self._line.text if text.endswith("\n") else ""
        self._stream.write(CLEAR + text + again)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()


@contextlib.contextmanager
def _logs_above(line: ProgressLine) -> Iterator[None]:
    handlers = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and h.stream is line.stream
    ]
    for handler in handlers:
        handler.setStream(_AboveTheLine(line))
    try:
        yield
    finally:
        for handler in handlers:
            handler.setStream(line.stream)


@contextlib.asynccontextmanager
async def shown(
    store: Store,
    limiter: AdaptiveLimiter,
    run_id: Callable[[], int | None],
    stream: TextIO,
    metrics: Metrics | None = None,
) -> AsyncIterator[ProgressLine | None]:
    """The progress line while the block runs, when ``stream`` is a TTY (else nothing)."""
    if not stream.isatty():
        yield None
        return
    line = ProgressLine(store, limiter, run_id, stream, metrics)
    task = asyncio.create_task(line.run())
    try:
        with _logs_above(line):
            yield line
    finally:
        task.cancel()
        try:
            await asyncio.wait({task})
            if not task.cancelled():
                task.exception()  # the line is the pass's window, not its work: let it go quietly
        finally:
            line.finish()
