"""convsync end to end: ``python -m worker migrate`` then ``python -m worker sync`` as children;
and the floor (``python -m bench.floor``: convsync's client alone, no database), timed alike.

Figures come from three independent places: the child's own rusage (``os.wait4``: peak RSS,
CPU seconds), the ``sync_runs`` row the pass recorded (seconds, rows), and the simulator's
``/_sim/stats`` (requests by status, in-flight requests, time-weighted).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from bench.ceiling import WalkResult
from bench.sim import (
    REPO,
    BackendTimes,
    SimProcess,
    count,
    cpu_wait,
    database_backends,
    machine_busy,
    peak_rss_kb,
    postgres_cpu,
)

# What the bench reads of the child's pass_finished line: its limiter, its group commit (and
# its CPU over the pass, ``SyncRun.pass_cpu_seconds``).
LIMITER_KEYS = ("concurrency_limit", "limit_decreases", "limit_probes", "limiter_slot_seconds")
WRITER_KEYS = ("writer_batches", "writer_pages", "writer_busy_seconds")
# The interpreter of the worker's children: the environment ./dev bench makes with the image's
# runtime lock alone (the worker comes from the checkout, their working directory), else this
# one. The benchmark's own extras bring rich, which structlog imports when it is installed.
WORKER_PYTHON = os.environ.get("CONVSYNC_BENCH_WORKER_PYTHON") or sys.executable
# While the child runs: its peak RSS (VmHWM, a kernel high-water mark: a sample misses only
# what it grew in its last interval before exiting) and its exit, every SAMPLE_SECONDS; its
# database's backends (a scan of /proc), every BACKENDS_SECONDS. The sampling is a process
# beside the pass on its cores, which the ceiling's walks have not: kept rare (at 200 Hz it took
# about 2% of a core), its own CPU reported (``sampler_cpu_seconds``).
SAMPLE_SECONDS = 0.05
BACKENDS_SECONDS = 0.25


def _own_cpu() -> float:
    """This (the benchmark's) process's CPU seconds so far, every thread's."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class InFlight:
    """Requests in flight at the simulator over the pass's active window (the simulator's own
    account: its first request to the end of its last), and over the whole run since the stats
    reset."""

    window_avg: float = 0.0
    window_seconds: float = 0.0
    run_avg: float = 0.0
    max: int = 0


@dataclass
class SyncRun:
    """One ``convsync sync`` child process and what it did."""

    users: int
    concurrency: int
    exit_code: int
    wall_seconds: float  # process start to exit (imports, connect, migrations check included)
    pass_seconds: float  # sync_runs.finished_at - started_at
    peak_rss_mb: float
    cpu_seconds: float
    sim_cpu_cores: float  # the simulator process's CPU use over the run, in cores
    sim_wait_seconds: float  # the simulator's time waiting for a CPU over the run
    postgres_cpu_cores: float  # every local postgres process (other users' too), in cores
    postgres_backend_cpu_seconds: float  # the pass's own database's backends (sampled /proc)
    # Seconds runnable but waiting for a CPU (run-queue wait, each thread's schedstat): the
    # child's (sampled every 0.25 s until it exits), and its database's backends'.
    cpu_wait_seconds: float
    postgres_backend_wait_seconds: float
    commits: int  # transactions committed in the pass's database (pg_stat_database)
    machine_busy_cores: float  # all processes on the machine, in cores
    requests: int
    pages_ok: int  # API pages answered 200 (services, users, conversations)
    answered_429: int
    in_flight: InFlight
    summary: dict[str, Any] = field(default_factory=dict)
    stderr_tail: str = ""
    profile: dict[str, Any] | None = None
    limiter: dict[str, float] = field(default_factory=dict)  # from the pass_finished log line
    writer: dict[str, int | float] = field(default_factory=dict)  # its group commit, likewise
    pass_cpu_seconds: float | None = None  # the child's CPU over the pass alone, likewise
    sampler_cpu_seconds: float = 0.0  # the benchmark's own CPU while it sampled the child

    @property
    def pages_per_second(self) -> float:
        return self.pages_ok / self.pass_seconds if self.pass_seconds else 0.0

    def _ms_per_page(self, seconds: float) -> float:
        return 1000 * seconds / self.pages_ok if self.pages_ok else 0.0

    @property
    def cpu_ms_per_page(self) -> float:
        return self._ms_per_page(self.cpu_seconds)

    @property
    def postgres_ms_per_page(self) -> float:
        return self._ms_per_page(self.postgres_backend_cpu_seconds)

    @property
    def cpu_wait_ms_per_page(self) -> float:
        return self._ms_per_page(self.cpu_wait_seconds)

    @property
    def sim_wait_ms_per_page(self) -> float:
        return self._ms_per_page(self.sim_wait_seconds)

    @property
    def postgres_wait_ms_per_page(self) -> float:
        return self._ms_per_page(self.postgres_backend_wait_seconds)

    @property
    def commits_per_page(self) -> float:
        return self.commits / self.pages_ok if self.pages_ok else 0.0

    @property
    def rows(self) -> int:
        s = self.summary
        return int(
            s.get("rows_inserted", 0) + s.get("rows_updated", 0) + s.get("rows_unchanged", 0)
        )

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.pass_seconds if self.pass_seconds else 0.0

    @property
    def share_429(self) -> float:
        return self.answered_429 / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            pages_per_second=self.pages_per_second,
            rows=self.rows,
            rows_per_second=self.rows_per_second,
            share_429=self.share_429,
            cpu_ms_per_page=self.cpu_ms_per_page,
            postgres_ms_per_page=self.postgres_ms_per_page,
            cpu_wait_ms_per_page=self.cpu_wait_ms_per_page,
            postgres_wait_ms_per_page=self.postgres_wait_ms_per_page,
            sim_wait_ms_per_page=self.sim_wait_ms_per_page,
            commits_per_page=self.commits_per_page,
        )
        return out


