"""``python -m bench.cprofile_child OUT``: ``convsync sync`` under cProfile, timed by CPU time
(``time.process_time``), so time spent waiting for the CPU or the network is not counted."""

from __future__ import annotations

import cProfile
import sys
import time

from worker.cli import main


def run(out: str) -> int:
    profiler = cProfile.Profile(time.process_time)
    code: int = profiler.runcall(main, ["sync"])
    profiler.dump_stats(out)
    return code


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1]))
