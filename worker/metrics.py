"""The worker's metrics: prometheus_client families in a registry of their own.

Every metric is declared once, in ``FAMILIES`` (name, type, help, labels); the code updates them
by name: ``Metrics.inc(name, amount, **labels)``, ``set`` and ``observe``. ``render`` gives
Prometheus' text format, or OpenMetrics when the scraper's ``Accept`` asks for it. The
process-wide registry (``metrics``, served on ``/metrics`` by ``convsync run``) also carries the
standard process and Python collectors; a ``Metrics()`` of one's own (a test, the demo) does
not. Counters expose no ``_created`` series.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

Kind = Literal["counter", "gauge", "histogram"]
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PASS_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)
RELIST_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 900.0)


@dataclass(frozen=True)
class Family:
    """One metric: its name (as exposed), type, help, label names and (histograms) buckets."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


FAMILIES = (
    Family("convsync_requests_total", "counter",
           "HTTP requests to Twilio by status (or error kind).", ("status",)),
    Family("convsync_retries_total", "counter", "Requests retried, by cause.", ("cause",)),
    Family("convsync_rate_limited_total", "counter", "Requests answered 429."),
    Family("convsync_concurrency_limit", "gauge", "Current adaptive limit of requests in flight."),
    Family("convsync_requests_in_flight", "gauge", "Requests to Twilio in flight now."),
    Family("convsync_request_duration_seconds", "histogram",
           "Seconds from sending a request to Twilio to its whole body received.",
           buckets=LATENCY_BUCKETS),
    Family("convsync_pages_total", "counter", "Pages written, by kind.", ("kind",)),
    Family("convsync_page_commit_seconds", "histogram",
           "Seconds the statement writing a page's batch took, once per page it committed.",
           buckets=COMMIT_BUCKETS),
    Family("convsync_rows_total", "counter", "Membership rows by outcome.", ("outcome",)),
    Family("convsync_users_total", "counter", "Users finished, by outcome.", ("outcome",)),
    Family("convsync_pass_duration_seconds", "gauge", "Duration of the last finished pass."),
    Family("convsync_pass_seconds", "histogram",
           "Durations of finished passes (the last one is convsync_pass_duration_seconds).",
           buckets=PASS_BUCKETS),
    Family("convsync_last_success_timestamp_seconds", "gauge",
           "Unix time of the last successful pass."),
    Family("convsync_passes_total", "counter", "Passes finished, by status.", ("status",)),
    Family("convsync_webhooks_total", "counter",
           "Twilio webhooks received, by event type and outcome (accepted, duplicate, ignored, "
           "refused, unavailable).", ("event_type", "outcome")),
    Family("convsync_relist_requests_total", "counter",
           "Users named by accepted webhooks: a new target, or coalesced into a waiting one.",
           ("outcome",)),
    Family("convsync_relists_total", "counter",
           "Targeted re-lists finished, by outcome (done, failed, gone, busy, unknown_user).",
           ("outcome",)),
    Family("convsync_relist_delay_seconds", "histogram",
           "Seconds from a user's oldest unserved webhook to its re-list committed.",
           buckets=RELIST_BUCKETS),
)  # fmt: skip
# Series shown at 0 from the start (they are only ever incremented by what they count).
PRESET = {"convsync_rows_total": ("inserted", "updated", "unchanged", "removed", "quarantined")}
# Setting the gauge of the last pass's duration records the pass in the histogram too.
OBSERVED_WITH = {"convsync_pass_duration_seconds": "convsync_pass_seconds"}


def _family(spec: Family, registry: CollectorRegistry) -> Any:
    if spec.kind == "counter":
        return Counter(spec.name, spec.help, spec.labels, registry=registry)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.help, spec.labels, registry=registry)
    return Histogram(spec.name, spec.help, spec.labels, registry=registry, buckets=spec.buckets)


class Metrics:
    """Every family of ``FAMILIES`` in a ``CollectorRegistry`` of its own, updated by name."""

    def __init__(self, *, process: bool = False) -> None:
        self.registry = CollectorRegistry()
        self._families: dict[str, Any] = {f.name: _family(f, self.registry) for f in FAMILIES}
        self._children: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        for name, values in PRESET.items():
            (label,) = next(f.labels for f in FAMILIES if f.name == name)
            for value in values:
                self._child(name, {label: value})
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

    def _child(self, name: str, labels: dict[str, str]) -> Any:
        key = (name, tuple(labels.items()))
        child = self._children.get(key)
        if child is None:
            family = self._families[name]
            child = family.labels(**labels) if labels else family
            self._children[key] = child
        return child

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        """Add ``value`` to a counter."""
        self._child(name, labels).inc(value)

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge."""
        self._child(name, labels).set(value)
        also = OBSERVED_WITH.get(name)
        if also is not None:
            self._child(also, labels).observe(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Record one observation in a histogram."""
        self._child(name, labels).observe(value)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a counter or gauge (0 when never set)."""
        found: float | None = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    def total(self, name: str) -> float:
        """Sum of a counter over all its labels."""
        return float(
            sum(
                sample.value
                for family in self._families[name].collect()
                for sample in family.samples
                if sample.name == name
            )
        )

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics if ``accept`` asks) and its
        Content-Type."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


metrics = Metrics(process=True)
