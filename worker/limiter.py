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
    """A concurrency limit between 1 and ``maximum`` that adapts to 429s (AIMD).

    On a 429 the limit is multiplied by ``decrease``, once per window (a request sent after the
    last cut); a 429 answering a request sent before that cut was one request too many under
    the old limit and takes one off. Far above the ceiling this converges in one round trip
    (24 rejections of 32 in flight take the limit to about 8), and with several replicas the
    total reduction equals the total overshoot. On a success the limit grows by ``1/limit``
    (one per window), only while the window is in use. ``decrease`` = 0.9 keeps the sawtooth
    within 10% of the ceiling: about one overshoot per cycle, few 429s, little idle capacity.
    """

    def __init__(
        self,
        maximum: int,
        initial: int | None = None,
        decrease: float = 0.9,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.maximum = maximum
        self._limit = float(min(maximum, initial or maximum))
        self._decrease = decrease
        self._clock = clock
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._last_decrease = float("-inf")
        self.peak_in_flight = 0
        self.decreases = 0

    @property
    def limit(self) -> int:
        """Current number of requests allowed in flight."""
        return max(1, int(self._limit))

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def acquire(self) -> float:
        """Wait until a request may start; returns its start time, for ``release``."""
        if self._in_flight < self.limit and not self._waiters:
            self._in_flight += 1
        else:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter  # the releaser counted us in
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release_slot()  # admitted before the cancellation landed
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
        self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        return self._clock()

    def release(self, started: float, *, overloaded: bool = False, dropped: bool = False) -> None:
        """Return a slot: ``overloaded`` after a 429, ``dropped`` when the outcome says nothing."""
        if overloaded:
            self._on_overload(started)
        elif not dropped and 2 * self._in_flight >= self.limit:
            # Additive increase, +1 per window of `limit` successes, only while the window is
            # used: a limit nobody reaches would grow unchecked and then burst into 429s.
            self._limit = min(float(self.maximum), self._limit + 1.0 / self._limit)
        self._release_slot()

    def _on_overload(self, started: float) -> None:
        if started <= self._last_decrease:
            self._limit = max(1.0, self._limit - 1.0)  # one too many under the old limit
            return
        self._last_decrease = self._clock()
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
