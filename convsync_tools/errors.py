"""Every exception the tooling defines (the runtime's are in ``worker.errors``).

Imports nothing: the simulator uses this module and must share no code with the worker.
"""

from __future__ import annotations


class ToolingError(Exception):
    """A developer tool failed."""


class PgEmbedError(ToolingError):
    """No PostgreSQL could be found or started."""


class NoPostgresBinaries(PgEmbedError):
    """No usable initdb/postgres binaries were found."""


class BadRequest(ToolingError):
    """The simulator refuses a request (400, Twilio's code 20001): its message is the body's."""
