"""The image test (``./dev image-test``, run by ``.ci/run``): build the image and run it for real.

Steps, each timed and reported (JSON report and one verdict line last):
  1. podman (Debian's packages; CI installs them, elsewhere the test skips without podman) and
     podman-compose (PyPI, pinned, in a tool venv);
  2. the stand-in base: Debian bookworm (Python 3.11) built with mmdebstrap, cached under
     /var/tmp/convsync-image keyed by its inputs (and the ISO week, for security updates);
  3. the project's Dockerfile, unmodified but for ``--build-arg BASE``, docker format (the OCI
     format drops HEALTHCHECK), the host's CA bundle given as a build secret, never baked in;
  4. against the local PostgreSQL and the simulator (from the same image): migrate twice,
     ``run`` until a pass succeeds, /healthz /readyz /metrics, the HEALTHCHECK of every command,
     SIGTERM mid-pass (exit 0 within the grace, in-flight pages committed, the pass interrupted,
     a following ``sync`` continues it), read-only with every capability dropped as uid 10001 and
     as an arbitrary uid, ``migrate`` and ``sync`` stopped while the database never answers, and
     ``podman-compose -f deploy/compose.yaml config``.

Knobs: CONVSYNC_IMAGE_FRESH=1 rebuilds the base and the image without any cache;
CONVSYNC_IMAGE_REPORT=path (default /var/tmp/convsync-image/report.json). This host lacks
CAP_SYS_RESOURCE and has hybrid cgroups: every podman call gets explicit ulimits and runc.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import yaml

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CONVSYNC_IMAGE_CACHE", "/var/tmp/convsync-image"))
REPORT = Path(os.environ.get("CONVSYNC_IMAGE_REPORT", str(CACHE / "report.json")))
FRESH = os.environ.get("CONVSYNC_IMAGE_FRESH", "") == "1"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
ADMIN_DB = os.environ.get("CONVSYNC_IMAGE_DB", "postgresql://root@127.0.0.1:5432/postgres")
IMAGE = "localhost/convsync:image-test"
APT_PACKAGES = ["podman", "runc", "mmdebstrap", "uidmap", "fuse-overlayfs", "slirp4netns"]
PODMAN_COMPOSE = "podman-compose==1.6.0"
# The stand-in base: Debian bookworm ships CPython 3.11 (the official image builds 3.11.x
# itself into /usr/local); `python` on PATH as in the official image.
SUITE = "bookworm"
MIRRORS = [
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
]
BASE_PACKAGES = ["python3.11", "python3.11-venv", "ca-certificates"]
BASE_HOOK = 'ln -sf /usr/bin/python3.11 "$1/usr/local/bin/python"'
EXCLUDES = ["/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*"]
ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
"""
ACCOUNT_SID = "AC" + "1" * 32
GRACE = 20  # CONVSYNC_SHUTDOWN_GRACE of the SIGTERM check
CONCURRENCY = 8


# --- report ---------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    seconds: float
    detail: str = ""


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @contextlib.contextmanager
    def check(self, name: str) -> Iterator[dict[str, Any]]:
        """Time one check; an exception (or AssertionError) fails it, the run goes on."""
        notes: dict[str, Any] = {}
        started = time.monotonic()
        try:
            yield notes
        except Exception as error:  # report every failure, then the verdict
            self._add(name, False, started, f"{type(error).__name__}: {error}"[:600], notes)
        else:
            self._add(name, True, started, notes.pop("detail", ""), notes)

    def _add(self, name: str, ok: bool, started: float, detail: str, notes: dict[str, Any]) -> None:
        seconds = round(time.monotonic() - started, 2)
        self.checks.append(Check(name, ok, seconds, detail))
        self.figures.update({f"{name}.{k}": v for k, v in notes.items()})
        print(f"[{'ok' if ok else 'FAIL':>4}] {name} ({seconds:.2f} s) {detail}", flush=True)

    def write(self) -> None:
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        body = {"checks": [c.__dict__ for c in self.checks], "figures": self.figures}
        REPORT.write_text(json.dumps(body, indent=2, default=str) + "\n", encoding="utf-8")


# --- processes ------------------------------------------------------------------------------


