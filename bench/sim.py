"""The simulator in its own process (``python -m worker simulate``) and its ``/_sim/`` controls."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from convsync_tools.simdata import DEMO_ACCOUNT_SID, DEMO_AUTH_TOKEN

REPO = Path(__file__).resolve().parents[1]
_LISTENING = re.compile(r"simulator listening on (\S+)")


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds (user + system) a process had used at ``at`` (monotonic)."""

    at: float
    cpu: float

    def utilisation(self, later: CpuSample) -> float:
        """Cores used on average between this sample and ``later`` (1.0 = one core busy)."""
        return (later.cpu - self.cpu) / max(1e-9, later.at - self.at)


def process_cpu(pid: int) -> CpuSample:
    """CPU seconds used so far by ``pid`` (from /proc; 0 where /proc is missing)."""
    now = time.monotonic()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return CpuSample(now, 0.0)
    ticks = os.sysconf("SC_CLK_TCK")
    return CpuSample(now, (int(fields[11]) + int(fields[12])) / ticks)


def machine_busy() -> CpuSample:
    """CPU seconds all cores have spent busy so far (from /proc/stat)."""
    now = time.monotonic()
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return CpuSample(now, 0.0)
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return CpuSample(now, (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"))


def postgres_cpu() -> CpuSample:
    """CPU seconds used by every local ``postgres`` process, live or reaped (a postmaster's
    ``cutime``/``cstime`` hold its exited backends); 0 for a remote server."""
    now = time.monotonic()
    found: dict[int, tuple[int, int, int]] = {}  # pid: (parent, own ticks, reaped children's)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, _, rest = text.partition(" (")[2].rpartition(")")
        if name in ("postgres", "postmaster"):
            f = rest.split()
            found[int(stat.parent.name)] = (
                int(f[1]),
                int(f[11]) + int(f[12]),
                int(f[13]) + int(f[14]),
            )
    ticks = sum(
        own + (reaped if parent not in found else 0) for parent, own, reaped in found.values()
    )
    return CpuSample(now, ticks / os.sysconf("SC_CLK_TCK"))


def peak_rss_kb(pid: int) -> int:
    """``pid``'s peak resident set (VmHWM) so far, in KiB; 0 once it is gone. (A child's
    ``ru_maxrss`` is no use here: Linux counts in it the parent's resident set at fork.)"""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_wait(pid: int) -> float:
    """Seconds ``pid``'s live threads have spent runnable but waiting for a CPU (the run-queue
    wait: the second field of ``/proc/<pid>/task/<tid>/schedstat``); 0 where /proc has none."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:  # gone, or no /proc
        return 0.0
    waited = 0
    for thread in threads:
        try:
            waited += int(Path(f"/proc/{pid}/task/{thread}/schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):  # a thread that ended meanwhile
            continue
    return waited / 1e9


@dataclass(frozen=True)
class BackendTimes:
    """A PostgreSQL backend's CPU seconds so far, and its seconds waiting for a CPU."""

    cpu: float
    waited: float


def database_backends(database: str) -> dict[int, BackendTimes]:
    """Each live PostgreSQL backend connected to ``database`` (found by its process title,
    ``postgres: ... user database host(port) state``), by pid: its times so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[int, BackendTimes] = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            title = cmdline.read_bytes()
            if not title.startswith(b"postgres:") or f" {database} ".encode() not in title:
                continue
            fields = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(cmdline.parent.name)
        found[pid] = BackendTimes((int(fields[11]) + int(fields[12])) / ticks, cpu_wait(pid))
    return found


class SimProcess:
    """``python -m worker simulate`` serving ``users`` users at ``latency_ms``, on a free port
    (``derive``: its dataset derived before it listens, ``--derive``)."""

    def __init__(
        self,
        users: int,
        latency_ms: float,
        services: int = 1,
        seed: int = 1,
        *,
        derive: bool = False,
    ) -> None:
        self.users = users
        self.latency_ms = latency_ms
        self.services = services
        self.seed = seed
        self.derive = derive
        self.account_sid = DEMO_ACCOUNT_SID
        self.auth_token = DEMO_AUTH_TOKEN
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("simulator not started")
        return self._proc.pid

    def __enter__(self) -> SimProcess:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "simulate", "--port", "0",
             "--seed", str(self.seed), "--services", str(self.services),
             "--users", str(self.users), "--latency-ms", str(self.latency_ms),
             *(["--derive"] if self.derive else [])],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )  # fmt: skip
        assert self._proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self._proc.stdout.readline()
            if not line:
                break
            match = _LISTENING.search(line)
            if match:
                self.url = match.group(1)
                return self
        self.close()
        raise RuntimeError("the simulator did not start (python -m worker simulate)")

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the simulator (SIGTERM, then SIGKILL after 5 s)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # -- /_sim/ controls ----------------------------------------------------------------------

    def _control(self, name: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.url}/_sim/{name}", data=data, method="GET" if body is None else "POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            result: dict[str, Any] = json.loads(response.read())
        return result

    def configure(self, **knobs: Any) -> dict[str, Any]:
        """Set simulator knobs (``SimulatorConfig`` fields); the config in force."""
        return self._control("config", knobs)

    def stats(self) -> dict[str, Any]:
        """``GET /_sim/stats``, without the per-page lists (they grow with the dataset)."""
        stats = self._control("stats?pages=false")
        stats.pop("pages", None)
        stats.pop("pages_ok", None)
        return stats

    def reset_stats(self) -> None:
        self._control("reset_stats", {})

    def cpu(self) -> CpuSample:
        return process_cpu(self.pid)


def count(stats: dict[str, Any], status: int) -> int:
    """Requests answered ``status`` in a stats snapshot."""
    return int(stats.get("by_status", {}).get(str(status), 0))
