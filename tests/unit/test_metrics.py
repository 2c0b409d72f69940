"""The metrics registry: every family README lists, of its type, rendered by prometheus_client."""

from __future__ import annotations

import re

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
