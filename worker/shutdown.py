"""The one shutdown path: a stop, a grace for work in flight, a window to record, a backstop.

``stop`` is set by SIGTERM or SIGINT (``worker.signals``) or by a fatal error. From then on:

1. work in flight (a page being fetched or committed) has ``grace`` seconds
   (CONVSYNC_SHUTDOWN_GRACE) to finish: ``grace_over`` returns when they are up, and a pass
   cancels its loops then (an uncommitted page is dropped, its cursor left where it was);
2. the pass then has ``RECORD_SECONDS`` to record itself and give its claims back
   (``wait_for`` cancels it past that);
3. ``BACKSTOP_SECONDS`` later the signal handler cancels the command itself, which then closes
   what it holds: the HTTP server (``HTTP_CLOSE_SECONDS`` for requests in flight) and the
   database pool (``RECORD_SECONDS``). ``exit_seconds`` bounds the whole: a container's stop
   grace (Kubernetes' terminationGracePeriodSeconds, compose's stop_grace_period) must exceed it.

One timer, started when stop is first seen, serves every waiter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import structlog

log = structlog.get_logger(__name__)
RECORD_SECONDS = 5.0  # after the grace: for a stopped pass to record itself, release claims
BACKSTOP_SECONDS = 5.0  # after that: the command is cancelled
HTTP_CLOSE_SECONDS = 2.0  # then `convsync run`'s HTTP server: its requests in flight, at most


class Shutdown:
    """A command's stop event and its grace (see the module docstring)."""

    def __init__(self, grace: float, stop: asyncio.Event | None = None) -> None:
        self.grace = grace
        self.stop = stop or asyncio.Event()
        self._timer: asyncio.Future[None] | None = None

    @property
    def backstop_seconds(self) -> float:
        """Seconds after the stop at which the command itself is cancelled."""
        return self.grace + RECORD_SECONDS + BACKSTOP_SECONDS

    @property
    def exit_seconds(self) -> float:
        """Seconds after the stop by which any command has exited: the backstop, then its HTTP
        server and its database pool closed."""
        return self.backstop_seconds + HTTP_CLOSE_SECONDS + RECORD_SECONDS

    async def grace_over(self) -> None:
        """Return once ``grace`` seconds have passed since stop was set."""
        await self.stop.wait()
        if self._timer is None:
            self._timer = asyncio.ensure_future(self._count_down())
        await asyncio.shield(self._timer)

    async def _count_down(self) -> None:
        await asyncio.sleep(self.grace)
        log.warning("shutdown_grace_exceeded", grace_seconds=self.grace)

    async def cancel_after_grace(self, tasks: Iterable[asyncio.Future[Any]]) -> None:
        """Cancel ``tasks`` when the grace is over."""
        await self.grace_over()
        for task in tasks:
            task.cancel()

    async def wait_for(self, task: asyncio.Future[Any]) -> None:
        """Wait for ``task`` to end by itself: through the grace, then ``RECORD_SECONDS``;
        past that it is cancelled (and waited for ``RECORD_SECONDS`` more)."""
        if task.done():
            return
        grace = asyncio.ensure_future(self.grace_over())
        try:
            await asyncio.wait({task, grace}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            grace.cancel()
        if task.done():
            return
        done, _ = await asyncio.wait({task}, timeout=RECORD_SECONDS)
        if not done:
            log.warning("shutdown_record_exceeded", record_seconds=RECORD_SECONDS)
            task.cancel()
            await asyncio.wait({task}, timeout=RECORD_SECONDS)
