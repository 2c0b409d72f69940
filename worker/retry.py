"""One retry policy for everything convsync repeats: requests to Twilio, operations on PostgreSQL.

Exponential backoff with full jitter, bounded by attempts and by seconds; a wait the failure
asks for (Twilio's ``Retry-After``) is honoured. Every retry is one event of one shape,
``retry_scheduled`` (target, retry_num, caused_by, wait_for, waited_so_far, and what the caller
adds), and one metric, ``convsync_retries_total{cause}``; giving up is ``retries_exhausted``,
then the caller's own error.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from worker.metrics import Metrics

log = structlog.get_logger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter, bounded by attempts (None: by seconds only) and by
    the seconds spent retrying."""

    max_attempts: int | None = 8
    max_seconds: float = 120.0
    base: float = 0.25
    cap: float = 20.0

    def delay(self, retry_num: int) -> float:
        # The exponent is bounded first: retries bounded only by seconds can number thousands,
        # and 2.0 ** 1024 is past a float's range.
        return random.uniform(0, min(self.cap, self.base * 2.0 ** min(retry_num - 1, 64)))


async def retrying(
    operation: Callable[[], Awaitable[T]],
    *,
    target: str,
    retry_on: tuple[type[BaseException], ...],
    backoff: Backoff,
    give_up: Callable[[BaseException, int, float], BaseException],
    metrics: Metrics,
    asked_wait: Callable[[BaseException], float | None] = lambda _error: None,
    before_retry: Callable[[BaseException], Awaitable[None]] | None = None,
    pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
    level: str = "info",
    describe: Callable[[], dict[str, Any]] = dict,
) -> T:
    """``await operation()`` until it succeeds or the budget is spent; then raise
    ``give_up(last error, attempts, seconds waited)``. Errors not in ``retry_on`` pass through.
    ``describe()`` adds fields to every event (e.g. the request's path); ``pause`` may end a
    wait early by raising (a shutdown)."""
    started = time.monotonic()
    retry_num = 0
    while True:
        try:
            return await operation()
        except retry_on as error:
            retry_num += 1
            waited = time.monotonic() - started
            wait = backoff.delay(retry_num)
            asked = asked_wait(error)
            if asked is not None:
                wait = max(wait, asked)
            cause = type(error).__name__
            out_of_attempts = backoff.max_attempts is not None and retry_num >= backoff.max_attempts
            if out_of_attempts or waited + wait > backoff.max_seconds:
                log.warning(
                    "retries_exhausted",
                    target=target,
                    attempts=retry_num,
                    caused_by=cause,
                    waited_so_far=round(waited, 3),
                    error=str(error),
                    **describe(),
                )
                raise give_up(error, retry_num, waited) from error
            metrics.inc("convsync_retries_total", cause=cause)
            getattr(log, level)(
                "retry_scheduled",
                target=target,
                retry_num=retry_num,
                caused_by=cause,
                wait_for=round(wait, 3),
                waited_so_far=round(waited, 3),
                **describe(),
            )
            if before_retry is not None:
                await before_retry(error)
            await pause(wait)
