"""``python -m bench``: every measurement in one run, a table of figures against the targets,
and the same figures as JSON in ``bench/results/<timestamp>.json``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.ceiling import walk
from bench.convsync_run import WORKER_PYTHON, SyncRun, run_floor, run_sync
from bench.pg import Databases
from bench.sim import REPO, SimProcess, cpu_wait, machine_busy, process_cpu

RESULTS = REPO / "bench" / "results"
# Targets the budget speaks to as well (the others are evaluate's alone).
CEILING_SHARE = 0.9  # end to end pages/s, as a share of the ceiling's
WORKER_CPU_MS = 0.5  # the worker's CPU a page, whole process
NAIVE_TIMES = 50  # end to end pages/s, as a multiple of the naive SDK loop's


@dataclass(frozen=True)
class Target:
    """One target: what is compared, its figure, the bound, and whether it holds."""

    name: str
    value: float | None
    bound: str
    met: bool | None  # None: not measured (skipped)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "target": self.bound, "met": self.met}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    add = parser.add_argument
    add("--quick", action="store_true", help="small sizes for CI (< 60 s)")
    add("--users", type=int, help="users (one service; default 4000, quick 300)")
    add("--latency-ms", type=float, help="simulated latency per request (default 50, quick 10)")
    add("--concurrency", type=int, default=64, help="CONVSYNC_CONCURRENCY (default 64)")
    add("--big-users", type=int, help="users of the second RSS size (default 100000, quick 1000;"
        " 0 skips it)")  # fmt: skip
    add("--mid-users", type=int, help="users of the cost-per-page size (default 40000, quick 600;"
        " 0 skips it)")  # fmt: skip
    add("--hidden-ceiling", type=int, default=32, help="the simulator's K (default 32; 0 skips)")
    add("--k-latency-ms", help="latencies of the hidden-ceiling passes, comma-separated"
        " (default L and 200)")  # fmt: skip
    add("--naive-users", type=int, help="users the SDK loop lists (default 100, quick 20)")
    add("--skip-naive", action="store_true", help="skip the twilio SDK loop")
    add("--skip-dlt", action="store_true", help="skip dlt's rest_api pipeline")
    add(
        "--profile",
        action="store_true",
        help="two extra convsync runs: under py-spy (wall) and cProfile (CPU time), summarised",
    )
    add("--output", type=Path, help="JSON file (default bench/results/<timestamp>.json)")
    add("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    quick = args.quick
    args.users = args.users or (300 if quick else 4000)
    args.latency_ms = args.latency_ms if args.latency_ms is not None else (10.0 if quick else 50.0)
    args.big_users = args.big_users if args.big_users is not None else (1000 if quick else 100_000)
    args.mid_users = args.mid_users if args.mid_users is not None else (600 if quick else 40_000)
    k_latencies = (
        args.k_latency_ms or f"{args.latency_ms:g},{4 * args.latency_ms if quick else 200:g}"
    )
    args.k_latencies = sorted({float(v) for v in str(k_latencies).split(",") if v.strip()})
    args.naive_users = args.naive_users or (20 if quick else 100)
    return args


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    output: Path = args.output or RESULTS / f"{stamp}.json"
    started = time.monotonic()
    results: dict[str, Any] = {
        "timestamp": stamp,
        "config": {
            "users": args.users,
            "latency_ms": args.latency_ms,
            "concurrency": args.concurrency,
            "big_users": args.big_users,
            "mid_users": args.mid_users,
            "hidden_ceiling": args.hidden_ceiling,
            "k_latency_ms": args.k_latencies,
            "naive_users": args.naive_users,
            "quick": args.quick,
        },
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),  # those this process may run on
            "python": platform.python_version(),
            "worker_python": WORKER_PYTHON,
            "worker_commit": _checkout_commit(),
            "platform": platform.platform(),
        },
    }
    dbs = Databases()
    try:
        asyncio.run(_measure(args, dbs, results))
    except BaseException:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({**results, "incomplete": True}, indent=2, default=str))
        say(f"incomplete figures written to {output}")
        raise
    finally:
        try:
            asyncio.run(dbs.drop_all())
        finally:
            dbs.close()  # a server this run started stops, whatever the drops did
    results["seconds"] = time.monotonic() - started
    results["budget"] = budget(results)
    targets = evaluate(args, results)
    results["targets"] = [t.to_json() for t in targets]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(render(args, results, targets))
    print(f"\nfigures written to {output}")
    missed = [t for t in targets if t.met is False]
    return 1 if args.strict and missed else 0


async def _measure(args: argparse.Namespace, dbs: Databases, results: dict[str, Any]) -> None:
    """Every phase, in order; each writes its figures into ``results``."""
    c = args.concurrency
    # Derived before it listens, its records then frozen out of the collector's full passes
    # (convsync_tools/simulator.py): no 30 ms pause of its loop in the passes measured.
    with SimProcess(args.users, args.latency_ms, derive=True) as sim:
        say(f"simulator {sim.url}: {args.users} users, latency {args.latency_ms:g} ms")
        # Warm the simulator's caches first, so the ceiling and convsync meet the same server.
        await walk(sim.url, sim.account_sid, sim.auth_token, c)
        try:
            floor = await asyncio.to_thread(run_floor, sim, c)
        except RuntimeError as error:  # one comparison failing must not lose the others
            results["floor"] = {"skipped": f"failed: {error}"[:300]}
        else:
            results["floor"] = floor.to_json()
            say(f"floor: {floor.walk.pages} pages in {floor.walk.seconds:.2f}s")

        # The ceiling is walked on both sides of the end-to-end pass: the machine's speed
        # drifts within a run, and the pass is compared with the mean of the two walks.
        main_db = await dbs.create("main")
        results["ceiling"] = await _ceiling(sim, c, "ceiling")
        run = await asyncio.to_thread(run_sync, sim, main_db, c)
        results["convsync"] = run.to_json()
        say(f"convsync: {run.pages_ok} pages in {run.pass_seconds:.2f}s, exit {run.exit_code}")
        _check(run, "convsync")
        results["ceiling_again"] = await _ceiling(sim, c, "ceiling again")
        # The same pass again over what it stored: nothing changed upstream, as most of a
        # deployment's passes after its first (figures only: the targets are the first pass's).
        again = await asyncio.to_thread(run_sync, sim, main_db, c)
        results["convsync_unchanged"] = again.to_json()
        say(f"convsync again: {again.pages_ok} pages in {again.pass_seconds:.2f}s")
        _check(again, "convsync (unchanged pass)")

        if args.profile:
            tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"convsync-bench-{stamp_of(results)}"
            raw, pstats_file = tmp.with_suffix(".pyspy"), tmp.with_suffix(".pstats")
            spied = await asyncio.to_thread(
                run_sync, sim, await dbs.create("pyspy"), c, profile_to=raw
            )
            results["profile_pyspy"] = {**(spied.profile or {}), "run": spied.to_json()}
            profiled = await asyncio.to_thread(
                run_sync, sim, await dbs.create("cprofile"), c, cprofile_to=pstats_file
            )
            results["profile_cpu"] = {**(profiled.profile or {}), "run": profiled.to_json()}
            say(f"profiles: {raw} (py-spy raw stacks), {pstats_file} (cProfile, CPU time)")

        if args.skip_naive:
            results["naive"] = {"skipped": "--skip-naive"}
        else:
            results["naive"] = await asyncio.to_thread(_naive, sim, main_db, args.naive_users)

        if args.skip_dlt:
            results["dlt"] = {"skipped": "--skip-dlt"}
        else:
            from bench.dlt_run import run_dlt

            say("dlt rest_api pipeline")
            try:
                results["dlt"] = (await asyncio.to_thread(run_dlt, sim, main_db, c)).to_json()
            except Exception as error:  # one comparison failing must not lose the others
                results["dlt"] = {"skipped": f"failed: {type(error).__name__}: {error}"[:300]}

        results["hidden_ceiling"] = []
        for k_latency in args.k_latencies if args.hidden_ceiling else []:
            sim.configure(concurrency_ceiling=args.hidden_ceiling, latency_ms=k_latency)
            k_db = await dbs.create(f"k{k_latency:g}".replace(".", "_"))
            limited = await asyncio.to_thread(run_sync, sim, k_db, c)
            sim.configure(concurrency_ceiling=0, latency_ms=args.latency_ms)
            results["hidden_ceiling"].append(
                {"k": args.hidden_ceiling, "latency_ms": k_latency, **limited.to_json()}
            )
            say(
                f"K={args.hidden_ceiling} at {k_latency:g} ms: "
                f"{limited.answered_429} of {limited.requests} got 429"
            )

    for key, users in (("mid", args.mid_users), ("big", args.big_users)):
        if not users:
            continue
        with SimProcess(users, args.latency_ms) as other:
            say(f"{users} users")
            if key == "mid":  # warmed as the first size's was: the same server, per page
                warm = await walk(other.url, other.account_sid, other.auth_token, c)
                speed = {"pages_per_second": warm.pages_per_second}
                results["mid_warm_up"] = {**warm.__dict__, **speed}
            run_other = await asyncio.to_thread(run_sync, other, await dbs.create(key), c)
            results[key] = run_other.to_json()
            _check(run_other, f"convsync ({users} users)")


async def _ceiling(sim: SimProcess, concurrency: int, label: str) -> dict[str, Any]:
    """One walk of the bare client (``bench/ceiling.py``) with its CPU and the machine's."""
    sim.reset_stats()
    cpu, busy, own = sim.cpu(), machine_busy(), process_cpu(os.getpid())
    waited, sim_waited = cpu_wait(os.getpid()), cpu_wait(sim.pid)  # the client runs here
    ceiling = await walk(sim.url, sim.account_sid, sim.auth_token, concurrency)
    own_cores = own.utilisation(process_cpu(os.getpid()))
    waited, sim_waited = cpu_wait(os.getpid()) - waited, cpu_wait(sim.pid) - sim_waited
    say(f"{label}: {ceiling.pages} pages in {ceiling.seconds:.2f}s")
    return {
        **ceiling.__dict__,
        "pages_per_second": ceiling.pages_per_second,
        "cpu_ms_per_page": 1000 * own_cores * ceiling.seconds / max(1, ceiling.pages),
        "cpu_wait_ms_per_page": 1000 * waited / max(1, ceiling.pages),
        "sim_wait_ms_per_page": 1000 * sim_waited / max(1, ceiling.pages),
        "sim_cpu_cores": cpu.utilisation(sim.cpu()),
        "machine_busy_cores": busy.utilisation(machine_busy()),
        "sim_stats": sim.stats(),
    }


