"""The ceiling-learning concurrency limiter and the token bucket: arithmetic and queueing."""

from __future__ import annotations

import asyncio

import pytest

from worker.limiter import AdaptiveLimiter, TokenBucket


async def fill(limiter: AdaptiveLimiter, n: int) -> None:
    for _ in range(n):
        await limiter.acquire()


async def test_a_429_drops_the_limit_just_below_the_requests_in_flight_when_it_came() -> None:
    limiter = AdaptiveLimiter(maximum=32)
    assert limiter.limit == 32
    await fill(limiter, 20)
    limiter.release(overloaded=True)  # 20 in flight were one too many
    assert limiter.limit == 19
    assert limiter.decreases == 1
    limiter.release(overloaded=True)  # 19 too: lower still
    assert limiter.limit == 18
    limiter.release()
    limiter.release()
    assert limiter.in_flight == 16
    await fill(limiter, 2)
    limiter.release(overloaded=True)  # 18 in flight again: one too many
    assert limiter.limit == 17
    assert limiter.decreases == 3


async def test_a_request_sent_first_but_answered_429_last_does_not_cut_below_the_ceiling() -> None:
    """The first of 64, on a connection still being opened, reaches a server holding 32 of
    the others: its 429 comes while they are in flight, whatever its place in the burst."""
    limiter = AdaptiveLimiter(maximum=64)
    await fill(limiter, 64)
    for _ in range(31):  # the 31 others beyond the ceiling, answered 429 at once
        limiter.release(overloaded=True)
    assert limiter.limit == 33
    limiter.release(overloaded=True)  # the one sent first, answered last of the 429s
    assert limiter.limit == 32
    assert limiter.in_flight == 32


async def test_far_above_the_ceiling_one_round_trip_converges() -> None:
    limiter = AdaptiveLimiter(maximum=32)
    await fill(limiter, 32)
    for _ in range(24):  # a ceiling of 8: 24 answered 429 at once, each cutting one deeper
        limiter.release(overloaded=True)
    assert limiter.limit == 8
    for _ in range(8):  # the 8 the server let in, answered later
        limiter.release()
    assert limiter.limit == 8


async def test_it_holds_under_the_ceiling_and_probes_above_it_rarely() -> None:
    limiter = AdaptiveLimiter(maximum=64, initial=16, probe_every=100)
    for _ in range(6):  # 96 successes, every window of 16 wholly in flight
        await fill(limiter, 16)
        for _ in range(16):
            limiter.release()
    assert (limiter.limit, limiter.probes) == (16, 0)
    await fill(limiter, 16)  # the 100th success
    for _ in range(16):
        limiter.release()
    assert (limiter.limit, limiter.probes) == (17, 1)


async def test_a_probe_answered_429_costs_one_request_and_restores_the_hold() -> None:
    limiter = AdaptiveLimiter(maximum=64, initial=16, probe_every=16)
    await fill(limiter, 16)
    for _ in range(16):
        limiter.release()
    assert limiter.limit == 17, "a full window of successes in use: one probe"
    await fill(limiter, 17)
    limiter.release(overloaded=True)  # the 17th was too many
    assert limiter.limit == 16
    for _ in range(16):
        limiter.release()
    assert limiter.limit == 16, "calm restarts after a 429"


async def test_an_unused_limit_does_not_climb() -> None:
    limiter = AdaptiveLimiter(maximum=64, initial=16, probe_every=4)
    for _ in range(100):  # one request at a time: the limit of 16 is not in use
        await limiter.acquire()
        limiter.release()
    assert limiter.limit == 16
    assert limiter.probes == 0


async def test_limit_stays_between_one_and_maximum() -> None:
    limiter = AdaptiveLimiter(maximum=4, probe_every=1)
    for _ in range(50):
        n = limiter.limit
        await fill(limiter, n)
        for _ in range(n):
            limiter.release()
    assert limiter.limit == 4
    for _ in range(100):
        await limiter.acquire()
        limiter.release(overloaded=True)
    assert limiter.limit == 1


async def test_dropped_requests_move_nothing() -> None:
    limiter = AdaptiveLimiter(maximum=8, initial=4, probe_every=1)
    await fill(limiter, 4)
    for _ in range(4):
        limiter.release(dropped=True)
    assert (limiter.limit, limiter.decreases, limiter.probes) == (4, 0, 0)


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
    limiter.release(dropped=True)
    await asyncio.sleep(0)
    assert order == [0]
    limiter.release(dropped=True)
    limiter.release(dropped=True)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert limiter.in_flight == 2
    assert limiter.peak_in_flight == 2


