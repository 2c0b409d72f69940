"""``convsync sync`` on a terminal shows a live progress line (driven here through a
pseudo-terminal), and none off one, where every line stays JSON."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator

import pytest

from convsync_tools.simdata import Dataset
from convsync_tools.simulator import Simulator, SimulatorServer
from tests.harness import REPO, _base_env, assert_mirrors, convsync, worker_env

USERS = 120
CEILING = 3
LINE = re.compile(
    r"(?P<seconds>[\d.]+) s  users (?P<done>\d+)/(?P<known>\d+)(?P<more>\+?)  "
    r"pages (?P<pages>\d+)  rows (?P<rows>\d+)  (?P<rate>[\d.]+) pages/s  "
    r"ETA (?P<eta>\?|\d+:\d\d(?::\d\d)?)  429s (?P<rejected>\d+)  limit (?P<limit>\d+)/8"
)


@pytest.fixture
def server() -> Iterator[SimulatorServer]:
    """A pass of a couple of seconds, answered 429 above CEILING requests in flight."""
    sim = Simulator(Dataset.generate(seed=21, services=1, users_per_service=USERS))
    sim.configure(latency_ms=25, concurrency_ceiling=CEILING)
    with SimulatorServer(sim) as s:
        yield s


def run_on_a_terminal(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> tuple[int, str]:
    """Run the CLI with stdin, stdout and stderr on a pseudo-terminal of 160 columns; its exit
    code and everything it wrote there."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    child = subprocess.Popen(
        [sys.executable, "-m", "worker", *args],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env={**_base_env(), **env},
        cwd=REPO,
        close_fds=True,
    )
    os.close(follower)
    chunks: list[bytes] = []
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
        code = child.wait(timeout)
    finally:
        os.close(leader)
        if child.poll() is None:
            child.kill()
            child.wait()
    return code, b"".join(chunks).decode("utf-8", "replace")


async def test_sync_on_a_terminal_shows_a_live_progress_line(
    server: SimulatorServer, db_url: str
) -> None:
    env = worker_env(server, db_url, CONVSYNC_CONCURRENCY="8", CONVSYNC_LOG_FORMAT="auto")
    code, screen = run_on_a_terminal(["sync"], env)
    assert code == 0, screen[-3000:]
    await assert_mirrors(server, db_url)
    matches = list(LINE.finditer(screen))
    frames = [m.groupdict() for m in matches]
    assert len(frames) >= 2, f"no live line redrawn: {screen[-2000:]!r}"
    # Redrawn in place (after a log line, under it).
    assert all(screen[: m.start()].endswith(("\r\x1b[K", "\n")) for m in matches)
    assert screen[matches[-1].end() :].startswith("\r\n"), "the last frame stays on its line"
    # It moves forward, learns the whole work set, and shows the client's 429s and limit.
    done = [int(f["done"]) for f in frames]
    assert done == sorted(done)
    assert any(int(f["known"]) == USERS and not f["more"] for f in frames)
    assert all(int(f["done"]) <= int(f["known"]) <= USERS for f in frames)
    last = frames[-1]
    assert (int(last["done"]), int(last["known"]), last["eta"]) == (USERS, USERS, "0:00")
    assert int(last["pages"]) > 0
    assert int(last["rows"]) > 0
    assert int(last["rejected"]) >= 1, "the ceiling answered 429s the line did not count"
    assert int(last["limit"]) <= CEILING, "the limit shown is not the limiter's"
    # Logs still show (the console renderer on a terminal), each above the line.
    assert "pass_started" in screen
    assert "pass_finished" in screen


async def test_off_a_terminal_there_is_no_progress_line_and_logs_stay_json(
    server: SimulatorServer, db_url: str
) -> None:
    env = worker_env(server, db_url, CONVSYNC_CONCURRENCY="8", CONVSYNC_LOG_FORMAT="auto")
    result = convsync(["sync"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\x1b[K" not in result.stderr + result.stdout
    assert not LINE.search(result.stderr)
    lines = result.stderr.splitlines()
    assert lines, "no logs"
    for line in lines:
        json.loads(line)