def ceiling_pages_per_second(r: dict[str, Any]) -> float:
    """The ceiling the end-to-end pass is compared with: the mean of the walks before and
    after it (the first alone in a run that has no second)."""
    walks = [float(r[key]["pages_per_second"]) for key in ("ceiling", "ceiling_again") if key in r]
    return sum(walks) / len(walks)


def stamp_of(results: dict[str, Any]) -> str:
    return str(results["timestamp"])


def _naive(sim: SimProcess, db_url: str, users: int) -> dict[str, Any]:
    try:
        from bench.naive import run_naive

        say(f"naive SDK loop over {users} users")
        return run_naive(sim, db_url, users).to_json()
    except ImportError as error:
        return {"skipped": f"{error} (pip install -e '.[bench]')"}
    except Exception as error:  # one comparison failing must not lose the other figures
        return {"skipped": f"failed: {type(error).__name__}: {str(error)[:300]}"}


def _check(run: SyncRun, what: str) -> None:
    if run.exit_code != 0 or run.summary.get("status") != "succeeded":
        raise SystemExit(f"{what} failed (exit {run.exit_code}):\n{run.stderr_tail}")


def evaluate(args: argparse.Namespace, r: dict[str, Any]) -> list[Target]:
    """The targets, each with its measured figure (None where skipped)."""
    ceiling = ceiling_pages_per_second(r)
    ours = r["convsync"]["pages_per_second"]
    naive, dlt = r.get("naive", {}), r.get("dlt", {})
    big, mid = r.get("big"), r.get("mid")
    rss = r["convsync"]["peak_rss_mb"]
    k = args.hidden_ceiling

    def ratio(key: str, source: dict[str, Any]) -> float | None:
        theirs = source.get(key)
        return ours / theirs if theirs else None

    naive_x, dlt_x = ratio("pages_per_second", naive), ratio("pages_per_second", dlt)
    big_x = big["peak_rss_mb"] / rss if big else None
    mid_x = mid["pages_per_second"] / ours if mid else None
    worker_ms, pg_ms = r["convsync"]["cpu_ms_per_page"], r["convsync"]["postgres_ms_per_page"]
    targets = [
        Target("end to end / ceiling (pages/s)", ours / ceiling, f">= {CEILING_SHARE}",
               ours >= CEILING_SHARE * ceiling),
        Target("worker CPU ms per page", worker_ms, f"<= {WORKER_CPU_MS}",
               worker_ms <= WORKER_CPU_MS),
        Target("PostgreSQL CPU ms per page", pg_ms, "<= 1", pg_ms <= 1.0),
        Target("end to end / naive SDK loop", naive_x, f">= {NAIVE_TIMES}",
               _at_least(naive_x, NAIVE_TIMES)),
        Target("end to end / dlt rest_api", dlt_x, ">= 5", _at_least(dlt_x, 5)),
        Target(f"peak RSS at {args.users} users (MB)", rss, "<= 150", rss <= 150),
        Target(f"peak RSS {args.big_users} / {args.users} users", big_x, "<= 1.2",
               None if big_x is None else big_x <= 1.2),
        Target(f"pages/s {args.mid_users} / {args.users} users", mid_x, ">= 0.9",
               _at_least(mid_x, 0.9)),
    ]  # fmt: skip
    for limited in r.get("hidden_ceiling", []):
        in_flight = limited["in_flight"]["window_avg"]
        where = f"K={k}, L={limited['latency_ms']:g} ms"
        targets += [
            Target(f"avg in flight / K ({where})", None if in_flight is None else in_flight / k,
                   ">= 0.9", None if in_flight is None else in_flight >= 0.9 * k),
            Target(f"share answered 429 ({where})", limited["share_429"], "< 0.02",
                   limited["share_429"] < 0.02),
        ]  # fmt: skip
    return targets


