"""The one listing walker: a claimed listing, page by page from its cursor, and what each
failure costs.

Two kinds of listing are walked: a service's users (``UsersListing`` in ``worker.sync``) and a
user's conversations (``ConversationsListing``). Each says how to save a page and how to record
an outcome; ``walk`` holds the policy for both:

* every page is checked by a ``ListingGuard`` before it is fetched (no page twice, at most
  CONVSYNC_MAX_PAGES), and a page PostgreSQL refuses fails the listing (PageRefused);
* a rejected page token (expired) restarts the listing from page one, once;
* a listing that is gone (404) is recorded gone; one taken over by another worker (LeaseLost)
  or interrupted by a stop is released, to be continued; any other error of the listing
  (UserSyncError) fails it alone, and so does a bug (logged with its traceback);
* fatal errors (credentials, configuration) and an unavailable database end the pass.

A listing that may fetch ahead (``prefetch``) fetches page n+1 while page n is saved; one whose
pages must commit in order before the next is fetched (conversations, whose cursor bounds what a
crash refetches) does not.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable

import structlog

from worker.client import ListingGuard, Page
from worker.database import VALUES_REFUSED_ERRORS
from worker.errors import (
    DatabaseUnavailable,
    FatalError,
    Interrupted,
    LeaseLost,
    ListingRefused,
    PageRefused,
    PageTokenRejected,
    UserGone,
    UserSyncError,
)
from worker.logs import redact

log = structlog.get_logger(__name__)
Fetch = Callable[[str, str], Awaitable[Page]]  # (path, item key) -> the page


class Listing(abc.ABC):
    """One claimed listing: where it starts, how its pages are saved, how it ends."""

    kind: str  # the listing's item key in Twilio's pages, and its label in logs and metrics
    prefetch: bool  # fetch the next page while this one is saved

    def __init__(self, first_path: str, next_path: str | None, pages_written: int) -> None:
        self.first_path = first_path
        self.next_path = next_path or first_path  # the cursor
        self.pages_written = pages_written  # pages committed so far in this listing

    @abc.abstractmethod
    async def save(self, page: Page) -> None:
        """Commit ``page`` (the listing's page number ``pages_written``) with its cursor."""

    @abc.abstractmethod
    async def restart(self) -> bool:
        """Reset the cursor to page one; False when the claim was taken over meanwhile."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Give the claim back, cursor kept, to be continued at once."""

    @abc.abstractmethod
    async def fail(self, message: str, *, restart: bool = False) -> None:
        """Record the listing failed (its rows kept, nothing marked removed); ``restart``: its
        next walk starts at page one, not at its cursor."""

    async def gone(self, message: str) -> None:
        """Record that the listing's owner no longer exists (404); by default, a failure."""
        await self.fail(message)

    @abc.abstractmethod
    async def done(self) -> None:
        """The last page was saved."""


async def walk(listing: Listing, fetch: Fetch, max_pages: int, stop: asyncio.Event) -> None:
    """Walk ``listing`` to its last page (or until ``stop``) and record how it ended.
    (No logger is bound up front: most listings end without an event to log.)"""
    try:
        await _pages(listing, fetch, max_pages, stop)
    except (FatalError, DatabaseUnavailable):
        raise
    except UserGone as error:
        log.info("listing_gone", listing=listing.kind)
        await listing.gone(redact(str(error)))
    except LeaseLost:
        # Taken over, or our own page committed with its reply lost (a retry then finds the
        # cursor moved): give the claim back if it is still ours, so that the listing is
        # continued at once rather than after its lease.
        log.warning("listing_taken_over", listing=listing.kind)
        await listing.release()
    except Interrupted:
        log.info("listing_interrupted", listing=listing.kind, pages=listing.pages_written)
        await listing.release()
    except UserSyncError as error:
        message = redact(str(error))
        log.error(
            "listing_failed", listing=listing.kind, error=message, error_kind=type(error).__name__
        )
        # Refused past its bound or for a loop, a walk continued from its cursor would be
        # refused again at once (or walk the loop again), pass after pass: it starts over.
        await listing.fail(message, restart=isinstance(error, ListingRefused))
    except Exception as error:
        # A bug must cost one listing, not the pass (and not every later pass).
        log.exception("listing_crashed", listing=listing.kind)
        await listing.fail(redact(f"internal error: {type(error).__name__}: {error}"))


async def _pages(listing: Listing, fetch: Fetch, max_pages: int, stop: asyncio.Event) -> None:
    """Fetch and save pages from the cursor; raises what ends the listing early."""
    guard = ListingGuard(max_pages, listing.pages_written)
    restarted = False

    async def fetch_checked(path: str) -> Page:
        guard.check(path)
        return await fetch(path, listing.kind)

    ahead: asyncio.Future[Page] | None = None
    try:
        while True:
            if stop.is_set():
                raise Interrupted("stopped")
            fetching, ahead = ahead, None
            try:
                page = await (fetching or fetch_checked(listing.next_path))
            except PageTokenRejected:
                if restarted or listing.pages_written == 0:
                    raise
                log.warning(
                    "page_token_rejected", listing=listing.kind, pages=listing.pages_written
                )
                if not await listing.restart():
                    raise LeaseLost("taken over while restarting") from None
                listing.next_path, listing.pages_written, restarted = listing.first_path, 0, True
                guard = ListingGuard(max_pages)
                continue
            if listing.prefetch and page.next_page_path is not None:
                ahead = asyncio.ensure_future(fetch_checked(page.next_page_path))
            try:
                await listing.save(page)
            except VALUES_REFUSED_ERRORS as error:
                raise PageRefused(
                    f"{page.path.split('?', 1)[0]}: PostgreSQL refused the page: "
                    f"{type(error).__name__}: {error}"
                ) from error
            listing.pages_written += 1
            if page.next_page_path is None:
                await listing.done()
                return
            listing.next_path = page.next_page_path
    finally:
        if ahead is not None:  # not needed after all: dropped, its outcome consumed
            ahead.cancel()
            ahead.add_done_callback(lambda done: done.cancelled() or done.exception())
