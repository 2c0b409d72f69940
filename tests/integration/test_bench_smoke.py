"""The benchmark runs end to end at its quick size and writes its figures (no timing asserted;
memory is, within bounds no healthy run misses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.sim import cpu_wait
from tests.conftest import PgServer
from tests.harness import REPO

EXPECTED = {
    "timestamp", "config", "machine", "ceiling", "ceiling_again", "floor", "convsync",
    "convsync_unchanged", "naive", "dlt", "hidden_ceiling", "mid", "big", "targets", "seconds",
    "budget",
}  # fmt: skip


@pytest.mark.timeout(240)
def test_quick_benchmark_writes_its_figures(pg_server: PgServer, tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    env = {**os.environ, "TEST_DATABASE_URL": pg_server.url}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--skip-naive", "--skip-dlt",
         "--output", str(output)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=230,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    figures = json.loads(output.read_text())
    assert figures.keys() >= EXPECTED
    assert figures["naive"] == {"skipped": "--skip-naive"}
    assert figures["dlt"] == {"skipped": "--skip-dlt"}
    try:
        head = subprocess.check_output(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], text=True
        ).strip()
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout
        head = ""
    if head:  # a git checkout: the figures name the commit measured
        assert figures["machine"]["worker_commit"] in (head, f"{head}-dirty")
    run = figures["convsync"]
    assert run["exit_code"] == 0
    assert run["summary"]["status"] == "succeeded"
    assert run["pages_ok"] == figures["ceiling"]["pages"] > 0
    # the ceiling walked again after the pass, which is compared with the mean of the two
    assert figures["ceiling_again"]["pages"] == figures["ceiling"]["pages"]
    walks = (figures["ceiling"]["pages_per_second"], figures["ceiling_again"]["pages_per_second"])
    (end_to_end,) = (t for t in figures["targets"] if t["name"].startswith("end to end / ceil"))
    assert end_to_end["value"] == pytest.approx(run["pages_per_second"] / (sum(walks) / 2))
    again = figures["convsync_unchanged"]  # the same pass over what the first stored
    assert again["summary"]["status"] == "succeeded"
    assert again["pages_ok"] == run["pages_ok"]
    assert (again["summary"]["rows_inserted"], again["summary"]["rows_updated"]) == (0, 0)
    assert again["summary"]["rows_unchanged"] == run["summary"]["rows_inserted"] > 0
    # The child's own peak (wait4), in MB: a Python with the worker's libraries loaded holds
    # more than 30 MB, the target is 150; more than three times the users costs little more.
    rss, big_rss = run["peak_rss_mb"], figures["big"]["peak_rss_mb"]
    assert 30 <= rss <= 150, f"peak RSS {rss:.1f} MB"
    assert figures["config"]["big_users"] >= 3 * figures["config"]["users"]
    assert 30 <= big_rss <= 1.3 * rss, f"peak RSS {big_rss:.1f} MB at the big size, {rss:.1f} MB"
    assert figures["mid"]["pages_ok"] > run["pages_ok"]
    latencies = [k["latency_ms"] for k in figures["hidden_ceiling"]]
    assert latencies == figures["config"]["k_latency_ms"] == [10.0, 40.0]
    for limited in figures["hidden_ceiling"]:
        assert limited["in_flight"]["max"] <= figures["config"]["hidden_ceiling"]
        # the child's last log line says where its limiter ended, read back into the figures
        assert 1 <= limited["limiter"]["concurrency_limit"] <= figures["config"]["concurrency"]
        if limited["answered_429"]:
            assert limited["limiter"]["limit_decreases"] >= 1
        # and how long its slots were held: at least what the simulator counted in flight
        counted = limited["in_flight"]["window_avg"] * limited["in_flight"]["window_seconds"]
        assert 0 < counted <= limited["limiter"]["limiter_slot_seconds"]
    assert run["commits"] > 0
    # the floor walked the same pages in its own process, timed whole as convsync's is
    floor = figures["floor"]
    assert floor["pages"] == figures["ceiling"]["pages"] == run["pages_ok"]
    assert floor["rows"] == run["rows"]
    assert 0 < floor["cpu_ms_per_page"] < 1000
    # its group commit, from the same line: every page of the pass, in statements within it
    assert run["writer"]["writer_pages"] == run["summary"]["pages"]
    assert 1 <= run["writer"]["writer_batches"] <= run["writer"]["writer_pages"]
    assert 0 < run["writer"]["writer_busy_seconds"] <= run["pass_seconds"]
    assert run["postgres_backend_cpu_seconds"] > 0
    if cpu_wait(os.getpid()) > 0:  # a kernel that keeps run-queue waits: seconds, not ns
        assert 0 < run["cpu_wait_seconds"] < run["wall_seconds"]
        assert 0 < run["postgres_backend_wait_seconds"] < 20 * run["wall_seconds"]
        assert 0 <= figures["ceiling"]["cpu_wait_ms_per_page"] < 1000
    # what the machine allows: the pass's CPU a page in its three processes, the worker's over
    # the pass alone (its pass_finished line), less than its whole process's (start-up apart)
    assert 0 < run["pass_cpu_seconds"] < run["cpu_seconds"]
    budget = figures["budget"]
    cpu = budget["cpu_ms_per_page"]
    assert cpu["worker"] == pytest.approx(1000 * run["pass_cpu_seconds"] / run["pages_ok"])
    assert cpu["postgres"] == run["postgres_ms_per_page"]
    simulator_seconds = run["sim_cpu_cores"] * run["wall_seconds"]
    assert cpu["simulator"] == pytest.approx(1000 * simulator_seconds / run["pages_ok"])
    assert cpu["simulator"] > 0
    assert budget["cpu_bound_pages_per_second"] == pytest.approx(
        1000 * figures["machine"]["cpus"] / cpu["total"]
    )
    assert budget["floor_cpu_ms_per_page"] == floor["cpu_ms_per_page"]
    assert budget["naive_target_of_ceiling"] is None  # the SDK loop skipped
    assert "CPUs give at most" in done.stdout  # the end-to-end line, not only its heading
    names = {t["name"] for t in figures["targets"]}
    assert len(names) == 8 + 2 * len(latencies)
    assert all("met" in t for t in figures["targets"])
    assert "end to end / ceiling (pages/s)" in done.stdout
