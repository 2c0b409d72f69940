"""Summaries of py-spy's raw (collapsed-stack) profiles: where the on-CPU time went."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")
_SITE = re.compile(r".*/(?:site-packages|dist-packages|lib/python3\.\d+)/")


def _short(path: str) -> str:
    path = _SITE.sub("", path)
    marker = "/work/main/"
    return path.split(marker, 1)[1] if marker in path else path


def _frame(raw: str) -> tuple[str, str]:
    """(function as 'func (file)', module bucket) of one collapsed-stack frame."""
    match = _FRAME.match(raw.strip())
    if match is None:
        return raw.strip(), raw.strip()
    file = _short(match["file"])
    top = file.split("/", 1)[0]
    bucket = file if top == "worker" else top.removesuffix(".py")
    return f"{match['func']} ({file})", bucket


def summarise(raw_file: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares of samples per function, and self shares per module."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    total = 0
    for line in raw_file.read_text(errors="replace").splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        samples = int(number)
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += samples
        leaf, bucket = frames[-1]
        self_time[leaf] += samples
        modules[bucket] += samples
        for name in {name for name, _ in frames}:
            inclusive[name] += samples

    def shares(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"name": name, "percent": round(100 * n / total, 1)}
            for name, n in counter.most_common(top)
        ]

    return {
        "file": str(raw_file),
        "samples": total,
        "self": shares(self_time) if total else [],
        "inclusive": shares(inclusive) if total else [],
        "modules_self": shares(modules) if total else [],
    }


def summarise_cprofile(stats_file: Path, top: int = 15) -> dict[str, Any]:
    """Self (tottime) and inclusive (cumtime) CPU shares per function from a cProfile dump."""
    import pstats

    stats: dict[Any, Any] = pstats.Stats(str(stats_file)).stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in stats.values()) or 1e-9
    modules: Counter[str] = Counter()
    rows: list[tuple[str, int, float, float]] = []
    for (file, line, func), (_, calls, tottime, cumtime, _) in stats.items():
        name, bucket = _frame(f"{func} ({file}:{line})")
        modules[bucket] += int(tottime * 1e6)
        rows.append((name, calls, tottime, cumtime))

    def pick(inclusive: bool) -> list[dict[str, Any]]:
        def time_of(row: tuple[str, int, float, float]) -> float:
            return row[3] if inclusive else row[2]

        ranked = sorted(rows, key=time_of, reverse=True)[:top]
        return [{"name": r[0], "calls": r[1], "percent": round(100 * time_of(r) / total, 1)}
                for r in ranked]  # fmt: skip

    return {
        "file": str(stats_file),
        "cpu_seconds": total,
        "self": pick(inclusive=False),
        "inclusive": pick(inclusive=True),
        "modules_self": [
            {"name": name, "percent": round(100 * n / 1e6 / total, 1)}
            for name, n in modules.most_common(top)
        ],
    }