async def test_a_release_says_whether_it_let_a_waiting_request_in() -> None:
    limiter = AdaptiveLimiter(maximum=2)
    await fill(limiter, 2)
    assert limiter.release() is False, "nobody waits"
    await limiter.acquire()
    waiting = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    assert limiter.release(overloaded=True) is False, "the cut to 1 leaves no room for it"
    assert not waiting.done()
    assert limiter.release() is True, "its slot goes to the waiter"
    await asyncio.wait_for(waiting, 1)
    assert limiter.in_flight == 1


async def test_a_cancelled_waiter_gives_its_slot_back() -> None:
    limiter = AdaptiveLimiter(maximum=1)
    await limiter.acquire()
    task = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    limiter.release(dropped=True)
    assert limiter.in_flight == 0
    await asyncio.wait_for(limiter.acquire(), 1)
    assert limiter.in_flight == 1


async def test_slot_seconds_sum_the_time_each_slot_was_held_handed_over_or_not() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(maximum=2, clock=clock)
    clock.now = 5.0  # before any request: nothing held
    assert limiter.slot_seconds == 0
    await fill(limiter, 2)  # two slots from t=5
    waiting = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    clock.now = 6.0
    assert limiter.slot_seconds == 2  # read while held: 2 x 1 s
    limiter.release()  # at t=6, its slot handed to the waiter at once
    await waiting
    clock.now = 8.5
    limiter.release(overloaded=True)  # a 429's slot counts the same
    clock.now = 9.0
    limiter.release(dropped=True)
    clock.now = 20.0  # nothing in flight: nothing more
    assert limiter.in_flight == 0
    # 2 slots for 1 s, then 2 (one handed over) for 2.5 s, then 1 for 0.5 s
    assert limiter.slot_seconds == pytest.approx(2 * 1 + 2 * 2.5 + 1 * 0.5)


class FakeClock:
    """Time that moves only when the bucket sleeps, or a test moves it."""

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
    clock = FakeClock()
    limiter = AdaptiveLimiter(maximum=1, clock=clock)
    await limiter.acquire()
    task = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    clock.now = 1.0
    if cancel_first:
        task.cancel()
        limiter.release(dropped=True)  # pops the already-cancelled waiter
    else:
        limiter.release(dropped=True)  # admits the waiter...
        task.cancel()  # ...which is cancelled before it runs
    clock.now = 3.0
    with pytest.raises(asyncio.CancelledError):
        await task
    assert limiter.in_flight == 0
    # The first slot for 1 s; an admitted waiter's slot is held until its cancellation lands.
    assert limiter.slot_seconds == (1.0 if cancel_first else 3.0)
    clock.now = 10.0
    await asyncio.wait_for(limiter.acquire(), 1)
    clock.now = 10.5
    assert limiter.slot_seconds == (1.5 if cancel_first else 3.5)


async def rounds_against(limiter: AdaptiveLimiter, ceiling: int, requests: int) -> int:
    """Full windows of requests against a server that turns away, at once, any beyond
    ``ceiling`` in flight; the number answered 429."""
    sent = rejected = 0
    while sent < requests:
        n = limiter.limit
        await fill(limiter, n)
        sent += n
        turned_away = max(0, n - ceiling)
        rejected += turned_away
        for _ in range(turned_away):
            limiter.release(overloaded=True)
        for _ in range(n - turned_away):
            limiter.release()
    return rejected


async def test_a_limit_far_below_the_ceiling_climbs_back_in_a_few_round_trips() -> None:
    """A ceiling that rose (a replica stopped, the account's limit raised): probes that pass
    in a row come sooner, so the limit is back within a few hundred requests, not a whole
    pass; at the ceiling, probes stay rare."""
    limiter = AdaptiveLimiter(maximum=64, initial=8)
    sent = 0
    while limiter.limit < 32:
        await rounds_against(limiter, 32, 1)
        sent += limiter.limit
    assert sent < 1_000, f"{sent} requests to regain the ceiling"
    rejected = await rounds_against(limiter, 32, 20_000)
    assert 31 <= limiter.limit <= 33
    assert rejected / 20_000 < 0.01, f"{rejected} answered 429 at the ceiling"