def child_env(sim: SimProcess, db_url: str | None, concurrency: int) -> dict[str, str]:
    """The environment of a convsync child: only what it needs, plus PATH and the like (no
    DATABASE_URL when ``db_url`` is None)."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k in keep}
    if db_url is not None:
        env["DATABASE_URL"] = db_url
    env.update(
        TWILIO_ACCOUNT_SID=sim.account_sid,
        TWILIO_AUTH_TOKEN=sim.auth_token,
        TWILIO_CONVERSATIONS_BASE_URL=sim.url,
        CONVSYNC_CONCURRENCY=str(concurrency),
        CONVSYNC_LOG_FORMAT="json",
    )
    return env


def migrate(env: Mapping[str, str]) -> None:
    """``python -m worker migrate``; raises with its stderr on failure."""
    done = subprocess.run(
        [WORKER_PYTHON, "-m", "worker", "migrate"],
        env=dict(env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"convsync migrate failed ({done.returncode}): {done.stderr[-2000:]}")


async def commits(db_url: str) -> int:
    """Transactions committed so far in ``db_url``'s database."""
    conn = await asyncpg.connect(db_url)
    try:
        value = await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
    finally:
        await conn.close()
    return int(value or 0)


async def last_pass(db_url: str) -> dict[str, Any]:
    """The newest ``sync_runs`` row, with its duration in seconds."""
    conn = await asyncpg.connect(db_url)
    try:
        row = await conn.fetchrow(
            """SELECT run_id, status, users_synced, users_failed, users_gone, pages,
                      rows_inserted, rows_updated, rows_unchanged, rows_removed, rows_quarantined,
                      extract(epoch FROM finished_at - started_at)::float8 AS seconds
               FROM sync_runs ORDER BY run_id DESC LIMIT 1"""
        )
    finally:
        await conn.close()
    return dict(row) if row is not None else {}


