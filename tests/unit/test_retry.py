"""Retries bounded by seconds alone: however many there are, each waits within the cap."""

from __future__ import annotations

import pytest

from worker.metrics import Metrics
from worker.retry import Backoff, retrying


class Refused(Exception):
    pass


class GaveUp(Exception):
    def __init__(self, attempts: int) -> None:
        self.attempts = attempts


async def test_thousands_of_retries_bounded_by_seconds_alone_never_overflow() -> None:
    # A database wait of an hour retries an outage about 2,500 times: past the 1,024th, the
    # exponential delay is beyond a float's range unless bounded before it is computed.
    attempts = 0
    budget = Backoff(max_attempts=None, max_seconds=3600.0, base=1e-9, cap=1e-9)

    async def refused() -> None:
        nonlocal attempts
        attempts += 1
        if attempts > 3000:
            raise GaveUp(attempts)  # far enough: the budget in seconds is not the point
        raise Refused

    async def no_wait(_seconds: float) -> None:
        return None

    with pytest.raises(GaveUp):
        await retrying(
            refused,
            target="test",
            retry_on=(Refused,),
            backoff=budget,
            give_up=lambda error, n, waited: AssertionError("gave up early"),
            metrics=Metrics(),
            pause=no_wait,
            level="debug",
        )
    assert attempts == 3001


@pytest.mark.parametrize("retry_num", [1, 10, 1025, 100_000])
def test_a_delay_is_within_its_cap_whatever_the_retry(retry_num: int) -> None:
    assert 0 <= Backoff(cap=20.0).delay(retry_num) <= 20.0
