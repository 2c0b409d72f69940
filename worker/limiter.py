"""Flow control for requests to Twilio.

Twilio limits an account's *concurrent* requests and publishes no number, so the limit is
found at run time: ``AdaptiveLimiter`` is AIMD over concurrency (like TCP's congestion window),
halving on a 429 and growing by one request per window of successes. ``TokenBucket`` is an
optional hard ceiling in requests per second.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable


class AdaptiveLimiter:
    """A concurrency limit between 1 and ``maximum`` that adapts to 429s (AIMD)."""

    def __init__(self, maximum: int, initial: int | None = None, decrease: float = 0.5) -> None:
        self.maximum = maximum
        self._limit = float(min(maximum, initial or maximum))
        self._decrease = decrease
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._last_decrease = 0.0
        self.peak_in_flight = 0
        self.decreases = 0

    @property
    def limit(self) -> int:
        """Current number of requests allowed in flight."""
        return max(1, int(self._limit))

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def acquire(self) -> None:
        """Wait until a request may start."""
        if self._in_flight < self.limit and not self._waiters:
            self._in_flight += 1
        else:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter  # the releaser counted us in
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release_slot()
                else:
                    self._waiters.remove(waiter)
                raise
        self.peak_in_flight = max(self.peak_in_flight, self._in_flight)

    def release(self, *, overloaded: bool = False, dropped: bool = False) -> None:
        """Return a slot: ``overloaded`` after a 429, ``dropped`` when the outcome says nothing."""
        if overloaded:
            self._on_overload()
        elif not dropped:
            # Additive increase: +1 per window of `limit` successes.
            self._limit = min(float(self.maximum), self._limit + 1.0 / self._limit)
        self._release_slot()

    def _on_overload(self) -> None:
        # One decrease per round trip of in-flight requests: the 429s of requests that were
        # already in flight when we cut describe the old limit, not the new one.
        now = time.monotonic()
        if now - self._last_decrease < 0.05:
            return
        self._last_decrease = now
        self._limit = max(1.0, self._limit * self._decrease)
        self.decreases += 1

    def _release_slot(self) -> None:
        self._in_flight -= 1
        while self._waiters and self._in_flight < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._in_flight += 1
                waiter.set_result(None)


class TokenBucket:
    """At most ``rate`` acquisitions per second on average, bursts up to ``burst``."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.capacity
        self._updated = clock()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait for one token."""
        async with self._lock:
            while True:
                now = self._clock()
                self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
                self._updated = now
                if self._tokens >= 1.0 - 1e-9:  # rounding must not leave a token unspent
                    self._tokens = max(0.0, self._tokens - 1.0)
                    return
                await self._sleep((1.0 - self._tokens) / self.rate)