def run_sync(
    sim: SimProcess,
    db_url: str,
    concurrency: int,
    *,
    extra_env: Mapping[str, str] | None = None,
    profile_to: Path | None = None,
    cprofile_to: Path | None = None,
    log_to: Path | None = None,
    timeout: float = 1800,
) -> SyncRun:
    """Migrate ``db_url``, then run one ``convsync sync`` pass against ``sim`` and measure it.

    ``extra_env``: more variables for the child (e.g. CONVSYNC_DB_POOL_SIZE). ``profile_to``:
    attach py-spy to the child and write its raw (collapsed) stacks there. ``cprofile_to``: run
    the child under cProfile (CPU time) instead, dumping its stats there.
    """
    import asyncio

    env = {**child_env(sim, db_url, concurrency), **(extra_env or {})}
    migrate(env)
    database = urlsplit(db_url).path.lstrip("/")
    backends: dict[int, BackendTimes] = {}  # each backend's, as last sampled
    commits_before = asyncio.run(commits(db_url))
    sim.reset_stats()
    started = time.monotonic()
    sim_cpu, pg_cpu, busy = sim.cpu(), postgres_cpu(), machine_busy()
    sim_waited = cpu_wait(sim.pid)
    # Logs go to a file: a pipe nobody reads while the pass runs would block the child.
    log_file = open(log_to, "w+b") if log_to else tempfile.TemporaryFile("w+b")  # noqa: SIM115
    try:
        command = ["-m", "worker", "sync"]
        if cprofile_to is not None:
            command = ["-m", "bench.cprofile_child", str(cprofile_to)]
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        proc = subprocess.Popen(
            [WORKER_PYTHON, *command],
            env=env,
            cwd=REPO,
            stdout=log_file,
            stderr=log_file,
        )
        spy: subprocess.Popen[bytes] | None = None
        spy_pending = profile_to is not None
        deadline = started + timeout
        next_backends = started
        peak_kb = 0
        waited = 0.0
        sampler_before = _own_cpu()
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                now = time.monotonic()
                if now > deadline:
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                if now >= next_backends:
                    backends.update(database_backends(database))
                    # The most seen: a thread that ends takes its own wait out of the sum.
                    waited = max(waited, cpu_wait(proc.pid))
                    next_backends = now + BACKENDS_SECONDS
                peak_kb = max(peak_kb, peak_rss_kb(proc.pid))
                if spy_pending and profile_to and (sim.stats()["requests"] or now > started + 2):
                    spy, spy_pending = _attach_py_spy(proc.pid, profile_to), False  # under way
                time.sleep(SAMPLE_SECONDS)
        except BaseException:
            proc.kill()  # the sampling failed: the pass is not left running behind
            proc.wait()
            raise
        sampler_cpu = _own_cpu() - sampler_before
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        log_file.seek(max(0, log_file.seek(0, os.SEEK_END) - 4000))
        stderr = log_file.read().decode(errors="replace")
    finally:
        log_file.close()
    sim_cpu_cores = sim_cpu.utilisation(sim.cpu())
    sim_waited = cpu_wait(sim.pid) - sim_waited
    pg_cores, busy_cores = pg_cpu.utilisation(postgres_cpu()), busy.utilisation(machine_busy())
    stats = sim.stats()
    if spy is not None:
        spy.wait(60)
    summary = asyncio.run(last_pass(db_url))
    committed = asyncio.run(commits(db_url)) - commits_before - 1  # less the sampling's own
    run = SyncRun(
        users=sim.users,
        concurrency=concurrency,
        exit_code=proc.returncode,
        wall_seconds=wall,
        pass_seconds=float(summary.get("seconds") or wall),
        peak_rss_mb=peak_kb / 1024,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        sim_cpu_cores=sim_cpu_cores,
        sim_wait_seconds=sim_waited,
        postgres_cpu_cores=pg_cores,
        postgres_backend_cpu_seconds=sum(b.cpu for b in backends.values()),
        cpu_wait_seconds=waited,
        postgres_backend_wait_seconds=sum(b.waited for b in backends.values()),
        commits=committed,
        machine_busy_cores=busy_cores,
        requests=int(stats["requests"]),
        pages_ok=count(stats, 200),
        answered_429=count(stats, 429),
        in_flight=InFlight(
            float(stats["active_avg_in_flight"]),
            float(stats["active_seconds"]),
            float(stats["avg_in_flight"]),
            int(stats["max_in_flight"]),
        ),
        summary=summary,
        stderr_tail=stderr[-2000:] if proc.returncode else "",
        sampler_cpu_seconds=sampler_cpu,
    )
    finished = _pass_finished(stderr)
    run.limiter = {k: finished[k] for k in LIMITER_KEYS if k in finished}
    run.writer = {k: finished[k] for k in WRITER_KEYS if k in finished}
    run.pass_cpu_seconds = finished.get("cpu_seconds")
    if profile_to is not None and profile_to.exists():
        from bench.profile import summarise

        run.profile = summarise(profile_to)
    if cprofile_to is not None and cprofile_to.exists():
        from bench.profile import summarise_cprofile

        run.profile = summarise_cprofile(cprofile_to)
    return run


