"""SIGTERM and SIGINT, handled from a command's first instruction to its last.

As PID 1 of a container, a process that has no handler for SIGTERM ignores it. So ``main``
installs one first thing (SIGTERM then raises KeyboardInterrupt, as SIGINT does), and once the
event loop runs both signals set ``stop``: inside a ``graceful`` section (a pass whose in-flight
pages deserve their grace, the daemon) the command winds down by itself along
``worker.shutdown``'s one path, with a backstop; anywhere else (connecting, waiting on a lock
or a query) the command is cancelled at once. A second signal always cancels at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

from worker.shutdown import Shutdown

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def install_early() -> None:
    """Before the event loop: SIGTERM raises KeyboardInterrupt, like SIGINT."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


class StopSignals:
    """The running command's view of SIGTERM/SIGINT (see the module docstring)."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.received: str | None = None  # name of the first signal
        self.cancelled = False  # the command was cancelled because of a signal
        self._task: asyncio.Task[object] | None = None
        self._backstop: float | None = None  # seconds, set inside a graceful section

    @contextlib.contextmanager
    def attached(self) -> Iterator[StopSignals]:
        """Route the signals to this object for the current task's lifetime."""
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield self
        finally:
            for sig in SIGNALS:
                loop.remove_signal_handler(sig)
            install_early()

    @contextlib.contextmanager
    def graceful(self, grace: float) -> Iterator[Shutdown]:
        """A section that honours ``stop`` by itself, giving work in flight ``grace`` seconds."""
        if self.stop.is_set():
            self._cancel()
        shutdown = Shutdown(grace, self.stop)
        self._backstop = shutdown.backstop_seconds
        try:
            yield shutdown
        finally:
            self._backstop = None

    def _on_signal(self, sig: signal.Signals) -> None:
        first = self.received is None
        if first:
            self.received = sig.name
        self.stop.set()
        if not first or self._backstop is None:
            self._cancel()
        else:
            asyncio.get_running_loop().call_later(self._backstop, self._cancel)

    def _cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self.cancelled = True
            self._task.cancel()
