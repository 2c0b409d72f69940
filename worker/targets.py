"""The durable queue of targeted re-lists (migration 005): every statement on it.

A webhook's event is recorded in one transaction with its idempotency key: the users it
changed become ``relist_targets`` rows (an identity through ``users``; a conversation through
its current members in ``memberships``), due after the coalescing window. Re-lists claim due
targets with a lease, like a pass's users (``FOR UPDATE SKIP LOCKED``), so replicas never list
one user twice at once. A re-list then claims the user's cursor from page one, unless another
walker holds it (a pass's, or another re-list's) or the running pass has the user still to do:
the target waits a second and is tried again, so a listing in progress is never reset under its
walker, and the pass's own users are the pass's to list.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from worker.store import LISTING_AT_PAGE_ONE, UserClaim, error_text
from worker.webhooks import Event, Recorded

WEBHOOK_EVENTS_KEPT_SECONDS = 86_400.0  # idempotency keys remembered this long
BUSY_RETRY_SECONDS = 1.0  # a target whose user is being listed is tried again after this

_RECORD_SQL = """
WITH fresh AS (
    INSERT INTO webhook_events (idempotency_key, event_type) VALUES ($1, $2)
    ON CONFLICT DO NOTHING RETURNING 1
),
wanted AS (
    SELECT $3::text AS service,
           coalesce((SELECT u.user_sid FROM users u
                     WHERE u.chat_service_sid = $3 AND u.identity = $5 AND u.removed_at IS NULL
                     ORDER BY u.user_sid LIMIT 1), $5) AS user_ref
    WHERE $6 = 'participant' AND EXISTS (SELECT 1 FROM fresh)
      AND EXISTS (SELECT 1 FROM services s WHERE s.chat_service_sid = $3)
    UNION
    SELECT m.chat_service_sid, m.user_sid FROM memberships m
    WHERE $6 = 'members' AND EXISTS (SELECT 1 FROM fresh)
      AND m.chat_service_sid = $3 AND m.conversation_sid = $4 AND m.removed_at IS NULL
    UNION
    (SELECT m.chat_service_sid, m.user_sid FROM memberships m
     WHERE $6 = 'one_member' AND EXISTS (SELECT 1 FROM fresh)
       AND m.chat_service_sid = $3 AND m.conversation_sid = $4 AND m.removed_at IS NULL
     ORDER BY m.user_sid LIMIT 1)
),
queued AS (
    INSERT INTO relist_targets AS t (chat_service_sid, user_ref, due_at)
    SELECT service, user_ref, now() + make_interval(secs => $7) FROM wanted
    WHERE user_ref IS NOT NULL
    ORDER BY service, user_ref  -- one lock order for concurrent events: no deadlock
    ON CONFLICT (chat_service_sid, user_ref) DO UPDATE SET
        requests = t.requests + 1,
        generation = t.generation + 1,
        -- waiting: the earlier due time holds (a stream of events cannot postpone it);
        -- being re-listed: due again after the window, once the running re-list is done
        due_at = CASE WHEN t.claimed_by IS NULL THEN t.due_at ELSE excluded.due_at END,
        rerequested_at = CASE WHEN t.claimed_by IS NULL THEN t.rerequested_at
                              ELSE coalesce(t.rerequested_at, now()) END
    RETURNING (xmax = 0) AS new
)
SELECT EXISTS (SELECT 1 FROM fresh) AS recorded,
       count(*) FILTER (WHERE new) AS new,
       count(*) FILTER (WHERE NOT new) AS coalesced