@dataclass(frozen=True)
class FloorRun:
    """The floor's child process: its walk, and its CPU as ``os.wait4`` counts it."""

    walk: WalkResult
    cpu_seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            **self.walk.__dict__,
            "pages_per_second": self.walk.pages_per_second,
            "cpu_seconds": self.cpu_seconds,
            "cpu_ms_per_page": 1000 * self.cpu_seconds / max(1, self.walk.pages),
        }


def run_floor(sim: SimProcess, concurrency: int, timeout: float = 600) -> FloorRun:
    """``python -m bench.floor`` against ``sim``, with the worker's interpreter and settings;
    RuntimeError if it fails, or is killed after ``timeout`` seconds."""
    env = child_env(sim, None, concurrency)
    with tempfile.TemporaryFile("w+b") as out, tempfile.TemporaryFile("w+b") as err:
        proc = subprocess.Popen(
            [WORKER_PYTHON, "-m", "bench.floor"], env=env, cwd=REPO, stdout=out, stderr=err
        )
        deadline = time.monotonic() + timeout
        try:
            while not (waited := os.wait4(proc.pid, os.WNOHANG))[0]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the floor's walk took more than {timeout:g}s")
                time.sleep(0.05)
        except BaseException:
            proc.kill()
            waited = os.wait4(proc.pid, 0)
            raise
        finally:
            proc.returncode = os.waitstatus_to_exitcode(waited[1])
        out.seek(0)
        err.seek(0)
        printed, logged = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    try:
        if proc.returncode != 0:
            raise ValueError(f"exit {proc.returncode}")
        walked = WalkResult(**json.loads(printed))
    except (ValueError, TypeError) as error:
        raise RuntimeError(f"the floor's walk failed ({error}): {logged[-2000:]}") from None
    usage = waited[2]
    return FloorRun(walked, usage.ru_utime + usage.ru_stime)


def _pass_finished(log_tail: str) -> dict[str, Any]:
    """The child's ``pass_finished`` JSON line (the concurrency limit where the pass left it,
    its cuts, probes and slot-seconds, its group commit's batches and busy seconds); empty when
    the tail holds none."""
    for line in reversed(log_tail.splitlines()):
        if '"pass_finished"' not in line:
            continue
        try:
            event: dict[str, Any] = json.loads(line)
        except ValueError:
            continue
        return event
    return {}


def _attach_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy sampling ``pid`` at 200 Hz into ``out`` (raw stacks); None without py-spy."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        return None
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
         "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
