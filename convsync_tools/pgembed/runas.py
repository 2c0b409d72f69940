"""Running PostgreSQL when we are root: initdb and postgres refuse to.

As root, both run as the unprivileged OS user ``$CONVSYNC_PG_OS_USER`` (default
``convsync-pg``, created with ``useradd --system`` if missing; ``nobody`` if that fails) via
subprocess's ``user``/``group``/``extra_groups=[]`` (no su/sudo/runuser needed). The data
directory is handed to that user, and ancestors of it and of the wheel's binaries that it could
not search get o+x (search, not read; logged).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convsync_tools.errors import PgEmbedError

DEFAULT_OS_USER = "convsync-pg"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunAs:
    """The unprivileged OS user the server runs as when we are root."""

    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict[str, Any]:
        """subprocess arguments that drop root for the child."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def popen_kwargs(run_as: RunAs | None) -> dict[str, Any]:
    """subprocess arguments that run the child as ``run_as`` (none when we are not root)."""
    return run_as.popen_kwargs() if run_as else {}


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


def hand_over(data_dir: Path, run_as: RunAs) -> None:
    """Make ``data_dir`` (and everything in it) ``run_as``'s, reachable through its parents."""
    grant_traversal(data_dir, run_as)
    if data_dir.stat().st_uid != run_as.uid:
        for path in (data_dir, *data_dir.rglob("*")):
            os.lchown(path, run_as.uid, run_as.gid)