FROM queued
"""


@dataclass(frozen=True)
class Target:
    """A claimed target: re-list ``user_ref`` (a SID, or an identity to resolve first)."""

    chat_service_sid: str
    user_ref: str
    token: str
    requested_at: datetime
    attempts: int  # its re-lists that failed so far


class TargetQueue:
    """Statements on ``webhook_events`` and ``relist_targets``."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def record(self, event: Event | None, key: str, window_seconds: float) -> Recorded:
        """Record a webhook once (by ``key``) with the targets of its event, in one
        transaction; an ignored event (None) only records its key."""
        row = await self.pool.fetchrow(
            _RECORD_SQL,
            key,
            event.event_type if event else "ignored",
            event.chat_service_sid if event else None,
            event.conversation_sid if event else None,
            event.identity if event else None,
            event.scope if event else "none",
            window_seconds,
        )
        assert row is not None
        return Recorded(row["recorded"], row["new"], row["coalesced"])

    async def claim_due(
        self, token: str, lease_seconds: float, limit: int, recover: bool = False
    ) -> list[Target]:
        """Claim up to ``limit`` due targets (a dead worker's after its lease)."""
        rows = await self.pool.fetch(
            """WITH due AS (
                   SELECT chat_service_sid, user_ref FROM relist_targets
                   WHERE due_at <= now() AND (claimed_by IS NULL OR lease_until < now()
                                              OR ($4 AND starts_with(claimed_by, $1 || '.')))
                   ORDER BY due_at LIMIT $3 FOR UPDATE SKIP LOCKED)
               UPDATE relist_targets t SET claimed_by = $1 || '.'
                          || md5(t.chat_service_sid || '/' || t.user_ref),
                      lease_until = now() + make_interval(secs => $2),
                      claimed_generation = t.generation
               FROM due d
               WHERE t.chat_service_sid = d.chat_service_sid AND t.user_ref = d.user_ref
               RETURNING t.chat_service_sid, t.user_ref, t.claimed_by, t.requested_at,
                         t.attempts""",
            token,
            lease_seconds,
            limit,
            recover,
        )
        return [
            Target(
                r["chat_service_sid"],
                r["user_ref"],
                r["claimed_by"],
                r["requested_at"],
                r["attempts"],
            )
            for r in rows
        ]

    async def next_due_in(self) -> float | None:
        """Seconds until the next target is due (0: one is due now); None when none waits."""
        seconds = await self.pool.fetchval(
            """SELECT greatest(0, extract(epoch FROM min(due_at) - now()))::float8
               FROM relist_targets WHERE claimed_by IS NULL OR lease_until < now()"""
        )
        return None if seconds is None else float(seconds)

    async def claim_cursor(
        self, target: Target, user_sid: str, lease_seconds: float
    ) -> UserClaim | None:
        """Claim the user's cursor for a listing from page one; None while another walker
        holds it (a pass's, or another re-list's), while the running pass has the user still
        to do (the pass lists it, then the re-list runs), or before any pass to file it under.
        A listing nobody walks any more (its claim released, its pass over) starts again."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """INSERT INTO sync_cursors (chat_service_sid, user_sid, run_id, state)
                   SELECT $1, $2, max(run_id), 'done' FROM sync_runs
                   HAVING max(run_id) IS NOT NULL
                   ON CONFLICT DO NOTHING""",
                target.chat_service_sid,
                user_sid,
            )
            run_id = await conn.fetchval(
                f"""UPDATE sync_cursors c SET claimed_by = $3,
                          lease_until = now() + make_interval(secs => $4), state = 'pending',
                          {LISTING_AT_PAGE_ONE}
                   WHERE c.chat_service_sid = $1 AND c.user_sid = $2
                     AND (c.claimed_by IS NULL OR c.lease_until < now() OR c.claimed_by = $3)
                     AND NOT (c.state = 'pending' AND EXISTS (
                         SELECT 1 FROM sync_runs r
                         WHERE r.run_id = c.run_id AND r.status = 'running'))
                   RETURNING c.run_id""",
                target.chat_service_sid,
                user_sid,
                target.token,
                lease_seconds,
            )
        if run_id is None:
            return None
        return UserClaim(run_id, target.chat_service_sid, user_sid, None, 0, target.token)

    async def served(self, target: Target) -> float | None:
        """The re-list is done: the target goes, unless an event came while it ran (then it
        waits for another re-list). The seconds from its oldest request to now, when it went."""
        async with self.pool.acquire() as conn, conn.transaction():
            gone = await conn.fetchval(
                """DELETE FROM relist_targets
                   WHERE chat_service_sid = $1 AND user_ref = $2 AND claimed_by = $3
                     AND generation = claimed_generation
                   RETURNING extract(epoch FROM clock_timestamp() - requested_at)::float8""",
                target.chat_service_sid,
                target.user_ref,
                target.token,
            )
            if gone is None:
                await conn.execute(
                    """UPDATE relist_targets SET claimed_by = NULL, lease_until = NULL,
                              requested_at = coalesce(rerequested_at, requested_at),
                              rerequested_at = NULL
                       WHERE chat_service_sid = $1 AND user_ref = $2 AND claimed_by = $3""",
                    target.chat_service_sid,
                    target.user_ref,
                    target.token,
                )
        return None if gone is None else float(gone)

    async def postpone(
        self, target: Target, seconds: float, error: str | None = None, *, failed: bool = False
    ) -> None:
        """Give the target back, due again in ``seconds``; ``failed``: its re-list failed (one
        more of its ``attempts``; waiting behind another walker is not one)."""
        await self.pool.execute(
            """UPDATE relist_targets SET claimed_by = NULL, lease_until = NULL,
                      due_at = now() + make_interval(secs => $4),
                      last_error = coalesce($5, last_error),
                      attempts = attempts + $6::int
               WHERE chat_service_sid = $1 AND user_ref = $2 AND claimed_by = $3""",
            target.chat_service_sid,
            target.user_ref,
            target.token,
            seconds,
            None if error is None else error_text(error),
            int(failed),
        )

    async def drop(self, target: Target) -> None:
        """Forget a target that cannot be served (an identity Twilio does not know), unless
        a newer request came meanwhile (then it waits for another try)."""
        async with self.pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                """DELETE FROM relist_targets
                   WHERE chat_service_sid = $1 AND user_ref = $2 AND claimed_by = $3
                     AND generation = claimed_generation""",
                target.chat_service_sid,
                target.user_ref,
                target.token,
            )
            if status.endswith(" 0"):
                await conn.execute(
                    """UPDATE relist_targets SET claimed_by = NULL, lease_until = NULL
                       WHERE chat_service_sid = $1 AND user_ref = $2 AND claimed_by = $3""",
                    target.chat_service_sid,
                    target.user_ref,
                    target.token,
                )

    async def prune_events(self) -> int:
        """Forget idempotency keys older than ``WEBHOOK_EVENTS_KEPT_SECONDS``."""
        status = await self.pool.execute(
            "DELETE FROM webhook_events WHERE received_at < now() - make_interval(secs => $1)",
            WEBHOOK_EVENTS_KEPT_SECONDS,
        )
        return int(status.split()[-1])


async def pending_relists(conn: asyncpg.Connection) -> dict[str, Any]:
    """The queue at a glance (``convsync status``): targets waiting, in progress, the oldest
    request."""
    row = await conn.fetchrow(
        """SELECT count(*) AS pending, min(requested_at) AS oldest,
                  count(*) FILTER (WHERE claimed_by IS NOT NULL AND lease_until >= now())
                      AS in_progress
           FROM relist_targets"""
    )
    assert row is not None
    return dict(row)
