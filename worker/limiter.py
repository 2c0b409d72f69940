"""Flow control for requests to Twilio.

Twilio limits an account's *concurrent* requests and publishes no number, so the limit is
found at run time: ``AdaptiveLimiter`` learns the ceiling from the 429s (each says how many
requests were too many), holds just under it and looks above it rarely. ``TokenBucket`` is an
optional hard ceiling in requests per second.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable


class AdaptiveLimiter:
    """A concurrency limit between 1 and ``maximum`` that learns Twilio's ceiling from 429s.

    A 429 says the requests in flight when it came, itself included, were too many: the
    limit drops to one below that count at once. Twilio answers a 429 at once, while the
    requests it let in are still being served, so the count is the server's, whatever order
    the requests were sent in (a request sent first may arrive last, on a connection still
    being opened); as a burst's 429s come back, each cuts deeper, and the last leaves the
    limit at the ceiling: 24 rejections of 32 in flight at a ceiling of 8 bring it to 8 in one
    round trip, and with several replicas each settles on its share. Then it holds there,
    instead of cutting and regrowing a sawtooth: only after ``probe_every`` successes in a row
    (else ten times the limit) does it try one request more. A probe answered 429 costs that
    one request; a probe that passes raises the limit by one, so a ceiling that rose (a replica
    stopped, the account's limit raised) is found again. Probes that pass in a row come sooner
    each time (half the wait, down to one limit's worth of successes), so a limit far below the
    ceiling climbs back in a few round trips, while at the ceiling each probe is answered 429
    and the wait stays long. Requests whose outcome says nothing (``dropped``) move nothing.
    """

    def __init__(
        self,
        maximum: int,
        initial: int | None = None,
        *,
        probe_every: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.maximum = maximum
        self._limit = min(maximum, initial or maximum)
        self._probe_every = probe_every
        self._clock = clock
        self._in_flight = 0
        self._held = 0.0  # slot-seconds up to _counted_at (see slot_seconds)
        self._counted_at = clock()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._calm = 0  # successes since the last 429 or probe
        self._used = 0  # the most requests in flight at once since then
        self._streak = 0  # probes passed since the last 429
        self.peak_in_flight = 0
        self.decreases = 0  # times a 429 lowered the limit
        self.probes = 0  # times the limit was raised by one to look above it

    @property
    def limit(self) -> int:
        """Current number of requests allowed in flight."""
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def slot_seconds(self) -> float:
        """Seconds slots were held, summed over slots (the slots taken, integrated over time;
        a slot is taken before its request is sent and given back once its body is read): its
        growth over a span, divided by the span, is the average in flight by this limiter's
        count, to set beside what Twilio counted."""
        return self._held + self._in_flight * (self._clock() - self._counted_at)

    def _count(self, change: int) -> None:
        """Take (+1) or give back (-1) a slot, accounting the slot-seconds held until now."""
        now = self._clock()
        self._held += self._in_flight * (now - self._counted_at)
        self._counted_at = now
        self._in_flight += change

    async def acquire(self) -> None:
        """Wait until a request may start."""
        if self._in_flight < self._limit and not self._waiters:
            self._count(+1)
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
        self._used = max(self._used, self._in_flight)

    def release(self, *, overloaded: bool = False, dropped: bool = False) -> bool:
        """Return a slot: ``overloaded`` after a 429, ``dropped`` when the outcome says nothing.
        True when it let a waiting request in (that request starts when its task next runs)."""
        if overloaded:
            self._calm = self._used = self._streak = 0
            ceiling = max(1, self._in_flight - 1)
            if ceiling < self._limit:
                self._limit = ceiling
                self.decreases += 1
        elif not dropped:
            self._calm += 1
            every = self._probe_every or 10 * self._limit
            if self._calm >= max(every >> self._streak, min(every, self._limit)):
                if self._limit < self.maximum and self._used >= self._limit:
                    # Look above the ceiling only while the limit is in use: one nobody
                    # reaches would climb unchecked and then burst into 429s.
                    self._limit += 1
                    self.probes += 1
                    self._streak = min(self._streak + 1, 16)
                self._calm = self._used = 0
        return self._release_slot()

    def _release_slot(self) -> bool:
        """Give the slot back, and hand free slots to waiters: True if one was let in."""
        self._count(-1)
        admitted = False
        while self._waiters and self._in_flight < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._count(+1)
                waiter.set_result(None)
                admitted = True
        return admitted


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
