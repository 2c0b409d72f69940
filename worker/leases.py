"""The claims this process holds: renewed while it lives, freed when an earlier one died.

A claim (a users listing, a user) is leased for CONVSYNC_LEASE_SECONDS. ``HeldClaims`` renews
the leases of every claim this process works on, so a slow listing is never taken over while its
worker lives; a dead worker's leases simply expire, or, when it provably ran in this host's pid
namespace, are freed at once by ``release_dead_local_claims``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import structlog

from worker.database import CONNECTION_ERRORS, RetryingStore

log = structlog.get_logger(__name__)


def parse_owner(owner: str) -> tuple[str, str, int] | None:
    """(name, pid namespace, pid) of a worker id (name:pidns:pid:nonce, the name the host's or
    CONVSYNC_WORKER_ID); None for an owner of another form (one from an older version)."""
    parts = owner.rsplit(":", 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def release_dead_local_claims(db: RetryingStore, owner: str) -> None:
    """Free claims of earlier processes in this host's pid namespace that are dead (e.g.
    SIGKILLed, or a container restarted as the same pid), so a restart continues at once
    instead of waiting for their leases to expire."""
    mine = parse_owner(owner)
    if mine is None:
        return
    for other in await db.call(db.store.claim_owners):
        theirs = parse_owner(other)
        if other.split("~", 1)[0] == owner:
            continue  # this process's own (its re-lister's claims are "<owner>~relist")
        if theirs is None or theirs[:2] != mine[:2]:
            continue  # not provably in our pid namespace: its lease will tell
        if theirs[2] == mine[2] or not pid_alive(theirs[2]):
            log.info("dead_claims_released", owner=other)
            await db.call(db.store.release_all, other)


class HeldClaims:
    """The claim tokens this process works on, their leases renewed every third of a lease."""

    def __init__(self, db: RetryingStore, lease_seconds: float) -> None:
        self.db = db
        self.lease_seconds = lease_seconds
        self.tokens: set[str] = set()

    def add(self, token: str) -> None:
        self.tokens.add(token)

    def discard(self, token: str) -> None:
        self.tokens.discard(token)

    @contextlib.asynccontextmanager
    async def renewing(self) -> AsyncIterator[None]:
        """Renew the held leases (``renew_forever``) while the block runs."""
        renewal = asyncio.ensure_future(self.renew_forever())
        try:
            yield
        finally:
            renewal.cancel()
            await asyncio.gather(renewal, return_exceptions=True)

    async def renew_forever(self) -> None:
        """Renew the held leases until cancelled; a database away for a while, or a failed
        renewal, only delays it (the next one comes a third of a lease later)."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self.db.store.renew_leases(sorted(self.tokens), self.lease_seconds)
            except CONNECTION_ERRORS:
                pass
            except Exception as error:
                log.warning("leases_not_renewed", error_kind=type(error).__name__)
