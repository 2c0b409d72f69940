"""The process's runtime: the event loop commands run on, and the collector's pace."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from worker import loop


@pytest.fixture
def collector_restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class _Node:
    def __init__(self) -> None:
        self.peer: _Node | None = None


async def _cycle_left_behind_is_collected() -> bool:
    """Leave a reference cycle as garbage, then allocate containers that stay alive (what
    moves the collector) until past its threshold: the cycle must be gone."""
    first, second = _Node(), _Node()
    first.peer, second.peer = second, first
    gone = weakref.ref(first)
    del first, second
    held: list[list[None]] = [[] for _ in range(2 * loop.YOUNG_COLLECTION_THRESHOLD)]
    await asyncio.sleep(0)
    return len(held) > 0 and gone() is None


def test_a_command_runs_with_the_collector_paced_and_cycles_still_collected(
    collector_restored: None,
) -> None:
    gc.set_threshold(700, 10, 10)
    assert loop.run(_cycle_left_behind_is_collected(), "asyncio")
    assert gc.get_threshold()[0] == loop.YOUNG_COLLECTION_THRESHOLD
    assert gc.get_freeze_count() > 0  # start-up's objects are out of the collector's way
