"""One hierarchy for every failure convsync knows, split by what the pass does about it.

- ``FatalError``: the whole run stops, exit 2 (bad configuration, rejected credentials).
- ``UserSyncError``: one user fails or is skipped; the rest of the pass goes on.
- ``TransientError``: worth retrying with backoff; once retries are exhausted it becomes a
  per-user failure.
"""

from __future__ import annotations


class ConvsyncError(Exception):
    """convsync failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class FatalError(ConvsyncError):
    """The run cannot go on."""


class ConfigError(FatalError):
    """The configuration is invalid."""


class AuthError(FatalError):
    """Twilio rejected the credentials."""


class UserSyncError(ConvsyncError):
    """One user could not be synced; the others go on."""


class UserGone(UserSyncError):
    """The user no longer exists upstream (404)."""


class PageTokenRejected(UserSyncError):
    """Twilio rejected a saved page token; the listing restarts from its first page."""


class MalformedPage(UserSyncError):
    """A page's body is not a Twilio list page."""


class ResponseTooLarge(MalformedPage):
    """A response body exceeds CONVSYNC_MAX_RESPONSE_BYTES (after decompression)."""


class ListingRefused(MalformedPage):
    """A listing repeats a page it already served, or spans more than CONVSYNC_MAX_PAGES."""


class PageRefused(UserSyncError):
    """PostgreSQL refused a page's rows (a value the parser let through); nothing of it is kept."""


class RetriesExhausted(UserSyncError):
    """A request kept failing transiently until its retry budget ran out."""


class UnexpectedResponse(UserSyncError):
    """Twilio answered with a status convsync does not handle."""


class TransientError(ConvsyncError):
    """A failure worth retrying."""

    def __init__(self, message: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(TransientError):
    """Twilio answered 429: too many concurrent requests."""


class ServerError(TransientError):
    """Twilio answered 5xx."""


class ConnectionFailed(TransientError):
    """The connection dropped, timed out or the body was truncated."""


class Interrupted(ConvsyncError):
    """Shutdown was asked for while a request waited to be retried."""


class LeaseLost(ConvsyncError):
    """Another worker took over this user or service; this worker's page is discarded."""


class PassBusy(ConvsyncError):
    """Another pass is running on live workers; this one cannot start now."""


class DatabaseUnreachable(ConvsyncError):
    """The database could not be reached at start (transient: exit 1, try again later)."""


class DatabaseUnavailable(ConvsyncError):
    """PostgreSQL stayed unreachable longer than the pass waits; committed pages are kept."""


class MigrationError(FatalError):
    """The migrations cannot be applied."""


class InvalidItem(ValueError):
    """An item of an API page that breaks the schema; the message says how (it is quarantined,
    never raised past the parser)."""