def budget(r: dict[str, Any]) -> dict[str, Any]:
    """What the machine allows at the end-to-end pass's own costs (an estimate, from one run).

    The pass's CPU a page in its three processes: the worker's over the pass alone (its
    ``pass_finished`` line: start-up apart, as pages/s are), its PostgreSQL backends' and the
    simulator's over the child's run (both idle but for the pass). At that cost the machine's
    CPUs give at most ``cpu_bound_pages_per_second``, every core busy all the time: as a share of
    the ceiling (the walks' mean, ``ceiling_pages_per_second``), beside the 0.9 asked. Also the
    floor's CPU a page (the client alone) and the pages/s the naive target asks for, as a share
    of the ceiling. None where a figure is missing.
    """
    s, ceiling, cpus = r["convsync"], ceiling_pages_per_second(r), r["machine"]["cpus"]
    pages, worker_cpu = s["pages_ok"], s.get("pass_cpu_seconds")
    naive = r.get("naive", {}).get("pages_per_second")
    out: dict[str, Any] = {
        "cpu_ms_per_page": None,
        "cpu_bound_pages_per_second": None,
        "cpu_bound_of_ceiling": None,
        "floor_cpu_ms_per_page": r.get("floor", {}).get("cpu_ms_per_page"),
        "naive_target_of_ceiling": NAIVE_TIMES * naive / ceiling if naive and ceiling else None,
    }
    if not pages or worker_cpu is None:
        return out
    cpu = {
        "worker": 1000 * worker_cpu / pages,
        "postgres": s["postgres_ms_per_page"],
        "simulator": 1000 * s["sim_cpu_cores"] * s["wall_seconds"] / pages,
    }
    total = sum(cpu.values())
    out["cpu_ms_per_page"] = {**cpu, "total": total}
    if total > 0 and cpus:
        out["cpu_bound_pages_per_second"] = cpu_bound = 1000 * cpus / total
        out["cpu_bound_of_ceiling"] = cpu_bound / ceiling if ceiling else None
    return out


