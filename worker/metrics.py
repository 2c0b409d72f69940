"""The worker's metrics, exposed through prometheus_client.

Every metric is declared once, in ``FAMILIES`` (name, type, help, labels); the code updates them
by name: ``Metrics.inc(name, amount, **labels)``, ``set`` and ``observe``, or, on the hot path,
through a series it looked up once (``Metrics.series`` and ``Metrics.histogram``). ``render``
gives Prometheus' text format, or OpenMetrics when the scraper's ``Accept`` asks for it. The
process-wide registry (``metrics``, served on ``/metrics`` by ``convsync run``) also carries the
standard process and Python collectors; a ``Metrics()`` of one's own (a test, the demo) does
not. Counters expose no ``_created`` series.

The values are kept here, plain numbers, and handed to prometheus_client when scraped (its
custom-collector form); prometheus_client is imported when a registry is first read, so a
process never scraped (``convsync sync``) does not pay for it. Its own metric objects take a
lock for every value they change and walk a histogram's buckets in Python: with every update
switched off, the benchmark's worker spent 3.3% less CPU a page (ten paired passes); kept
here, updates cost about half as much. Updates and scrapes happen on one thread, the event
loop's.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

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
    Family("convsync_writer_busy_seconds_total", "counter",
           "Seconds a group-commit writer was held by its batches (statement, connection wait, "
           "retries), by writer (pass, relist): a rate near 1, that writer is the bottleneck.",
           ("writer",)),
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
# The outcomes convsync_rows_total counts a page's rows by (worker/store.py's PageOutcome).
ROW_OUTCOMES = ("inserted", "updated", "unchanged", "removed", "quarantined")
# Series shown at 0 from the start (they are only ever incremented by what they count).
PRESET = {"convsync_rows_total": ROW_OUTCOMES}
# Setting the gauge of the last pass's duration records the pass in the histogram too.
OBSERVED_WITH = {"convsync_pass_duration_seconds": "convsync_pass_seconds"}


class Series:
    """One counter or gauge series (a family and its label values)."""

    __slots__ = ("_counter", "value")

    def __init__(self, counter: bool) -> None:
        self._counter = counter
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (a counter only goes up)."""
        if amount < 0 and self._counter:
            raise ValueError("a counter only goes up")
        self.value += amount

    def set(self, value: float) -> None:
        """Set a gauge."""
        if self._counter:
            raise ValueError("a counter is not set, only increased")
        self.value = value


