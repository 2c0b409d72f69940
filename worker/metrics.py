"""In-process counters and gauges, rendered in Prometheus' text format."""

from __future__ import annotations

import time
from collections import defaultdict

Labels = tuple[tuple[str, str], ...]


class Metrics:
    """A small registry: counters and gauges by name and labels."""

    def __init__(self) -> None:
        self.counters: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))
        self.gauges: dict[str, dict[Labels, float]] = defaultdict(dict)
        self.help: dict[str, str] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self.counters[name][tuple(sorted(labels.items()))] += value

    def set(self, name: str, value: float, **labels: str) -> None:
        self.gauges[name][tuple(sorted(labels.items()))] = value

    def value(self, name: str, **labels: str) -> float:
        """Current value of a counter or gauge (0 when never set)."""
        key = tuple(sorted(labels.items()))
        if name in self.counters:
            return self.counters[name].get(key, 0.0)
        return self.gauges.get(name, {}).get(key, 0.0)

    def total(self, name: str) -> float:
        """Sum of a counter over all its labels."""
        return sum(self.counters.get(name, {}).values())

    def render(self) -> str:
        """Prometheus text exposition format."""
        lines: list[str] = []
        for kind, family in (("counter", self.counters), ("gauge", self.gauges)):
            for name in sorted(family):
                if name in self.help:
                    lines.append(f"# HELP {name} {self.help[name]}")
                lines.append(f"# TYPE {name} {kind}")
                for labels, value in sorted(family[name].items()):
                    text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                    number = _number(value)
                    lines.append(f"{name}{{{text}}} {number}" if text else f"{name} {number}")
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """Full precision (a Unix timestamp must not round to the hour), integers without '.0'."""
    value = float(value)  # gauges may be set from ints (3.11's int has no is_integer)
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


metrics = Metrics()
metrics.help.update(
    {
        "convsync_requests_total": "HTTP requests to Twilio by status (or error kind).",
        "convsync_retries_total": "Requests retried, by cause.",
        "convsync_rate_limited_total": "Requests answered 429.",
        "convsync_concurrency_limit": "Current adaptive limit of requests in flight.",
        "convsync_requests_in_flight": "Requests to Twilio in flight now.",
        "convsync_pages_total": "Pages written, by kind.",
        "convsync_rows_total": "Membership rows by outcome.",
        "convsync_users_total": "Users finished, by outcome.",
        "convsync_pass_duration_seconds": "Duration of the last finished pass.",
        "convsync_last_success_timestamp_seconds": "Unix time of the last successful pass.",
        "convsync_passes_total": "Passes finished, by status.",
    }
)


def now() -> float:
    """Wall-clock seconds, for timestamps in metrics."""
    return time.time()
