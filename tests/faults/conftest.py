"""Fault tests: the figures of what was injected are written at the end of the session."""

from __future__ import annotations

from typing import Any

from tests.faults.common import FIGURES, FIGURES_PATH, write_figures


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        line = write_figures()
        terminalreporter.write_line(f"convsync fault figures ({FIGURES_PATH}): {line}")
