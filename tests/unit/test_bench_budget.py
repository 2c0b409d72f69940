"""The benchmark's estimate of what the machine allows (``bench.cli.budget``) and the ceiling
the pass is compared with, on figures of one run made up here: their arithmetic, and the
figures left out when a phase did not run."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from bench.cli import _budget_lines, budget, ceiling_pages_per_second, evaluate


def run(**convsync: Any) -> dict[str, Any]:
    """A run's figures, as far as the budget reads them: 1,000 pages of a pass, 2 CPUs."""
    figures = {
        "pages_ok": 1000,
        "pass_cpu_seconds": 0.5,  # 0.5 ms a page, over the pass
        "postgres_ms_per_page": 1.0,
        "sim_cpu_cores": 0.25,
        "wall_seconds": 4.0,  # 1 CPU second: 1.0 ms a page
        **convsync,
    }
    return {
        "machine": {"cpus": 2},
        "ceiling": {"pages_per_second": 800.0},
        "floor": {"cpu_ms_per_page": 0.4},
        "naive": {"pages_per_second": 16.0},
        "convsync": figures,
    }


def test_the_pass_cost_in_its_three_processes_bounds_the_pages_per_second() -> None:
    figures = budget(run())
    assert figures["cpu_ms_per_page"] == pytest.approx(
        {"worker": 0.5, "postgres": 1.0, "simulator": 1.0, "total": 2.5}
    )
    # 2 CPUs at 2.5 ms a page: 800 pages/s, the whole ceiling
    assert figures["cpu_bound_pages_per_second"] == pytest.approx(800.0)
    assert figures["cpu_bound_of_ceiling"] == pytest.approx(1.0)
    assert figures["floor_cpu_ms_per_page"] == 0.4
    assert figures["naive_target_of_ceiling"] == pytest.approx(50 * 16 / 800)  # 1.0
    lines = "\n".join(_budget_lines({**run(), "budget": figures}))
    assert "at most 800 pages/s at that cost, 1.00 of the ceiling" in lines
    assert "50x the SDK loop is 1.00 of the ceiling" in lines


def test_what_a_run_did_not_measure_is_left_out() -> None:
    figures = {**run(), "naive": {"skipped": "--skip-naive"}, "floor": {"skipped": "failed"}}
    figures["convsync"].pop("pass_cpu_seconds")  # no pass_finished line read
    left = budget(figures)
    assert left["cpu_ms_per_page"] is None
    assert left["cpu_bound_pages_per_second"] is None
    assert left["naive_target_of_ceiling"] is None
    assert left["floor_cpu_ms_per_page"] is None
    assert _budget_lines({**figures, "budget": left})[1:] == [
        "what this machine allows, at this run's costs (an estimate)"
    ]
    assert budget(run(pages_ok=0))["cpu_bound_pages_per_second"] is None


def test_the_pass_is_compared_with_the_mean_of_the_walks_on_either_side() -> None:
    figures = {**run(pages_per_second=720.0, peak_rss_mb=60.0, cpu_ms_per_page=0.6),
               "ceiling_again": {"pages_per_second": 1000.0}}  # fmt: skip
    assert ceiling_pages_per_second(figures) == pytest.approx(900.0)  # (800 + 1000) / 2
    assert ceiling_pages_per_second(run()) == 800.0  # a run with one walk: that walk
    # what the machine allows, as a share of the same mean
    assert budget(figures)["cpu_bound_of_ceiling"] == pytest.approx(800 / 900)
    assert budget(figures)["naive_target_of_ceiling"] == pytest.approx(50 * 16 / 900)
    args = argparse.Namespace(users=4000, big_users=0, mid_users=0, hidden_ceiling=0)
    (end_to_end, *_) = evaluate(args, figures)
    assert end_to_end.name == "end to end / ceiling (pages/s)"
    assert end_to_end.value == pytest.approx(0.8)  # 720 / 900: short of 0.9, though 0.9 of 800
    assert end_to_end.met is False
