"""The event loop every command runs on: uvloop where it is installed (Linux, macOS), else the
standard library's; ``CONVSYNC_EVENT_LOOP`` chooses explicitly. Also the cyclic garbage
collector's pace, set once before the loop starts (``pace_collector``), and the one way a loop
waits on several events at once (``first_set``)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

# Container allocations between two young-generation collections (CPython's default: 700). A
# pass allocates containers without pause (requests, responses, coroutines, decoded pages),
# nearly all freed by reference counting; at the default pace the collector took 0.22 s of a
# 6.4 s pass's CPU (4,000 users), at this one 0.025 s. Cycles are still collected.
YOUNG_COLLECTION_THRESHOLD = 10_000


def loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A factory for the chosen loop; None means the standard library's default."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def pace_collector() -> None:
    """Collect cycles less often, and never look again at what start-up made (modules,
    classes, functions: ``gc.freeze``), which a full collection would otherwise walk."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)


def run(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    """``asyncio.run(main)`` on the chosen loop, the collector paced first."""
    pace_collector()
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


async def first_set(events: Iterable[asyncio.Event], seconds: float) -> None:
    """Return once any of ``events`` is set, or after ``seconds``."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