def _budget_lines(r: dict[str, Any]) -> list[str]:
    """``budget``'s figures, beside the targets they bear on."""
    b = r["budget"]
    lines = ["", "what this machine allows, at this run's costs (an estimate)"]
    cpu = b["cpu_ms_per_page"]
    if cpu is not None and b["cpu_bound_pages_per_second"] is not None:
        share = b["cpu_bound_of_ceiling"]
        lines.append(
            f"  end to end: the pass cost {cpu['total']:.2f} ms of CPU a page (worker "
            f"{cpu['worker']:.2f} over the pass, its PostgreSQL backends {cpu['postgres']:.2f}, "
            f"simulator {cpu['simulator']:.2f}): {r['machine']['cpus']} CPUs give at most "
            f"{b['cpu_bound_pages_per_second']:,.0f} pages/s at that cost"
            + ("" if share is None else f", {share:.2f} of the ceiling")
            + f" (target {CEILING_SHARE})"
        )
    if b["floor_cpu_ms_per_page"] is not None:
        lines.append(
            f"  worker CPU: its Twilio client alone (the floor) costs "
            f"{b['floor_cpu_ms_per_page']:.2f} ms a page, start-up included "
            f"(target {WORKER_CPU_MS} for the whole worker)"
        )
    if b["naive_target_of_ceiling"] is not None:
        lines.append(
            f"  naive: {NAIVE_TIMES}x the SDK loop is {b['naive_target_of_ceiling']:.2f} of the "
            "ceiling"
        )
    return lines


