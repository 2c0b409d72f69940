"""The metrics registry: every family README lists, of its type, rendered by prometheus_client."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import REPO
from worker.metrics import FAMILIES, Metrics, metrics

README = (REPO / "README.md").read_text(encoding="utf-8")
METRICS_BULLET = README.split("- **Probes and metrics**", 1)[1].split("\n- **", 1)[0]


def families(metrics: Metrics) -> dict[str, str]:
    """name -> type, as a Prometheus scraper reads the exposition (counters lose _total)."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return {f.name: f.type for f in text_string_to_metric_families(body.decode())}


def test_every_family_readme_names_is_exposed_with_its_type() -> None:
    listed = set(re.findall(r"`(convsync_[a-z_]+)(?:\{[^`]*\})?`", METRICS_BULLET))
    declared = {f.name: f.kind for f in FAMILIES}
    assert listed == set(declared), "README's metric list and worker/metrics.py differ"
    exposed = families(Metrics())
    for name, kind in declared.items():
        assert exposed[name.removesuffix("_total")] == kind, name
    assert {
        "convsync_request_duration_seconds",
        "convsync_page_commit_seconds",
        "convsync_pass_seconds",
    } <= {n for n, k in declared.items() if k == "histogram"}


def test_values_by_name_and_labels_keep_full_precision() -> None:
    registry = Metrics()
    registry.inc("convsync_pages_total", 3, kind='con"v')
    registry.inc("convsync_pages_total", 2, kind='con"v')
    registry.inc("convsync_pages_total", kind="users")
    registry.set("convsync_last_success_timestamp_seconds", 1795540212.3047216)
    registry.set("convsync_concurrency_limit", 16)
    assert registry.value("convsync_pages_total", kind='con"v') == 5
    assert registry.value("convsync_pages_total", kind="never") == 0
    assert registry.total("convsync_pages_total") == 6
    scraped = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(registry.render()[0].decode())
        for s in f.samples
    }
    assert scraped[("convsync_pages_total", (("kind", 'con"v'),))] == 5
    assert scraped[("convsync_last_success_timestamp_seconds", ())] == 1795540212.3047216
    assert scraped[("convsync_concurrency_limit", ())] == 16


def test_the_last_pass_duration_is_also_a_histogram_observation() -> None:
    registry = Metrics()
    registry.set("convsync_pass_duration_seconds", 42.0)
    registry.set("convsync_pass_duration_seconds", 7.0)
    assert registry.value("convsync_pass_duration_seconds") == 7.0
    assert registry.value("convsync_pass_seconds_count") == 2
    assert registry.value("convsync_pass_seconds_sum") == 49.0
    assert registry.value("convsync_pass_seconds_bucket", le="15.0") == 1


def test_openmetrics_when_asked_and_process_metrics_in_the_process_registry() -> None:
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    text = body.decode()
    assert text.endswith("# EOF\n")
    names = {f.name for f in openmetrics_families(text)}  # type: ignore[no-untyped-call]
    assert {"convsync_requests", "convsync_page_commit_seconds"} <= names
    assert "process_resident_memory_bytes" in families(metrics)
    assert "process_resident_memory_bytes" not in families(Metrics())


def test_histogram_buckets_are_cumulative_and_include_their_bound() -> None:
    registry = Metrics()
    for seconds in (0.005, 0.006, 0.1, 99.0):  # on a bound, between two, on one, beyond all
        registry.observe("convsync_request_duration_seconds", seconds)
    bucket = "convsync_request_duration_seconds_bucket"
    assert registry.value(bucket, le="0.005") == 1, "a value on a bound is counted in it"
    assert registry.value(bucket, le="0.01") == 2
    assert registry.value(bucket, le="0.1") == 3
    assert registry.value(bucket, le="30.0") == 3
    assert registry.value(bucket, le="+Inf") == 4
    assert registry.value("convsync_request_duration_seconds_count") == 4
    assert registry.value("convsync_request_duration_seconds_sum") == 0.005 + 0.006 + 0.1 + 99.0


def test_a_series_needs_exactly_its_familys_labels() -> None:
    registry = Metrics()
    registry.inc("convsync_webhooks_total", outcome="accepted", event_type="onX")  # any order
    assert registry.value("convsync_webhooks_total", event_type="onX", outcome="accepted") == 1
    for wrong in (
        {"event_type": "onX"},
        {"event_type": "onX", "status": "accepted"},
        {"event_type": "onX", "outcome": "accepted", "extra": "b"},
    ):
        with pytest.raises((ValueError, KeyError)):
            registry.inc("convsync_webhooks_total", 1.0, **wrong)


def test_a_series_looked_up_once_is_the_one_updated_by_name() -> None:
    registry = Metrics()
    pages = registry.series("convsync_pages_total", kind="conversations")
    pages.inc()
    registry.inc("convsync_pages_total", 2, kind="conversations")
    assert registry.value("convsync_pages_total", kind="conversations") == 3
    commit = registry.histogram("convsync_page_commit_seconds")
    commit.observe(0.002)
    registry.observe("convsync_page_commit_seconds", 0.003)
    assert registry.value("convsync_page_commit_seconds_count") == 2
    assert registry.value("convsync_page_commit_seconds_bucket", le="0.0025") == 1


def test_each_kind_takes_only_its_own_updates() -> None:
    registry = Metrics()
    with pytest.raises(ValueError, match="is a histogram"):
        registry.series("convsync_page_commit_seconds")
    with pytest.raises(ValueError, match="is not a histogram"):
        registry.observe("convsync_pages_total", 1.0, kind="users")
    with pytest.raises(ValueError, match="a counter is not set"):
        registry.set("convsync_pages_total", 1.0, kind="users")
    with pytest.raises(ValueError, match="a counter only goes up"):
        registry.inc("convsync_pages_total", -1.0, kind="users")
    registry.inc("convsync_requests_in_flight", -1.0)  # a gauge may
    assert registry.value("convsync_requests_in_flight") == -1.0
    assert registry.value("convsync_pages_total", kind="users") == 0


def test_a_pass_imports_prometheus_client_only_when_metrics_are_read() -> None:
    """``convsync sync`` is never scraped: its imports, its updates and the progress line's
    readings (every frame, on a terminal) leave prometheus_client out, and a registry made
    afterwards renders what was counted before it existed."""
    code = (
        "import sys, io\n"
        "import worker.cli, worker.sync\n"
        "from worker.limiter import AdaptiveLimiter\n"
        "from worker.metrics import Metrics\n"
        "from worker.progress import ProgressLine\n"
        "assert 'prometheus_client' not in sys.modules, 'imported by the pass'\n"
        "m = Metrics()\n"
        "m.inc('convsync_pages_total', 2, kind='conversations')\n"
        "m.inc('convsync_users_total', outcome='synced')\n"
        "line = ProgressLine(None, AdaptiveLimiter(4), lambda: None, io.StringIO(), m)\n"
        "frame = line.frame(1.0)\n"
        "assert (frame.pages, frame.users_done) == (2, 1), frame\n"
        "assert 'prometheus_client' not in sys.modules, 'imported by an update or a reading'\n"
        "body, _ = m.render()\n"
        "assert b'convsync_pages_total{kind=\"conversations\"} 2.0' in body, body\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
