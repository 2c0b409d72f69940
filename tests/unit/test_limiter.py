"""AIMD concurrency limiter and token bucket: the arithmetic and the queueing."""

from __future__ import annotations

import asyncio

import pytest

from worker.limiter import AdaptiveLimiter, TokenBucket


class Ticks:
    """A clock that moves one tick per reading: every event has its own time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


async def fill(limiter: AdaptiveLimiter, n: int) -> list[float]:
    return [await limiter.acquire() for _ in range(n)]


async def test_a_429_cuts_by_the_decrease_factor() -> None:
    limiter = AdaptiveLimiter(maximum=32, decrease=0.5, clock=Ticks())
    (started,) = await fill(limiter, 1)
    limiter.release(started, overloaded=True)
    assert limiter.limit == 16
    assert AdaptiveLimiter(maximum=30).limit == 30
    default = AdaptiveLimiter(maximum=30, clock=Ticks())
    default.release(await default.acquire(), overloaded=True)
    assert default.limit == 27, "the default decrease is gentle: 0.9"


async def test_success_grows_one_per_window_only_while_the_window_is_used() -> None:
    limiter = AdaptiveLimiter(maximum=64, initial=16, clock=Ticks())
    for _ in range(16):  # one request at a time: the window of 16 is not in use
        limiter.release(await limiter.acquire())
    assert limiter.limit == 16
    for _ in range(2):  # two full windows in flight
        for started in await fill(limiter, limiter.limit):
            limiter.release(started)
    assert limiter.limit == 17


async def test_429s_of_requests_sent_before_a_cut_take_one_each() -> None:
    limiter = AdaptiveLimiter(maximum=32, decrease=0.5, clock=Ticks())
    old = await fill(limiter, 8)
    for started in old:
        limiter.release(started, overloaded=True)
    assert limiter.limit == 16 - 7, "one cut for the window, then one off per extra 429"
    assert limiter.decreases == 1
    (new,) = await fill(limiter, 1)  # sent after the cut: a new window, a new cut
    limiter.release(new, overloaded=True)
    assert limiter.limit == 4
    assert limiter.decreases == 2


async def test_far_above_the_ceiling_one_round_trip_converges() -> None:
    limiter = AdaptiveLimiter(maximum=32, clock=Ticks())
    sent = await fill(limiter, 32)
    for started in sent[8:]:  # a ceiling of 8: 24 answered 429
        limiter.release(started, overloaded=True)
    assert 5 <= limiter.limit <= 8


async def test_limit_stays_between_one_and_maximum() -> None:
    limiter = AdaptiveLimiter(maximum=4, clock=Ticks())
    for _ in range(50):
        for started in await fill(limiter, limiter.limit):
            limiter.release(started)
    assert limiter.limit == 4
    for _ in range(100):
        limiter.release(await limiter.acquire(), overloaded=True)
    assert limiter.limit == 1


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
    limiter.release(0.0, dropped=True)
    await asyncio.sleep(0)
    assert order == [0]
    limiter.release(0.0, dropped=True)
    limiter.release(0.0, dropped=True)
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
    limiter.release(0.0, dropped=True)
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


@pytest.mark.parametrize("cancel_first", [True, False])
async def test_a_waiter_cancelled_around_its_admission_leaves_no_trace(cancel_first: bool) -> None:
    limiter = AdaptiveLimiter(maximum=1)
    await limiter.acquire()
    task = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    if cancel_first:
        task.cancel()
        limiter.release(0.0, dropped=True)  # pops the already-cancelled waiter
    else:
        limiter.release(0.0, dropped=True)  # admits the waiter...
        task.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await task
    assert limiter.in_flight == 0
    await asyncio.wait_for(limiter.acquire(), 1)