def _at_least(value: float | None, bound: float) -> bool | None:
    return None if value is None else value >= bound


def _writer_note(run: dict[str, Any]) -> str:
    """How busy the group-commit writer was over the pass, and its batches (when logged)."""
    w = run.get("writer") or {}
    if not w.get("writer_batches") or not run["pass_seconds"]:
        return ""
    busy, batches = w["writer_busy_seconds"], w["writer_batches"]
    return (
        f"; its writer busy {busy / run['pass_seconds']:.0%} of the pass, "
        f"{w['writer_pages'] / batches:.1f} pages and {1000 * busy / batches:.1f} ms a batch"
    )


def _limiter_note(run: dict[str, Any]) -> str:
    """Where the pass left the concurrency limit, how often it moved, and how its slots were
    held (when logged)."""
    limiter = run.get("limiter") or {}
    if "concurrency_limit" not in limiter:
        return ""
    return (
        f"; limit {limiter['concurrency_limit']} at the end, "
        f"{limiter.get('limit_decreases', 0)} cuts, {limiter.get('limit_probes', 0)} probes"
        + _slots_note(run)
    )


def _slots_note(run: dict[str, Any]) -> str:
    """How many slots the pass's limiter held on average, and how much of their time the
    simulator counted in flight (a slot is held from before its request is sent until its body
    is read)."""
    held = (run.get("limiter") or {}).get("limiter_slot_seconds")
    if not held or not run["pass_seconds"]:
        return ""
    # The simulator's own count, time-weighted over its active window: its admitted
    # request-seconds (requests it answered 429 are not counted).
    counted = run["in_flight"]["window_avg"] * run["in_flight"]["window_seconds"]
    return (
        f"; its limiter held {held / run['pass_seconds']:.1f} slots on average, "
        f"{counted / held:.0%} of their time counted by the simulator"
    )