class Histogram:
    """One histogram series: the observations per bucket (the last one +Inf; not cumulative)
    and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Record one observation (a bucket counts those at most its bound)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """Per upper bound, as prometheus_client names it, the observations at most it."""
        from prometheus_client.utils import floatToGoString

        bounds = [*map(floatToGoString, self.bounds), "+Inf"]
        return list(zip(bounds, itertools.accumulate(self.counts), strict=True))


class Metrics:
    """Every family of ``FAMILIES``, its series kept here, exposed by a ``CollectorRegistry``
    of its own (``registry``)."""

    def __init__(self, *, process: bool = False) -> None:
        self._process = process
        self._registry: CollectorRegistry | None = None
        self._specs = {f.name: f for f in FAMILIES}
        # per family: its series by label values (in the family's label order)
        self._values: dict[str, dict[tuple[str, ...], Series]] = {}
        self._histograms: dict[str, dict[tuple[str, ...], Histogram]] = {}
        # (name, labels as passed) -> series: a series' labels are checked once
        self._found: dict[tuple[str, tuple[tuple[str, str], ...]], Series | Histogram] = {}
        for spec in FAMILIES:
            (self._histograms if spec.kind == "histogram" else self._values)[spec.name] = {}
            if not spec.labels:
                self._find(spec.name, {})
        for name, values in PRESET.items():
            (label,) = self._specs[name].labels
            for value in values:
                self._find(name, {label: value})

    @property
    def registry(self) -> CollectorRegistry:
        """prometheus_client's registry, made when first read (a scrape, a reading): a process
        never scraped (``convsync sync``) does not import prometheus_client (0.05 G of the 1.47 G
        instructions its imports took, under callgrind)."""
        if self._registry is None:
            self._registry = _registry(self, process=self._process)
        return self._registry

    def _find(self, name: str, labels: dict[str, str]) -> Series | Histogram:
        """The series ``name{labels}``, made on first use; ValueError unless ``labels`` are
        exactly its family's (in any order)."""
        key = (name, tuple(labels.items()))
        found = self._found.get(key)
        if found is None:
            spec = self._specs[name]
            if set(labels) != set(spec.labels):
                raise ValueError(f"{name} takes the labels {spec.labels}, not {tuple(labels)}")
            values = tuple(str(labels[label]) for label in spec.labels)
            if spec.kind == "histogram":
                found = self._histograms[name].setdefault(values, Histogram(spec.buckets))
            else:
                found = self._values[name].setdefault(values, Series(spec.kind == "counter"))
            self._found[key] = found
        return found

    def series(self, name: str, **labels: str) -> Series:
        """A counter's or gauge's series, to update without looking it up again."""
        found = self._find(name, labels)
        if not isinstance(found, Series):
            raise ValueError(f"{name} is a histogram")
        return found

    def histogram(self, name: str, **labels: str) -> Histogram:
        """A histogram's series, to update without looking it up again."""
        found = self._find(name, labels)
        if not isinstance(found, Histogram):
            raise ValueError(f"{name} is not a histogram")
        return found

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        """Add ``value`` to a counter."""
        self.series(name, **labels).inc(value)

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge."""
        self.series(name, **labels).set(value)
        also = OBSERVED_WITH.get(name)
        if also is not None:
            self.histogram(also, **labels).observe(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Record one observation in a histogram."""
        self.histogram(name, **labels).observe(value)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a counter or gauge (0 when never set), read where it is kept (the
        progress line reads some every frame); any other sample (a histogram's ``_count``,
        ``_sum``, ``_bucket``) as prometheus_client exposes it."""
        kept = self._values.get(name)
        if kept is None:
            found: float | None = self.registry.get_sample_value(name, labels)
            return 0.0 if found is None else found
        spec = self._specs[name]
        if set(labels) != set(spec.labels):
            return 0.0  # no series has these labels, as no exposed sample would
        series = kept.get(tuple(str(labels[label]) for label in spec.labels))
        return 0.0 if series is None else series.value

    def total(self, name: str) -> float:
        """Sum of a counter over all its labels."""
        return sum(series.value for series in self._values[name].values())

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics if ``accept`` asks) and its
        Content-Type."""
        from prometheus_client.exposition import choose_encoder

        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type

    def families(self) -> Iterator[Metric]:
        """Every family and its series, as prometheus_client exposes them."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        for spec in FAMILIES:
            labels = list(spec.labels)
            if spec.kind == "histogram":
                histogram = HistogramMetricFamily(spec.name, spec.help, labels=labels)
                for values, distribution in self._histograms[spec.name].items():
                    histogram.add_metric(list(values), distribution.cumulative(), distribution.sum)
                yield histogram
                continue
            make = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
            family = make(spec.name, spec.help, labels=labels)
            for values, series in self._values[spec.name].items():
                family.add_metric(list(values), series.value)
            yield family


def _registry(metrics: Metrics, *, process: bool) -> CollectorRegistry:
    """A registry exposing ``metrics``' families, read when scraped; with ``process``, the
    standard process, platform and garbage collector collectors too."""
    from prometheus_client import (
        CollectorRegistry,
        GCCollector,
        PlatformCollector,
        ProcessCollector,
    )
    from prometheus_client.registry import Collector

    class Exposition(Collector):
        def collect(self) -> Iterator[Metric]:
            return metrics.families()

    registry = CollectorRegistry()
    registry.register(Exposition())
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


metrics = Metrics(process=True)
