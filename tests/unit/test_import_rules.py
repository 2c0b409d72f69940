"""The layout's import rules are lint rules that fail ``ruff check`` (so ``./dev test`` and CI):
the runtime (``worker/``) imports no tooling, except ``worker/cli.py`` inside the functions
that run ``convsync simulate`` and ``convsync demo``; the tooling (``convsync_tools/``) imports
nothing of the worker, except the demo. Each case lints a deliberate violation as if it were
the named file (``--stdin-filename``: that file's own ruff.toml applies)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness import REPO

LAZY_DEMO = """def demo() -> object:
    from convsync_tools.demo import run_demo

    return run_demo
"""


def lint(path: str, source: str) -> tuple[int, str]:
    """``ruff check`` of ``source`` as the file ``path``: its exit code and its findings."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--output-format=concise",
            f"--stdin-filename={path}",
        ],
        input=source,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("path", "source", "rule"),
    [
        # the runtime importing the simulator, at module level or lazily
        ("worker/sync.py", "from convsync_tools.simulator import Simulator\n", "TID251"),
        ("worker/client.py", "import convsync_tools.simdata\n", "TID251"),
        ("worker/store.py", LAZY_DEMO, "TID251"),
        # the CLI too, at module level: only its commands may, lazily
        ("worker/cli.py", "from convsync_tools.demo import run_demo\n", "TID253"),
        # the simulator (and the rest of the tooling) importing the worker
        ("convsync_tools/simulator.py", "from worker.client import TwilioClient\n", "TID251"),
        ("convsync_tools/simdata.py", "import worker.model\n", "TID251"),
        ("convsync_tools/pgembed/probe.py", "from worker import config\n", "TID251"),
    ],
)
def test_a_forbidden_import_fails_the_lint(path: str, source: str, rule: str) -> None:
    code, findings = lint(path, source)
    assert code == 1, findings
    assert f"{rule} `" in findings, findings


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("worker/cli.py", LAZY_DEMO),
        ("convsync_tools/demo.py", "from worker.client import TwilioClient\n\nTwilioClient()\n"),
    ],
)
def test_the_allowed_imports_pass_the_lint(path: str, source: str) -> None:
    code, findings = lint(path, source)
    assert code == 0, findings


def test_the_tree_as_it_is_passes_the_rules() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "TID", "worker", "convsync_tools"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