def _row(
    label: str, pages: Any, seconds: float, per_second: float, note: str, *, rate_digits: int = 1
) -> tuple[str, str, str, str, str]:
    """A row of the walks' table: pages, seconds and pages/s formatted, then its note."""
    return (label, _num(pages), _num(seconds, 2), _num(per_second, rate_digits), note)


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def _checkout_commit() -> str | None:
    """The commit of the worker's code measured (its checkout's HEAD), "-dirty" when
    ``worker/`` or ``migrations/`` has uncommitted changes; None outside a git checkout."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=REPO, capture_output=True, text=True,
            timeout=10, check=True,
        )  # fmt: skip
        return done.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "worker", "migrations")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if changed else head


def render(args: argparse.Namespace, r: dict[str, Any], targets: list[Target]) -> str:
    """The figures and the targets as plain-text tables."""
    cfg = r["config"]
    lines = [
        f"convsync benchmark: {cfg['users']:,} users, L = {cfg['latency_ms']:g} ms, "
        f"CONVSYNC_CONCURRENCY = {cfg['concurrency']}, {r['machine']['cpus']} CPUs, "
        f"{r['seconds']:.0f} s in all, worker at {r['machine'].get('worker_commit') or 'unknown'}",
        "",
    ]
    rows: list[tuple[str, str, str, str, str]] = [("", "pages", "seconds", "pages/s", "notes")]
    c = r["ceiling"]
    rows.append(
        _row(
            "ceiling (bare aiohttp)",
            c["pages"],
            c["seconds"],
            c["pages_per_second"],
            f"client {c['cpu_ms_per_page']:.2f} ms CPU/page, waited "
            f"{c['cpu_wait_ms_per_page']:.2f} ms/page for a CPU; simulator "
            f"{c['sim_cpu_cores']:.2f} cores, waited {c['sim_wait_ms_per_page']:.2f} ms/page; "
            f"machine {c['machine_busy_cores']:.2f} busy",
        )
    )
    again = r.get("ceiling_again")
    if again:
        rows.append(
            _row(
                "ceiling again, after convsync",
                again["pages"],
                again["seconds"],
                again["pages_per_second"],
                f"client {again['cpu_ms_per_page']:.2f} ms CPU/page; convsync is compared with "
                f"the mean of the two walks: {ceiling_pages_per_second(r):,.1f} pages/s",
            )
        )
    f = r.get("floor")
    if f and "skipped" in f:
        rows.append(("floor: convsync's client, no db", "-", "-", "-", f["skipped"]))
    elif f:
        rows.append(
            _row(
                "floor: convsync's client, no db",
                f["pages"],
                f["seconds"],
                f["pages_per_second"],
                f"its Twilio client and page checks alone, in a process timed as convsync's: "
                f"{f['cpu_ms_per_page']:.2f} ms CPU/page",
            )
        )
    s = r["convsync"]
    rows.append(
        _row(
            "convsync end to end",
            s["pages_ok"],
            s["pass_seconds"],
            s["pages_per_second"],
            f"{s['rows']:,} rows, {s['rows_per_second']:,.0f} rows/s; process "
            f"{s['wall_seconds']:.2f}s wall, {s['cpu_ms_per_page']:.2f} ms CPU/page; "
            f"its PostgreSQL backends {s['postgres_ms_per_page']:.2f} ms CPU/page, "
            f"{s['commits_per_page']:.3f} commits/page{_writer_note(s)}; waited for a CPU: "
            f"the process {s['cpu_wait_ms_per_page']:.2f} ms/page, its backends "
            f"{s['postgres_wait_ms_per_page']:.2f}, the simulator "
            f"{s['sim_wait_ms_per_page']:.2f}; "
            f"postgres {s['postgres_cpu_cores']:.2f}, simulator {s['sim_cpu_cores']:.2f}, "
            f"machine {s['machine_busy_cores']:.2f} busy cores (the benchmark's sampling "
            f"{s.get('sampler_cpu_seconds', 0.0):.2f} s of CPU); in flight "
            f"{_num(s['in_flight']['window_avg'])} avg, {s['in_flight']['max']} max"
            + _slots_note(s),
        )
    )
    u = r.get("convsync_unchanged")
    if u:
        rows.append(
            _row(
                "convsync, an unchanged pass",
                u["pages_ok"],
                u["pass_seconds"],
                u["pages_per_second"],
                f"the same pass again: {u['summary'].get('rows_unchanged', 0):,} rows "
                f"unchanged; {u['cpu_ms_per_page']:.2f} ms CPU/page; its PostgreSQL backends "
                f"{u['postgres_ms_per_page']:.2f} ms CPU/page, "
                f"{u['commits_per_page']:.3f} commits/page",
            )
        )
    n = r.get("naive", {})
    if "skipped" in n:
        rows.append(("naive: twilio SDK + row upserts", "-", "-", "-", f"skipped: {n['skipped']}"))
    else:
        rows.append(
            _row(
                "naive: twilio SDK + row upserts",
                n["pages"],
                n["seconds"],
                n["pages_per_second"],
                f"{n['users']} users, {n['rows']:,} rows (a subset; rate per page "
                f"extrapolates: {s['pages_ok'] / n['pages_per_second']:,.0f} s for all)",
                rate_digits=2,
            )
        )
    d = r.get("dlt", {})
    if d.get("skipped"):
        rows.append(("dlt rest_api (merge)", "-", "-", "-", f"skipped: {d['skipped']}"))
    else:
        steps = ", ".join(f"{k} {v:.1f}s" for k, v in d["steps"].items())
        rows.append(
            _row(
                "dlt rest_api (merge)",
                d["pages"],
                d["seconds"],
                d["pages_per_second"],
                f"{d['workers']} workers; {steps}; peak RSS {d['peak_rss_mb']:.0f} MB",
            )
        )
    lines += _table(rows)
    lines.append("")
    mem: list[tuple[str, str, str, str, str]] = [("", "users", "peak RSS MB", "pages/s", "notes")]
    mem.append(
        ("convsync", _num(s["users"]), _num(s["peak_rss_mb"]), _num(s["pages_per_second"]), "")
    )
    for key in ("mid", "big"):
        other = r.get(key)
        if other:
            mem.append(
                (
                    f"convsync ({key})",
                    _num(other["users"]),
                    _num(other["peak_rss_mb"]),
                    _num(other["pages_per_second"]),
                    f"{other['pages_ok']:,} pages, {other['rows']:,} rows in "
                    f"{other['pass_seconds']:.1f}s; {other['cpu_ms_per_page']:.2f} ms CPU/page,"
                    f" PostgreSQL {other['postgres_ms_per_page']:.2f} ms/page",
                )
            )
    lines += _table(mem)
    limited = r.get("hidden_ceiling") or []
    if limited:
        lines.append("")
        lines += _table([("", "requests", "answered 429", "avg in flight", "notes")] + [
            (f"hidden ceiling K={k['k']}, C={cfg['concurrency']}, L={k['latency_ms']:g} ms",
             _num(k["requests"]),
             f"{k['answered_429']:,} ({100 * k['share_429']:.2f}%)",
             _num(k["in_flight"]["window_avg"], 2),
             f"max {k['in_flight']['max']}; whole run {k['in_flight']['run_avg']:.2f}; "
             f"{k['pages_per_second']:,.0f} pages/s"
             + _limiter_note(k))
            for k in limited
        ])  # fmt: skip
    lines.append("")
    lines += _table(
        [("target", "value", "bound", "verdict", "")]
        + [(t.name, _num(t.value, 2), t.bound, _verdict(t.met), "") for t in targets]
    )
    lines += _budget_lines(r)
    p = r.get("profile_pyspy")
    if p and p.get("samples"):
        lines += ["", f"py-spy ({p['samples']} samples, running or waiting for a CPU): self"]
        lines += [f"  {e['percent']:5.1f}%  {e['name']}" for e in p["self"][:10]]
    p = r.get("profile_cpu")
    if p and p.get("self"):
        lines += ["", f"cProfile ({p['cpu_seconds']:.1f} CPU s): self CPU time by module"]
        lines += [f"  {e['percent']:5.1f}%  {e['name']}" for e in p["modules_self"][:12]]
        lines += ["self CPU time by function"]
        lines += [f"  {e['percent']:5.1f}%  {e['name']}" for e in p["self"][:12]]
        lines += ["inclusive CPU time by function"]
        lines += [f"  {e['percent']:5.1f}%  {e['name']}" for e in p["inclusive"][:15]]
    return "\n".join(lines)


def _verdict(met: bool | None) -> str:
    return {True: "pass", False: "MISS", None: "skipped"}[met]


def _table(rows: list[tuple[str, str, str, str, str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    out = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in (1, 2, 3)]
        out.append("  ".join([*cells, row[4]]).rstrip())
    return out
