"""Prometheus text rendering."""

from __future__ import annotations

from worker.metrics import Metrics


def test_values_keep_full_precision_and_labels_are_escaped() -> None:
    metrics = Metrics()
    metrics.help["t_seconds"] = "a timestamp"
    metrics.set("t_seconds", 1795540212.3047216)
    metrics.inc("pages_total", 3, kind='con"v')
    metrics.inc("pages_total", 2, kind='con"v')
    metrics.set("limit", 16)  # an int gauge
    text = metrics.render()
    assert "limit 16\n" in text
    assert "t_seconds 1795540212.3047216\n" in text
    assert 'pages_total{kind="con\\"v"} 5\n' in text
    assert "# TYPE pages_total counter" in text
    assert "# HELP t_seconds a timestamp" in text
    assert metrics.total("pages_total") == 5
