"""The progress line's text, its ETA, and log lines written above it."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from dataclasses import replace

import pytest

from worker.limiter import AdaptiveLimiter
from worker.metrics import Metrics
from worker.progress import CLEAR, Frame, ProgressLine, _logs_above, render

FRAME = Frame(seconds=12.44, users_done=120, users_known=400, discovering=True, pages=356,
              rows=9120, pages_per_second=41.83, eta_seconds=None, rate_limited=3, limit=14,
              maximum=16)  # fmt: skip


def test_the_line_shows_users_pages_rows_rate_eta_429s_and_the_limit() -> None:
    assert render(FRAME) == (
        "12.4 s  users 120/400+  pages 356  rows 9120  41.8 pages/s  ETA ?  429s 3  limit 14/16"
    )
    known = replace(FRAME, discovering=False, eta_seconds=67.4)
    assert "users 120/400  " in render(known)
    assert "ETA 1:07  " in render(known)
    assert "ETA 2:00:05  " in render(replace(FRAME, eta_seconds=7205.0))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def line() -> Iterator[ProgressLine]:
    terminal = Terminal()
    handler = logging.StreamHandler(terminal)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield ProgressLine(None, AdaptiveLimiter(16), lambda: None, terminal, Metrics())  # type: ignore[arg-type]
    finally:
        root.removeHandler(handler)


def test_a_frame_counts_this_process_and_learns_the_rest_from_the_database(
    line: ProgressLine,
) -> None:
    metrics = line.metrics
    metrics.inc("convsync_users_total", 30, outcome="done")
    metrics.inc("convsync_users_total", 2, outcome="failed")
    metrics.inc("convsync_pages_total", 50, kind="conversations")
    metrics.inc("convsync_pages_total", 4, kind="users")
    metrics.inc("convsync_rows_total", 700, outcome="inserted")
    metrics.inc("convsync_rate_limited_total", 5)
    line._known, line._discovering = 132, False  # as the last database answer left them
    first = line.frame(100.0)
    metrics.inc("convsync_users_total", 20, outcome="done")
    metrics.inc("convsync_pages_total", 40, kind="conversations")
    frame = line.frame(102.0)
    assert (first.users_done, frame.users_done, frame.users_known) == (32, 52, 132)
    assert (frame.pages, frame.rows, frame.rate_limited) == (90, 700, 5)
    assert frame.pages_per_second == 20.0  # 40 pages in 2 s
    assert frame.eta_seconds == 8.0  # 80 users left at 10 a second
    assert (frame.limit, frame.maximum) == (16, 16)
    metrics.inc("convsync_users_total", 200, outcome="done")  # more than it last knew of
    assert line.frame(103.0).users_known == 252


def test_a_log_line_goes_above_the_line_which_is_drawn_again(line: ProgressLine) -> None:
    terminal = line.stream
    assert isinstance(terminal, Terminal)
    with _logs_above(line):
        line.draw("users 1/2")
        logging.getLogger("worker.test").warning("something happened")
    assert terminal.getvalue() == f"{CLEAR}users 1/2{CLEAR}something happened\nusers 1/2"
    line.finish()  # the last frame stays, on its own line, under which logs go on as before
    logging.getLogger("worker.test").warning("after")
    rest = terminal.getvalue().removeprefix(f"{CLEAR}users 1/2{CLEAR}something happened\nusers 1/2")
    assert re.fullmatch(rf"{re.escape(CLEAR)}[\d.]+ s  users 0/0\+  .*  limit 16/16\nafter\n", rest)
