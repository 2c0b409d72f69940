"""The image's HEALTHCHECK (``python -m worker.healthcheck``), true for every command.

A container running ``convsync run`` is healthy when its /healthz answers; one running any other
command (``migrate``, ``sync``, ``status``, ``simulate``) serves no HTTP and is healthy while it
runs. Standard library only: it starts fast and needs no configuration.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Iterable
from pathlib import Path

HEALTHZ = "/healthz"
# A server bound to "every address" is probed on its loopback: IPv4's for "0.0.0.0", IPv6's for
# "::" (asyncio binds "::" IPv6-only: 127.0.0.1 would be refused).
LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 (not a bind)


def convsync_command(cmdline: bytes) -> str | None:
    """The convsync command of a process's NUL-separated argv, e.g. ``run`` for
    ``python /opt/venv/bin/convsync run`` or ``python -m worker run``; None if not convsync."""
    args = [a.decode(errors="replace") for a in cmdline.split(b"\0")]
    for i, arg in enumerate(args):
        if Path(arg).name == "convsync" or (arg == "-m" and args[i + 1 : i + 2] == ["worker"]):
            rest = args[i + 2 :] if arg == "-m" else args[i + 1 :]
            return next((a for a in rest if a and not a.startswith("-")), "")
    return None


def commands(proc: Path = Path("/proc")) -> list[str]:
    """The convsync commands running in this container (PID 1, or a child of an init)."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = convsync_command((entry / "cmdline").read_bytes())
        except OSError:  # gone meanwhile, or another user's
            continue
        if command is not None:
            found.append(command)
    return found


def healthz_url(environ: dict[str, str]) -> str:
    host = environ.get("CONVSYNC_HTTP_HOST", "").strip()
    host = LOOPBACK.get(host, host)
    port = environ.get("CONVSYNC_HTTP_PORT", "").strip() or "8080"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{HEALTHZ}"


def check(running: Iterable[str], environ: dict[str, str]) -> tuple[int, str]:
    """(exit status, message): 0 healthy, 1 unhealthy."""
    if "run" not in running:
        return 0, "healthy: no `convsync run` here, nothing to probe"
    url = healthz_url(environ)
    try:
        with urllib.request.urlopen(url, timeout=4) as response:  # noqa: S310 (our own URL)
            return 0, f"healthy: {url} answered {response.status}"
    except OSError as error:
        return 1, f"unhealthy: {url}: {error}"


def main() -> int:
    status, message = check(commands(), dict(os.environ))
    print(message)
    return status


if __name__ == "__main__":
    sys.exit(main())
