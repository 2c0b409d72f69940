"""Our own PostgreSQL server: initdb once, then start, stop and restart it on 127.0.0.1.

``LocalPostgres`` runs ``postgres`` on a free (or fixed) port with trust auth, TCP only, from
binaries ``find_binaries`` chose, as the OS user ``runas`` chose when we are root. It is ready
when a real connection (``probe.data_directory``) finds our data directory behind the port;
it is stopped at exit, and a postmaster a dead process left on its data directory is stopped
before it starts. Temp servers (no data directory given) are deleted by ``close`` or, when
their owner died, by the next one.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from convsync_tools.errors import PgEmbedError
from convsync_tools.pgembed.binaries import Binaries, find_binaries
from convsync_tools.pgembed.probe import SUPERUSER, Endpoint, data_directory
from convsync_tools.pgembed.runas import RunAs, hand_over, popen_kwargs, server_os_user

StopMode = Literal["smart", "fast", "immediate"]

TEMP_PREFIX = "convsync-pg-"
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True


def _is_postgres(pid: int) -> bool:
    try:
        return b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _wait_gone(pid: int, deadline: float) -> bool:
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _stop_leftover(data_dir: Path, timeout: float = 30.0) -> None:
    """Stop a postmaster a dead process left running on ``data_dir`` (not our child)."""
    pidfile = data_dir / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if not _pid_alive(pid) or pid == os.getpid():
        return
    if not _is_postgres(pid):
        pidfile.unlink(missing_ok=True)  # a recycled pid; postgres would refuse to start
        return
    deadline = time.monotonic() + timeout
    os.kill(pid, signal.SIGINT)
    if not _wait_gone(pid, deadline):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        _wait_gone(pid, time.monotonic() + 5)


def sweep_stale_temp_servers() -> None:
    """Stop and delete temp servers whose owning process died without cleaning up."""
    for base in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        try:
            owner = int((base / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or _pid_alive(owner):
            continue
        _stop_leftover(base / "data")
        shutil.rmtree(base, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


@dataclass
class _Running:
    process: subprocess.Popen[bytes]
    port: int
    started_at: float = field(default_factory=time.monotonic)


class LocalPostgres:
    """A PostgreSQL server we run: initdb once, start/stop/restart on a fixed 127.0.0.1 port.

    ``data_dir=None``: a fresh temp directory, deleted by ``close()``; ``fast`` (default:
    True for a temp dir) turns off fsync and full_page_writes. The admin URL is
    ``postgresql://postgres@127.0.0.1:PORT/postgres`` (trust auth) and survives restarts.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        fast: bool | None = None,
        port: int | None = None,
        start_timeout: float = 60.0,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self._temp_base: Path | None = None
        self._data_dir = data_dir.resolve() if data_dir is not None else None
        self.fast = data_dir is None if fast is None else fast
        self.start_timeout = start_timeout
        self.settings = dict(settings or {})
        self._port = port
        self._running: _Running | None = None
        self._lock = threading.RLock()
        self._atexit = False
        self.binaries: Binaries | None = None
        self.initdb_seconds: float | None = None
        self.start_seconds: float | None = None

    # -- properties

    @property
    def data_dir(self) -> Path:
        """The data directory (created on first ``start``)."""
        if self._data_dir is None:
            raise PgEmbedError("not started yet: the temp data directory does not exist")
        return self._data_dir

    @property
    def log_path(self) -> Path:
        """The server's log (stdout and stderr), beside the data directory."""
        return self.data_dir.with_name(self.data_dir.name + ".log")

    @property
    def port(self) -> int:
        """The TCP port, fixed at the first start."""
        if self._port is None:
            raise PgEmbedError("not started yet: no port")
        return self._port

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        """The admin URL (user and database ``postgres``)."""
        return self.endpoint.url(SUPERUSER, "postgres")

    @property
    def running(self) -> bool:
        return self._running is not None and self._running.process.poll() is None

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while running."""
        return self._running.process.pid if self.running and self._running else None

    def database_url(self, name: str) -> str:
        return self.endpoint.url(SUPERUSER, name)

    # -- lifecycle

    def start(self) -> str:
        """Start (initdb first if needed) and wait until it accepts connections; the admin URL."""
        with self._lock:
            if self.running:
                return self.url
            begin = time.monotonic()
            run_as = server_os_user()
            data_dir = self._prepare_data_dir(run_as)
            version_file = data_dir / "PG_VERSION"
            major = int(version_file.read_text().strip()) if version_file.exists() else None
            self.binaries = find_binaries(run_as, major)
            if major is None:
                self._initdb(self.binaries, run_as)
            _stop_leftover(data_dir)
            fixed_port = self._port is not None
            for _attempt in range(5):
                port = self._port if self._port is not None else _free_port()
                if self._spawn_and_wait(self.binaries, run_as, port):
                    self._port = port
                    break
                if fixed_port:
                    raise PgEmbedError(f"port {port} is taken; see {self.log_path}")
            else:
                raise PgEmbedError(f"no free port found to start PostgreSQL; see {self.log_path}")
            self.start_seconds = time.monotonic() - begin
            if not self._atexit:
                atexit.register(self.close)
                self._atexit = True
            return self.url

    def stop(self, mode: StopMode = "fast", timeout: float = 30.0) -> None:
        """Shut down (smart: wait for clients; fast: end sessions; immediate: like a crash)."""
        with self._lock:
            running, self._running = self._running, None
            if running is None or running.process.poll() is not None:
                return
            process = running.process
            process.send_signal(_STOP_SIGNALS[mode])
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)  # the postmaster and its children
                process.wait(10)

    def restart(self, mode: StopMode = "fast") -> str:
        """Stop, then start on the same port and data; the admin URL (unchanged)."""
        self.stop(mode)
        return self.start()

    async def astart(self) -> str:
        """``start`` off the event loop."""
        return await asyncio.to_thread(self.start)

    async def astop(self, mode: StopMode = "fast") -> None:
        """``stop`` off the event loop."""
        await asyncio.to_thread(self.stop, mode)

    async def arestart(self, mode: StopMode = "fast") -> str:
        """``restart`` off the event loop."""
        return await asyncio.to_thread(self.restart, mode)

    def close(self) -> None:
        """Stop, and delete the data directory if it was a temp one."""
        with self._lock:
            self.stop()
            if self._temp_base is not None:
                shutil.rmtree(self._temp_base, ignore_errors=True)
                self._temp_base = None
                self._data_dir = None
            if self._atexit:
                atexit.unregister(self.close)
                self._atexit = False

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals

    def _prepare_data_dir(self, run_as: RunAs | None) -> Path:
        if self._data_dir is None:
            sweep_stale_temp_servers()
            base = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
            base.chmod(0o711)  # the server's OS user must traverse it when we are root
            (base / "owner.pid").write_text(str(os.getpid()))
            self._temp_base, self._data_dir = base, base / "data"
        data_dir = self._data_dir
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if run_as is not None:
            hand_over(data_dir, run_as)
        return data_dir

    def _initdb(self, binaries: Binaries, run_as: RunAs | None) -> None:
        if any(self.data_dir.iterdir()):
            raise PgEmbedError(f"{self.data_dir} is not empty and holds no PostgreSQL cluster")
        begin = time.monotonic()
        argv = [
            *(str(binaries.initdb), "-D", str(self.data_dir), "--username", SUPERUSER),
            *("--auth", "trust", "--encoding", "UTF8", "--locale", "C", "--no-instructions"),
        ]
        if self.fast:
            argv.append("--no-sync")
        result = subprocess.run(  # noqa: S603 - a binary we located
            argv, capture_output=True, text=True, env=_child_env(), cwd=self.data_dir,
            timeout=self.start_timeout, check=False,
            **popen_kwargs(run_as),
        )  # fmt: skip
        if result.returncode != 0:
            raise PgEmbedError(f"initdb failed ({result.returncode}): {result.stderr.strip()}")
        self.initdb_seconds = time.monotonic() - begin

    def _argv(self, binaries: Binaries, port: int) -> list[str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(port),
            "unix_socket_directories": "",  # TCP only: no /var/run/postgresql or /tmp needed
            "max_connections": "200",
            # Safe against a server crash or kill (the OS still holds every write), not an OS
            # crash; synchronous_commit stays on so a committed row survives an immediate stop.
            **({"fsync": "off", "full_page_writes": "off"} if self.fast else {}),
            **self.settings,
        }  # fmt: skip
        argv = [str(binaries.postgres), "-D", str(self.data_dir)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        return argv

    def _spawn_and_wait(self, binaries: Binaries, run_as: RunAs | None, port: int) -> bool:
        """Start postgres on ``port``; True once it is ready, False if the port was taken."""
        with self.log_path.open("ab") as log:
            log.write(f"--- pgembed: starting on port {port}\n".encode())
            log.flush()
            offset = log.tell()
            process = subprocess.Popen(  # noqa: S603 - a binary we located
                self._argv(binaries, port),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=_child_env(), cwd=self.data_dir, start_new_session=True,
                **popen_kwargs(run_as),
            )  # fmt: skip
        self._running = _Running(process, port)
        deadline = time.monotonic() + self.start_timeout
        endpoint = Endpoint("127.0.0.1", port)
        while True:
            if process.poll() is not None:
                self._running = None
                with self.log_path.open("rb") as f:
                    f.seek(offset)
                    tail = f.read().decode("utf-8", "replace")
                if "could not bind" in tail or "already in use" in tail:
                    return False
                raise PgEmbedError(f"postgres exited with {process.returncode}:\n{tail[-4000:]}")
            serving = data_directory(endpoint, timeout=0.5)
            if serving is not None:
                if serving != self.data_dir:
                    self.stop("immediate")  # someone else's server answered on this port
                    return False
                return True
            if time.monotonic() >= deadline:
                self.stop("immediate")
                raise PgEmbedError(
                    f"postgres not ready in {self.start_timeout}s; see {self.log_path}"
                )
            time.sleep(0.02)
