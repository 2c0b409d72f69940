"""AIMD concurrency limiter and token bucket: the arithmetic and the queueing."""

from __future__ import annotations

import asyncio

import pytest

from worker.limiter import AdaptiveLimiter, TokenBucket


async def test_overload_halves_and_success_grows_back_by_one_per_window() -> None:
    limiter = AdaptiveLimiter(maximum=32)
    await limiter.acquire()
    limiter.release(overloaded=True)
    assert limiter.limit == 16
    for _ in range(16):  # one window of successes at limit 16 adds (almost) one
        await limiter.acquire()
        limiter.release()
    assert limiter.limit == 16
    assert limiter._limit > 16.9
    await limiter.acquire()
    limiter.release()
    assert limiter.limit == 17


async def test_limit_stays_between_one_and_maximum() -> None:
    limiter = AdaptiveLimiter(maximum=4)
    for _ in range(100):
        await limiter.acquire()
        limiter.release()
    assert limiter.limit == 4
    for _ in range(20):
        limiter._last_decrease = 0.0  # each cut in its own round trip
        await limiter.acquire()
        limiter.release(overloaded=True)
    assert limiter.limit == 1


async def test_a_burst_of_429s_from_one_round_trip_cuts_once() -> None:
    limiter = AdaptiveLimiter(maximum=32)
    for _ in range(8):
        await limiter.acquire()
    for _ in range(8):
        limiter.release(overloaded=True)
    assert limiter.limit == 16
    assert limiter.decreases == 1


async def test_waiters_are_admitted_in_order_up_to_the_limit() -> None:
    limiter = AdaptiveLimiter(maximum=2)
    await limiter.acquire()
    await limiter.acquire()
    order: list[int] = []

    async def waiter(n: int) -> None:
        await limiter.acquire()
        order.append(n)

    tasks = [asyncio.create_task(waiter(n)) for n in range(3)]
    await asyncio.sleep(0)
    assert order == []
    assert limiter.in_flight == 2
    limiter.release()
    await asyncio.sleep(0)
    assert order == [0]
    limiter.release()
    limiter.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert limiter.in_flight == 2
    assert limiter.peak_in_flight == 2


async def test_a_cancelled_waiter_gives_its_slot_back() -> None:
    limiter = AdaptiveLimiter(maximum=1)
    await limiter.acquire()
    task = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    limiter.release()
    assert limiter.in_flight == 0
    await asyncio.wait_for(limiter.acquire(), 1)
    assert limiter.in_flight == 1


class FakeClock:
    """Time that moves only when the bucket sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


async def test_token_bucket_allows_a_burst_then_holds_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock, sleep=clock.sleep)
    for _ in range(5):
        await bucket.acquire()
    assert clock.now == 0.0, "the burst needs no wait"
    for _ in range(20):
        await bucket.acquire()
    assert clock.now == pytest.approx(2.0), "20 more at 10/s take 2 s"


async def test_token_bucket_refills_while_idle_up_to_its_capacity() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2, burst=2, clock=clock, sleep=clock.sleep)
    await bucket.acquire()
    await bucket.acquire()
    clock.now += 100  # idle: refills to capacity, not to 200 tokens
    for _ in range(3):
        await bucket.acquire()
    assert clock.now == pytest.approx(100.5)