def run(
    argv: list[str], *, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    if check and done.returncode != 0:
        tail = (done.stdout[-800:] + done.stderr[-1500:]).strip()
        raise AssertionError(f"{' '.join(argv[:4])}... exit {done.returncode}: {tail}")
    return done


def podman(
    *args: str, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return run(["podman", *args], timeout=timeout, check=check)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120, every: float = 0.1) -> Any:
    """Poll ``check`` until it is truthy (bounded): a condition, never a guessed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def http(url: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


# --- database -------------------------------------------------------------------------------


def db_url(name: str) -> str:
    return ADMIN_DB.rsplit("/", 1)[0] + "/" + name


def sql(url: str, query: str, *args: Any) -> Any:
    async def go() -> Any:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return await conn.fetchval(query, *args)
        finally:
            await conn.close()

    return asyncio.run(go())


class Databases:
    """Fresh databases on the local PostgreSQL, dropped at the end."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def create(self, label: str) -> str:
        name = f"convsync_image_{label}_{secrets.token_hex(3)}"
        sql(ADMIN_DB, f'CREATE DATABASE "{name}"')
        self.names.append(name)
        return db_url(name)

    def drop_all(self) -> None:
        for name in self.names:
            with contextlib.suppress(Exception):
                sql(ADMIN_DB, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Unresponsive:
    """A TCP server that accepts connections and never answers (a hung database)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


# --- setup: podman, the base, the image -------------------------------------------------------


def ensure_tools() -> str | None:
    """None when podman and mmdebstrap are usable; else why not (after trying apt in CI)."""
    missing = [t for t in ("podman", "mmdebstrap", "runc") if shutil.which(t) is None]
    if missing and IN_CI and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {', '.join(APT_PACKAGES)} from Debian's packages", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-q"], env=env, timeout=900)
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES], env=env)
        missing = [t for t in ("podman", "mmdebstrap", "runc") if shutil.which(t) is None]
    return f"{', '.join(missing)} not installed" if missing else None


def podman_compose() -> Path:
    """podman-compose from PyPI in a tool venv (Debian's 1.0.3 has no `config`)."""
    venv = CACHE / "tools" / PODMAN_COMPOSE.replace("==", "-")
    binary = venv / "bin" / "podman-compose"
    if not binary.exists():
        run([sys.executable, "-m", "venv", str(venv)])
        run([str(venv / "bin" / "pip"), "install", "-q", PODMAN_COMPOSE], timeout=900)
    return binary


def base_key() -> str:
    year, week, _ = dt.date.today().isocalendar()
    inputs = json.dumps([SUITE, MIRRORS, BASE_PACKAGES, BASE_HOOK, EXCLUDES, year, week])
    return hashlib.sha256(inputs.encode()).hexdigest()[:16]


def build_base(notes: dict[str, Any]) -> str:
    """The stand-in base image (cached: podman storage, else the tarball, else mmdebstrap)."""
    key = base_key()
    tag = f"localhost/convsync-base:{SUITE}-{key}"
    tarball = CACHE / f"base-{SUITE}-{key}.tar"
    if FRESH:
        podman("rmi", "-f", tag, check=False)
        tarball.unlink(missing_ok=True)
    if podman("image", "exists", tag, check=False).returncode == 0:
        notes["source"] = "podman storage (cached)"
        return tag
    if not tarball.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial")
        argv = [
            "mmdebstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            '--aptopt=Acquire::Retries "3"',
            *(f"--dpkgopt=path-exclude={p}" for p in EXCLUDES),
            f"--customize-hook={BASE_HOOK}",
            "--format=tar",
            SUITE,
            str(partial),
            *MIRRORS,
        ]
        started = time.monotonic()
        run(argv, timeout=1800)
        partial.rename(tarball)
        notes["mmdebstrap_seconds"] = round(time.monotonic() - started, 1)
        for old in CACHE.glob(f"base-{SUITE}-*.tar"):
            if old != tarball:
                old.unlink()
    started = time.monotonic()
    podman("import", "--change", 'CMD ["python"]', str(tarball), tag)
    notes["import_seconds"] = round(time.monotonic() - started, 1)
    notes["source"] = notes.get("source", "mmdebstrap" if "mmdebstrap_seconds" in notes else "tar")
    return tag


def build_image(base: str, notes: dict[str, Any]) -> None:
    argv = [
        "build",
        "--format",
        "docker",
        *ULIMITS,
        "--runtime",
        "runc",
        "--network",
        "host",
        "--build-arg",
        f"BASE={base}",
        "-t",
        IMAGE,
    ]
    if CA_BUNDLE.is_file():
        argv += ["--secret", f"id=ca,src={CA_BUNDLE}"]
    if FRESH:
        argv.append("--no-cache")
    podman(*argv, str(ROOT), timeout=1800)
    inspect = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
    notes["size_mb"] = round(inspect["Size"] / 1e6, 1)
    notes["healthcheck"] = (inspect.get("Healthcheck") or {}).get("Test")
    notes["detail"] = f"{notes['size_mb']} MB"
    assert notes["healthcheck"] == ["CMD", "python", "-m", "worker.healthcheck"], notes


# --- containers -------------------------------------------------------------------------------


class Containers:
    """Containers of the test image on the host's network; removed at the end."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def _flags(self, label: str, env: dict[str, str]) -> tuple[str, list[str]]:
        name = f"convsync-it-{label}-{secrets.token_hex(2)}"
        self.names.append(name)
        flags = [f"--name={name}", "--network=host", "--health-interval=disable", *ULIMITS]
        for key, value in env.items():
            flags += ["-e", f"{key}={value}"]
        return name, flags

    def start(self, label: str, argv: list[str], env: dict[str, str], *extra: str) -> str:
        """A detached container; its name."""
        name, flags = self._flags(label, env)
        podman("run", "-d", *flags, *extra, IMAGE, *argv)
        return name

    def once(
        self, label: str, argv: list[str], env: dict[str, str], *extra: str
    ) -> subprocess.CompletedProcess[str]:
        """A container run to its end (removed after)."""
        _, flags = self._flags(label, env)
        return podman("run", "--rm", *flags, *extra, IMAGE, *argv, check=False)

    def wait(self, name: str, timeout: float = 300) -> int:
        return int(podman("wait", name, timeout=timeout).stdout.strip().splitlines()[-1])

    def logs(self, name: str) -> str:
        done = podman("logs", name, check=False)
        return done.stdout + done.stderr

    def state(self, name: str) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(podman("inspect", name).stdout)[0]["State"]
        return state

    def healthy(self, name: str) -> bool:
        return podman("healthcheck", "run", name, check=False).returncode == 0

    def remove_all(self) -> None:
        for name in self.names:
            podman("rm", "-f", "-t", "0", name, check=False)


def finished_after(name: str, sent: float) -> float:
    """Seconds from ``sent`` (time.time()) to the container's recorded exit."""
    nanos = podman("inspect", "--format", "{{.State.FinishedAt.UnixNano}}", name).stdout
    return int(nanos.strip()) / 1e9 - sent


def no_traceback(logs: str) -> None:
    assert "Traceback" not in logs, logs[-1500:]
    errors = [ln for ln in logs.splitlines() if '"level": "error"' in ln]
    assert not errors, errors[:3]


def pages_ok(sim_url: str) -> list[dict[str, Any]]:
    status, body = http(sim_url + "/_sim/stats")
    assert status == 200, status
    pages: list[dict[str, Any]] = json.loads(body)["pages_ok"]
    return [p for p in pages if "/Conversations" in p["path"]]


# --- the checks -------------------------------------------------------------------------------


def exercise(report: Report, containers: Containers, dbs: Databases) -> None:
    token = secrets.token_hex(16)
    sim_port, http_port = free_port(), free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    worker = {
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": token,
        "TWILIO_CONVERSATIONS_BASE_URL": sim_url,
        "CONVSYNC_CONCURRENCY": str(CONCURRENCY),
        "CONVSYNC_INTERVAL": "3600",
        "CONVSYNC_HTTP_PORT": str(http_port),
    }

    with report.check("image_has_no_build_tools_and_locked_versions") as notes:
        script = (
            "import importlib.metadata as m, importlib.util as u, json, shutil;"
            "print(json.dumps({'dists': {d.name.lower(): d.version for d in m.distributions()},"
            "'tools': [t for t in ('pip', 'setuptools', 'wheel') if u.find_spec(t)],"
            "'bins': [b for b in ('gcc', 'cc', 'pip', 'pip3') if shutil.which(b)]}))"
        )
        done = podman("run", "--rm", *ULIMITS, "--entrypoint", "python", IMAGE, "-c", script)
        found = json.loads(done.stdout)
        assert found["tools"] == [], found
        assert found["bins"] == [], found
        locked = dict(
            re.findall(r"^([a-z0-9._-]+)==(\S+)", (ROOT / "requirements.lock").read_text(), re.M)
        )
        dists = {k.replace("_", "-"): v for k, v in found["dists"].items()}
        extra = sorted(set(dists) - set(locked) - {"convsync"})
        assert not extra, f"not from the lock: {extra}"
        wrong = {k: (dists.get(k), v) for k, v in locked.items() if dists.get(k) != v}
        assert not wrong, f"image != lock: {wrong}"
        notes["detail"] = f"{len(locked)} locked packages, no pip/setuptools/wheel/compiler"

    with report.check("ca_bundle_not_baked_in") as notes:
        script = (
            "import hashlib, os; p = '/etc/ssl/certs/ca-certificates.crt';"
            "print(os.path.exists('/run/secrets/ca'),"
            " hashlib.sha256(open(p, 'rb').read()).hexdigest())"
        )
        done = podman("run", "--rm", *ULIMITS, "--entrypoint", "python", IMAGE, "-c", script)
        secret_left, digest = done.stdout.split()
        assert secret_left == "False", "the build secret is in the image"
        if CA_BUNDLE.is_file():
            host = hashlib.sha256(CA_BUNDLE.read_bytes()).hexdigest()
            assert digest != host, "the image's CA bundle is the host's"
        notes["detail"] = "no /run/secrets/ca; the image's bundle is Debian's, not the host's"

    simulate = [
        "simulate", "--host", "127.0.0.1", "--port", str(sim_port), "--services", "2",
        "--users", "40", "--seed", "7", "--account-sid", ACCOUNT_SID, "--auth-token", token,
    ]  # fmt: skip
    with report.check("simulator_starts") as notes:
        sim = containers.start("sim", simulate, {})
        wait_for("the simulator", lambda: http(sim_url + "/_sim/stats")[0] == 200, 60)

    with report.check("healthcheck_simulate") as notes:
        assert containers.healthy(sim), "a simulate container is unhealthy"

    main_db = dbs.create("main")
    env = {**worker, "DATABASE_URL": main_db}
    with report.check("migrate_twice") as notes:
        outputs = []
        for _ in range(2):
            done = containers.once("migrate", ["migrate"], env)
            assert done.returncode == 0, done.stdout[-800:] + done.stderr[-800:]
            outputs.append(done.stdout + done.stderr)
        first, second = (re.search(r'"applied": \[(.*?)\]', o) for o in outputs)
        assert first, outputs[0][-500:]
        assert first.group(1), "the first migrate applied nothing"
        assert second, outputs[1][-500:]
        assert second.group(1) == "", "the second migrate applied something"
        notes["detail"] = f"applied [{first.group(1)}], then []"

    with report.check("run_until_a_pass_succeeds") as notes:
        runner = containers.start("run", ["run"], env)
        started = time.monotonic()
        wait_for(
            "a succeeded pass",
            lambda: sql(main_db, "SELECT count(*) FROM sync_runs WHERE status = 'succeeded'"),
            180,
            0.25,
        )
        notes["pass_seconds"] = round(time.monotonic() - started, 1)
        notes["detail"] = f"pass succeeded {notes['pass_seconds']} s after start"

    base = f"http://127.0.0.1:{http_port}"
    with report.check("healthz_readyz_metrics") as notes:
        assert http(base + "/healthz")[0] == 200
        status, body = http(base + "/readyz")
        assert status == 200, body
        status, metrics = http(base + "/metrics")
        assert status == 200
        assert 'convsync_passes_total{status="succeeded"} 1' in metrics, metrics[:800]
        notes["detail"] = "200, 200, 200 (passes_total{succeeded} 1)"

    with report.check("healthcheck_run") as notes:
        assert containers.healthy(runner), "the run container is unhealthy"

    with report.check("run_stops_with_exit_0") as notes:
        sent = time.time()
        podman("stop", "-t", "40", runner)
        state = containers.state(runner)
        assert state["ExitCode"] == 0, state
        notes["seconds"] = round(finished_after(runner, sent), 2)
        no_traceback(containers.logs(runner))

    # SIGTERM mid-pass: a fresh database, the simulator slow, so pages are in flight.
    sigterm_db = dbs.create("sigterm")
    env2 = {**worker, "DATABASE_URL": sigterm_db, "CONVSYNC_SHUTDOWN_GRACE": str(GRACE)}
    with report.check("sigterm_mid_pass") as notes:
        done = containers.once("migrate", ["migrate"], env2)
        assert done.returncode == 0, done.stderr[-800:]
        assert http(sim_url + "/_sim/config", {"latency_ms": 500})[0] == 200
        assert http(sim_url + "/_sim/reset_stats", {})[0] == 200
        runner = containers.start("run-sigterm", ["run"], env2)
        committed = "SELECT coalesce(sum(run_pages), 0) FROM sync_cursors"
        wait_for("pages to flow", lambda: sql(sigterm_db, committed) >= 10, 120, 0.2)

        def in_flight() -> bool:
            return bool(json.loads(http(sim_url + "/_sim/stats")[1])["in_flight"] >= 2)

        wait_for("pages in flight", in_flight, 30, 0.02)
        before = sql(sigterm_db, committed)
        sent = time.time()
        podman("stop", "-t", "40", runner, timeout=60)
        state = containers.state(runner)
        seconds = finished_after(runner, sent)
        notes["exit_code"], notes["seconds"] = state["ExitCode"], round(seconds, 2)
        logs = containers.logs(runner)
        no_traceback(logs)
        assert state["ExitCode"] == 0, logs[-1500:]
        events = re.findall(
            r'"event": "(shutdown_started|pass_interrupted|shutdown_complete)"', logs
        )
        assert events == ["shutdown_started", "pass_interrupted", "shutdown_complete"], events
        assert seconds < GRACE, f"{seconds:.2f} s"
        served = sum(p["count"] for p in pages_ok(sim_url))
        stored = sql(sigterm_db, committed)
        notes["pages_served"], notes["pages_committed"] = served, stored
        notes["pages_committed_during_the_grace"] = stored - before
        assert stored == served, f"{served} pages answered, {stored} committed"
        status = sql(sigterm_db, "SELECT status FROM sync_runs")
        assert status == "interrupted", status
        claims = sql(sigterm_db, "SELECT count(*) FROM sync_cursors WHERE claimed_by IS NOT NULL")
        assert claims == 0, f"{claims} claims left"
        notes["detail"] = (
            f"exit 0 in {seconds:.2f} s (grace {GRACE} s); {stored}/{served} answered pages "
            f"committed ({stored - before} during the grace); pass interrupted; claims released"
        )

    with report.check("sync_continues_the_interrupted_pass") as notes:
        assert http(sim_url + "/_sim/config", {"latency_ms": 0})[0] == 200
        done = containers.once("sync", ["sync"], env2)
        assert done.returncode == 0, done.stdout[-800:] + done.stderr[-800:]
        no_traceback(done.stdout + done.stderr)
        assert sql(sigterm_db, "SELECT count(*) FROM sync_runs") == 1, "a new pass was made"
        assert sql(sigterm_db, "SELECT status FROM sync_runs") == "succeeded"
        twice = sum(1 for p in pages_ok(sim_url) if p["count"] > 1)
        notes["pages_fetched_twice"] = twice
        assert twice <= CONCURRENCY, f"{twice} pages fetched twice"
        notes["detail"] = f"exit 0, same pass succeeded, {twice} pages fetched twice"

    locked_down = ["--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges"]
    with report.check("read_only_cap_drop_uid_10001_sync") as notes:
        done = containers.once("ro", ["sync"], env, *locked_down, "--user=10001:10001")
        assert done.returncode == 0, done.stdout[-800:] + done.stderr[-800:]
        no_traceback(done.stdout + done.stderr)

    with report.check("read_only_cap_drop_arbitrary_uid_run") as notes:
        runner = containers.start("ro-any", ["run"], env, *locked_down, "--user=1000770000:0")
        wait_for("ready", lambda: http(base + "/readyz")[0] == 200, 60)
        assert containers.healthy(runner), "unhealthy under an arbitrary uid"
        sent = time.time()
        podman("stop", "-t", "40", runner)
        state = containers.state(runner)
        assert state["ExitCode"] == 0, containers.logs(runner)[-1500:]
        notes["stop_seconds"] = round(finished_after(runner, sent), 2)
        no_traceback(containers.logs(runner))

    hung = Unresponsive()
    try:
        for command in ("migrate", "sync"):
            with report.check(f"sigterm_{command}_with_an_unresponsive_database") as notes:
                hung_env = {**worker, "DATABASE_URL": f"postgresql://x@127.0.0.1:{hung.port}/x"}
                before = len(hung.accepted)
                name = containers.start(f"hung-{command}", [command], hung_env)

                def connected(n: int = before) -> bool:
                    return len(hung.accepted) > n

                wait_for("a connection", connected, 60, 0.02)
                assert containers.healthy(name), f"a {command} container is unhealthy"
                sent = time.time()
                podman("kill", "--signal", "TERM", name)
                assert containers.wait(name, 30) == 1
                seconds = finished_after(name, sent)
                notes["seconds"] = round(seconds, 3)
                logs = containers.logs(name)
                assert f"{command} stopped by SIGTERM" in logs, logs[-800:]
                assert "Traceback" not in logs
                assert seconds < 1.0, f"{seconds:.2f} s"
                notes["detail"] = (
                    f"healthy while waiting; exit 1, {seconds:.3f} s after SIGTERM (PID 1)"
                )
    finally:
        hung.close()

    with report.check("podman_compose_config") as notes:
        compose = [str(podman_compose()), "-f", str(ROOT / "deploy" / "compose.yaml")]
        plain = yaml.safe_load(run([*compose, "config"]).stdout)
        assert set(plain["services"]) == {"postgres", "migrate", "convsync"}, plain["services"]
        sim = yaml.safe_load(run([compose[0], "--profile", "sim", *compose[1:], "config"]).stdout)
        assert "simulator" in sim["services"], sim["services"]
        notes["detail"] = f"{PODMAN_COMPOSE}: 3 services, 4 with --profile sim"


def main() -> int:
    report = Report()
    started = time.monotonic()
    why_not = ensure_tools()
    report.figures["tools_seconds"] = round(time.monotonic() - started, 1)
    if why_not is not None:
        if IN_CI:
            print(f"image-test: 0 passed, 1 failed ({why_not}, and CI must run it)")
            return 1
        print(f"image-test: skipped ({why_not}; CI installs them)")
        return 0
    report.figures["podman"] = podman("--version").stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="convsync-image-"))
    (work / "containers.conf").write_text(CONTAINERS_CONF, encoding="utf-8")
    os.environ["CONTAINERS_CONF"] = str(work / "containers.conf")
    containers, dbs = Containers(), Databases()
    try:
        with report.check("base_image") as notes:
            base = build_base(notes)
            notes["detail"] = f"{base} ({notes['source']})"
        if report.checks[-1].ok:
            with report.check("image_build") as notes:
                build_image(base, notes)
        if report.checks[-1].ok:
            exercise(report, containers, dbs)
    finally:
        containers.remove_all()
        dbs.drop_all()
        # Layers of earlier builds, no longer tagged: the cache keeps a day of them.
        podman("image", "prune", "--force", "--filter", "until=24h", check=False)
        shutil.rmtree(work, ignore_errors=True)
        report.figures["total_seconds"] = round(time.monotonic() - started, 1)
        report.write()
    passed = sum(c.ok for c in report.checks)
    failed = len(report.checks) - passed
    print(f"report: {REPORT}")
    print(f"image-test: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
