"""Every SQL statement convsync runs: passes, discovery, claims, pages, cursors, removals.

Invariants kept here:
- a page's conversations, memberships, quarantined items, removals and cursor commit together,
  in one statement for a batch of pages (``save_pages``), each page guarded by its claim's token
  and the page number it expects, so a page is never applied twice or out of order;
- an unchanged row is not rewritten (``IS DISTINCT FROM``), and conversation data only moves
  forward in ``date_updated``;
- memberships are never deleted: a complete listing marks what it did not see ``removed_at``.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from worker.errors import LeaseLost, PassBusy
from worker.model import UNIDENTIFIED, ConversationsPage, Rejected, ServiceRow, UserRow

# The owner of a webhook re-list's claims: the worker's own, with this suffix (released apart,
# and no pass's work).
RELIST_OWNER_SUFFIX = "~relist"
# Tables whose rows are claimed with a lease (``claimed_by``, ``lease_until``).
CLAIM_TABLES = ("sync_cursors", "sync_discovery", "relist_targets", "sync_pass_starts")
# Those of them that hold a pass's work (a live one keeps the pass running; a re-list's claim
# on a user's cursor excepted, see ``_has_live_claims``).
PASS_CLAIM_TABLES = ("sync_cursors", "sync_discovery", "sync_pass_starts")


@dataclass(frozen=True)
class PassInfo:
    run_id: int
    resumed: bool


@dataclass(frozen=True)
class DiscoveryClaim:
    """A leased users listing; ``token`` (owner/nonce) is checked by every write."""

    run_id: int
    chat_service_sid: str
    next_page_path: str | None
    pages: int
    token: str


@dataclass(frozen=True)
class UserClaim:
    """A leased user; ``token`` (owner/nonce) is checked by every write, so even two loops of
    one process cannot both write the same user."""

    run_id: int
    chat_service_sid: str
    user_sid: str
    next_page_path: str | None
    listing_pages: int
    token: str


@dataclass(frozen=True, slots=True)
class PageWrite:
    """One page of a user's listing, to be written with its cursor (``Store.save_pages``)."""

    claim: UserClaim
    pages_written: int  # pages of this listing already written
    source_path: str
    page: ConversationsPage
    next_page_path: str | None
    counts: bool = True  # into its pass's figures: a webhook's re-list, no pass's work, does not


@dataclass(frozen=True)
class PageOutcome:
    inserted: int
    updated: int
    unchanged: int
    removed: int
    quarantined: int
    removals_skipped: bool = False  # the listing had an item without a readable SID


@dataclass(frozen=True)
class PassSummary:
    run_id: int
    status: str
    users_synced: int
    users_failed: int
    users_gone: int
    pages: int
    rows_inserted: int
    rows_updated: int
    rows_unchanged: int
    rows_removed: int
    rows_quarantined: int
    seconds: float


@dataclass(frozen=True)
class PassProgress:
    running: bool
    discovery_open: bool
    users_pending: bool
    interrupted: bool = False  # stopped, to be continued (``resume_pass``)


async def _reset_connection(conn: asyncpg.Connection) -> None:
    """Return a connection to the pool without asyncpg's full reset query (a round trip per
    page): the store keeps no session state; only a transaction left open is rolled back."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def _jsonb_out(value: str | bytes) -> bytes:
    """jsonb's binary form: a version byte, then the JSON text (validated by the model)."""
    return b"\x01" + (value if isinstance(value, bytes) else value.encode())


def _jsonb_in(data: bytes) -> str:
    return data[1:].decode()


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb travels as JSON text, never decoded here: a page batch goes to PostgreSQL as one
    # JSON document the model encoded; attributes are JSON text already.
    await conn.set_type_codec(
        "jsonb", encoder=_jsonb_out, decoder=_jsonb_in, schema="pg_catalog", format="binary"
    )


# A cursor sent back to page one: the next listing of its user starts over, the conversations
# seen so far forgotten (nothing is removed on the strength of a listing cut short). One
# definition for every statement that resets a listing.
_PAGE_ONE = {
    "next_page_path": "NULL",
    "listing_pages": "0",
    "seen_conversations": "'{}'",
    "listing_started_at": "NULL",
}
LISTING_AT_PAGE_ONE = ", ".join(f"{column} = {value}" for column, value in _PAGE_ONE.items())


def listing_at_page_one_if(condition: str) -> str:
    """``LISTING_AT_PAGE_ONE`` where ``condition`` (SQL) holds; the cursor as it is elsewhere."""
    return ", ".join(
        f"{column} = CASE WHEN {condition} THEN {value} ELSE {column} END"
        for column, value in _PAGE_ONE.items()
    )


class _OpenedConnections:
    """Counts the connections a pool opens (as its ``init``)."""

    def __init__(self) -> None:
        self.count = 0

    async def init(self, conn: asyncpg.Connection) -> None:
        await _init_connection(conn)
        self.count += 1


class Store:
    """The database side of a pass, over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool, opened: _OpenedConnections | None = None) -> None:
        self.pool = pool
        self._opened = opened or _OpenedConnections()

    @property
    def connections_opened(self) -> int:
        """Connections the pool has opened so far (counted in pools made by ``connect``).

        Work committed asynchronously (``save_pages(async_commit=True)``) is lost only by a
        server that crashed or failed over, and then every connection opened before is gone:
        a caller that remembers what it committed forgets it when this count moves."""
        return self._opened.count

    @classmethod
    async def connect(cls, dsn: str, size: int = 8, *, lazy: bool = False) -> Store:
        """A pool of ``size`` connections; ``lazy`` opens none until needed (a service may
        start while its database is down)."""
        opened = _OpenedConnections()
        pool = await asyncpg.create_pool(
            dsn,
            min_size=0 if lazy else 1,
            max_size=size,
            init=opened.init,
            reset=_reset_connection,
            command_timeout=60,
        )
        return cls(pool, opened)

    async def close(self) -> None:
        await self.pool.close()

    # --- passes ---------------------------------------------------------------------------

    async def begin_or_resume_pass(
        self,
        scope: dict[str, Any],
        tick: datetime | None = None,
        *,
        starter: str | None = None,
        lease_seconds: float = 0.0,
    ) -> PassInfo | None:
        """Continue the unfinished pass of the same scope, or start one (superseding another).

        With a schedule ``tick``, a pass is created once per tick whatever the number of
        replicas: None means this tick's pass already ran to its end. ``starter``: the claim
        token under which this worker starts the pass, leased for ``lease_seconds`` (until
        ``end_pass_start``): meanwhile the pass is busy, as if it held a live claim.
        """
        scope_json = json.dumps(scope, sort_keys=True)
        async with self.pool.acquire() as conn, conn.transaction():
            # One pass at a time across replicas: serialise creation on the partial index.
            await conn.execute("LOCK TABLE sync_runs IN SHARE ROW EXCLUSIVE MODE")
            running = await conn.fetchrow(
                """SELECT run_id, scope::text AS scope, status FROM sync_runs
                   WHERE status IN ('running', 'interrupted')"""
            )
            if running is not None:
                if json.loads(running["scope"]) == json.loads(scope_json):
                    if running["status"] == "interrupted":
                        await conn.execute(
                            "UPDATE sync_runs SET status = 'running' WHERE run_id = $1",
                            running["run_id"],
                        )
                    await _lease_start(conn, running["run_id"], starter, lease_seconds)
                    return PassInfo(running["run_id"], resumed=True)
                if await _has_live_claims(conn, running["run_id"]):
                    raise PassBusy(
                        f"pass {running['run_id']} of another scope is running on other "
                        "workers; try again when it ends"
                    )
                await conn.execute(
                    """UPDATE sync_runs SET status = 'failed', finished_at = now(),
                              error = 'superseded by a pass of another scope'
                       WHERE run_id = $1""",
                    running["run_id"],
                )
                await _drop_starts(conn, running["run_id"])
            if tick is not None and await conn.fetchval(
                "SELECT 1 FROM sync_runs WHERE tick = $1", tick
            ):
                return None
            run_id = await conn.fetchval(
                "INSERT INTO sync_runs (scope, tick) VALUES ($1::jsonb, $2) RETURNING run_id",
                scope_json,
                tick,
            )
            await _lease_start(conn, run_id, starter, lease_seconds)
            return PassInfo(run_id, resumed=False)

    async def end_pass_start(self, run_id: int, starter: str) -> None:
        """End this worker's start of the pass: it holds a claim (which keeps the pass busy
        from now on), or it leaves the pass."""
        await self.pool.execute(
            "DELETE FROM sync_pass_starts WHERE run_id = $1 AND claimed_by = $2", run_id, starter
        )

    async def pass_progress(self, run_id: int) -> PassProgress:
        """Whether the pass still runs, and has an open users listing or a pending user."""
        row = await self.pool.fetchrow(
            """SELECT
                 (SELECT status FROM sync_runs WHERE run_id = $1) AS status,
                 EXISTS (SELECT 1 FROM sync_discovery
                         WHERE run_id = $1 AND completed_at IS NULL) AS discovery_open,
                 EXISTS (SELECT 1 FROM sync_cursors
                         WHERE run_id = $1 AND state = 'pending') AS users_pending""",
            run_id,
        )
        assert row is not None
        return PassProgress(
            row["status"] == "running",
            row["discovery_open"],
            row["users_pending"],
            interrupted=row["status"] == "interrupted",
        )

    async def resume_pass(self, run_id: int) -> bool:
        """Set an interrupted pass running again, for a worker still on it (another, stopping
        between this one's claims, found none live); False if it was not interrupted."""
        status = await self.pool.execute(
            "UPDATE sync_runs SET status = 'running' WHERE run_id = $1 AND status = 'interrupted'",
            run_id,
        )
        return bool(status == "UPDATE 1")

    async def pending_users(self, run_id: int) -> int:
        """How many users of the pass are still to list (for progress displays)."""
        count: int = await self.pool.fetchval(
            "SELECT count(*) FROM sync_cursors WHERE run_id = $1 AND state = 'pending'", run_id
        )
        return count

    async def finish_pass(self, run_id: int, error: str | None = None) -> PassSummary:
        """Record the pass's counts and status (once; later callers read what was recorded)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """WITH totals AS (
                     SELECT count(*) FILTER (WHERE state = 'done') AS synced,
                            count(*) FILTER (WHERE state = 'failed') AS failed,
                            count(*) FILTER (WHERE state = 'gone') AS gone,
                            coalesce(sum(run_pages), 0) AS pages,
                            coalesce(sum(run_rows_inserted), 0) AS ins,
                            coalesce(sum(run_rows_updated), 0) AS upd,
                            coalesce(sum(run_rows_unchanged), 0) AS unch,
                            coalesce(sum(run_rows_removed), 0) AS rem,
                            coalesce(sum(run_rows_quarantined), 0) AS quar
                     FROM sync_cursors WHERE run_id = $1)
                   UPDATE sync_runs r SET
                     finished_at = now(),
                     status = CASE WHEN $2::text IS NOT NULL THEN 'failed'
                                   WHEN t.failed > 0 OR EXISTS (
                                        SELECT 1 FROM sync_discovery d
                                        WHERE d.run_id = $1 AND d.error IS NOT NULL)
                                   THEN 'partial' ELSE 'succeeded' END,
                     error = $2,
                     users_synced = t.synced, users_failed = t.failed, users_gone = t.gone,
                     pages = t.pages, rows_inserted = t.ins, rows_updated = t.upd,
                     rows_unchanged = t.unch, rows_removed = t.rem,
                     rows_quarantined = t.quar + (
                        SELECT count(*) FROM quarantine q
                        WHERE q.run_id = $1 AND q.user_sid IS NULL)
                   FROM totals t
                   WHERE r.run_id = $1 AND r.status = 'running'""",
                run_id,
                None if error is None else error_text(error),
            )
            await _drop_starts(conn, run_id)
        return await self.pass_summary(run_id)

    async def pass_summary(self, run_id: int) -> PassSummary:
        """The pass as recorded (counts are final once it is no longer running)."""
        row = await self.pool.fetchrow(
            """SELECT *, extract(epoch FROM coalesce(finished_at, now()) - started_at)
                      AS seconds FROM sync_runs WHERE run_id = $1""",
            run_id,
        )
        assert row is not None
        return PassSummary(
            run_id=row["run_id"],
            status=row["status"],
            users_synced=row["users_synced"],
            users_failed=row["users_failed"],
            users_gone=row["users_gone"],
            pages=row["pages"],
            rows_inserted=row["rows_inserted"],
            rows_updated=row["rows_updated"],
            rows_unchanged=row["rows_unchanged"],
            rows_removed=row["rows_removed"],
            rows_quarantined=row["rows_quarantined"],
            seconds=float(row["seconds"]),
        )

    # --- services and discovery -----------------------------------------------------------

    async def upsert_users(self, rows: Sequence[UserRow]) -> None:
        """Upsert user records (a user first known from a webhook)."""
        await self.pool.execute(_USERS_UPSERT_SQL, _users_document(rows))

    async def upsert_services(self, rows: Sequence[ServiceRow]) -> None:
        if not rows:
            return
        await self.pool.execute(
            """INSERT INTO services AS s (chat_service_sid, account_sid, friendly_name,
                      date_created, date_updated, url, links)
               SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[],
                                    $5::timestamptz[], $6::text[], $7::jsonb[])
               ON CONFLICT (chat_service_sid) DO UPDATE SET
                 account_sid = EXCLUDED.account_sid, friendly_name = EXCLUDED.friendly_name,
                 date_created = EXCLUDED.date_created, date_updated = EXCLUDED.date_updated,
                 url = EXCLUDED.url, links = EXCLUDED.links, last_seen_at = now()
               WHERE (s.account_sid, s.friendly_name, s.date_created, s.date_updated, s.url,
                      s.links)
                 IS DISTINCT FROM (EXCLUDED.account_sid, EXCLUDED.friendly_name,
                      EXCLUDED.date_created, EXCLUDED.date_updated, EXCLUDED.url,
                      EXCLUDED.links)""",
            *_columns(rows, 7),
        )

    async def ensure_services(self, service_sids: Sequence[str]) -> None:
        """Services known only by SID (their record was quarantined): present, nothing else
        overwritten."""
        if service_sids:
            await self.pool.execute(
                """INSERT INTO services (chat_service_sid) SELECT unnest($1::text[])
                   ON CONFLICT DO NOTHING""",
                list(service_sids),
            )

    async def quarantine(
        self,
        run_id: int,
        service_sid: str | None,
        source_path: str,
        rejected: Sequence[Rejected],
    ) -> None:
        """Keep items that cannot be stored as rows (raw, with the reason and their origin)."""
        if rejected:
            async with self.pool.acquire() as conn:
                await _quarantine(conn, run_id, service_sid, None, source_path, rejected)

    async def open_discovery(self, run_id: int, service_sids: Sequence[str]) -> None:
        """Register each service's users listing for this pass (kept if already there)."""
        await self.pool.execute(
            """INSERT INTO sync_discovery (run_id, chat_service_sid)
               SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING""",
            run_id,
            list(service_sids),
        )

    async def claim_discovery(
        self,
        run_id: int,
        owner: str,
        lease_seconds: float,
        token: str | None = None,
        *,
        recover: bool = False,
    ) -> DiscoveryClaim | None:
        """Lease one open users listing. ``recover`` (a retry of the same ``token`` after a
        lost connection): first return the listing that token may already hold."""
        token = token or new_claim_token(owner)
        if recover:
            row = await self.pool.fetchrow(
                """SELECT chat_service_sid, next_page_path, pages FROM sync_discovery
                   WHERE run_id = $1 AND claimed_by = $2 AND completed_at IS NULL""",
                run_id,
                token,
            )
            if row is not None:
                return DiscoveryClaim(
                    run_id, row["chat_service_sid"], row["next_page_path"], row["pages"], token
                )
        row = await self.pool.fetchrow(
            """UPDATE sync_discovery d SET claimed_by = $2,
                      lease_until = now() + make_interval(secs => $3)
               WHERE (run_id, chat_service_sid) = (
                   SELECT run_id, chat_service_sid FROM sync_discovery
                   WHERE run_id = $1 AND completed_at IS NULL
                     AND (lease_until IS NULL OR lease_until < now())
                     AND EXISTS (SELECT 1 FROM sync_runs r
                                 WHERE r.run_id = $1 AND r.status = 'running')
                   ORDER BY chat_service_sid LIMIT 1 FOR UPDATE SKIP LOCKED)
               RETURNING chat_service_sid, next_page_path, pages""",
            run_id,
            token,
            lease_seconds,
        )
        if row is None:
            return None
        return DiscoveryClaim(
            run_id, row["chat_service_sid"], row["next_page_path"], row["pages"], token
        )

    async def save_users_page(
        self,
        claim: DiscoveryClaim,
        lease_seconds: float,
        pages_written: int,
        source_path: str,
        users: Sequence[UserRow],
        rejected: Sequence[Rejected],
        next_page_path: str | None,
    ) -> int:
        """Upsert a users page, queue its users for this pass, advance discovery.

        After the last page, users of the service not listed in this pass are marked gone
        (with their memberships). Returns how many users were marked gone.
        """
        run_id, service = claim.run_id, claim.chat_service_sid
        async with self.pool.acquire() as conn, conn.transaction():
            advanced = await conn.fetchval(
                """UPDATE sync_discovery SET next_page_path = $4, pages = pages + 1,
                          users_seen = users_seen + $5,
                          -- the last page ends the claim: a finished listing is nobody's
                          claimed_by = CASE WHEN $4::text IS NOT NULL THEN claimed_by END,
                          lease_until = CASE WHEN $4::text IS NOT NULL
                                             THEN now() + make_interval(secs => $6) END,
                          completed_at = CASE WHEN $4::text IS NULL THEN now() END
                   WHERE run_id = $1 AND chat_service_sid = $2 AND claimed_by = $3
                     AND pages = $7 AND completed_at IS NULL
                   RETURNING 1""",
                run_id,
                service,
                claim.token,
                next_page_path,
                len(users),
                lease_seconds,
                pages_written,
            )
            if advanced is None:
                raise LeaseLost(f"discovery of {service} was taken over")
            await conn.execute(_USERS_UPSERT_SQL, _users_document(users))
            # A user listed with a record that cannot be stored still exists: its stored row
            # (or a bare one) stays, its conversations are listed, it is never marked gone.
            listed = {u.user_sid for u in users}
            unstorable = sorted({r.sid for r in rejected if r.sid is not None} - listed)
            if unstorable:
                await conn.execute(
                    """INSERT INTO users AS u (chat_service_sid, user_sid)
                       SELECT $1, unnest($2::text[])
                       ON CONFLICT (chat_service_sid, user_sid) DO UPDATE SET
                         removed_at = NULL, changed_at = now()
                       WHERE u.removed_at IS NOT NULL""",
                    service,
                    unstorable,
                )
            await self._enqueue(conn, run_id, service, sorted(listed.union(unstorable)))
            await _quarantine(conn, run_id, service, None, source_path, rejected)
            if any(r.sid is None for r in rejected):
                # It may have been any user: this listing proves nobody gone (pass: partial).
                await conn.execute(
                    """UPDATE sync_discovery SET error = coalesce(error, $3)
                       WHERE run_id = $1 AND chat_service_sid = $2""",
                    run_id,
                    service,
                    "a listed user had no readable SID; nobody is marked gone this pass",
                )
            if next_page_path is not None:
                return 0
            if await conn.fetchval(
                "SELECT error FROM sync_discovery WHERE run_id = $1 AND chat_service_sid = $2",
                run_id,
                service,
            ):
                return 0
            return await self._mark_unlisted_users_gone(conn, run_id, service)

    async def fail_discovery(self, claim: DiscoveryClaim, error: str) -> None:
        """End a users listing that cannot finish this pass; nobody is marked gone."""
        await self.pool.execute(
            """UPDATE sync_discovery SET completed_at = now(), error = $4,
                      claimed_by = NULL, lease_until = NULL
               WHERE run_id = $1 AND chat_service_sid = $2 AND claimed_by = $3""",
            claim.run_id,
            claim.chat_service_sid,
            claim.token,
            error_text(error),
        )

    async def restart_discovery(self, claim: DiscoveryClaim, pages_written: int) -> bool:
        """Forget a rejected users page token: the listing starts again from its first page
        (queueing is idempotent; nobody is marked gone before a last page)."""
        restarted = await self.pool.fetchval(
            """UPDATE sync_discovery SET next_page_path = NULL, pages = 0
               WHERE run_id = $1 AND chat_service_sid = $2 AND claimed_by = $3 AND pages = $4
               RETURNING 1""",
            claim.run_id,
            claim.chat_service_sid,
            claim.token,
            pages_written,
        )
        return restarted is not None

    async def renew_leases(self, tokens: Sequence[str], lease_seconds: float) -> None:
        """Extend the leases of claims this process still works on (its heartbeat).

        A row another transaction holds is skipped, not waited for: it is a page being written
        (which extends its lease itself) or a claim being released. Waiting deadlocked: the
        renewal locks its rows in index order while a batch locks its pages' cursors in its
        own, and PostgreSQL broke each such cycle after a second (twelve in an hour of
        benchmarks), the batch's pages stalled meanwhile.
        """
        if not tokens:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            for table in CLAIM_TABLES:
                await conn.execute(
                    f"""WITH free AS (
                          SELECT ctid FROM {table} WHERE claimed_by = ANY($1::text[])
                          FOR UPDATE SKIP LOCKED)
                        UPDATE {table} t SET lease_until = now() + make_interval(secs => $2)
                        FROM free WHERE t.ctid = free.ctid""",
                    list(tokens),
                    lease_seconds,
                )

    async def claim_owners(self) -> list[str]:
        """Workers holding claims now (the owner part of each claim token)."""
        rows = await self.pool.fetch(
            """SELECT split_part(claimed_by, '/', 1) AS owner FROM sync_cursors
               WHERE claimed_by IS NOT NULL
               UNION SELECT split_part(claimed_by, '/', 1) FROM sync_discovery
               WHERE claimed_by IS NOT NULL
               UNION SELECT split_part(claimed_by, '/', 1) FROM relist_targets
               WHERE claimed_by IS NOT NULL
               UNION SELECT split_part(claimed_by, '/', 1) FROM sync_pass_starts
               WHERE claimed_by IS NOT NULL"""
        )
        return [r["owner"] for r in rows]

    async def services_of_users(self, user_sids: Sequence[str]) -> dict[str, str]:
        """The service each known user belongs to."""
        rows = await self.pool.fetch(
            "SELECT user_sid, chat_service_sid FROM users WHERE user_sid = ANY($1::text[])",
            list(user_sids),
        )
        return {r["user_sid"]: r["chat_service_sid"] for r in rows}

    async def enqueue_users(self, run_id: int, service_sid: str, user_sids: Sequence[str]) -> None:
        """Queue named users (``--user``) for this pass; no discovery, so nothing marked gone."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """INSERT INTO users (chat_service_sid, user_sid)
                   SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING""",
                service_sid,
                sorted(user_sids),
            )
            await self._enqueue(conn, run_id, service_sid, sorted(user_sids))

    @staticmethod
    async def _enqueue(
        conn: asyncpg.Connection, run_id: int, service: str, user_sids: list[str]
    ) -> None:
        # A user already queued in this pass keeps its state; one from an earlier pass keeps
        # its cursor (an interrupted listing goes on) but gets fresh per-pass counters. A live
        # claim stays (a re-list's, under way): the pass takes the user once it is given back
        # (the re-list's next page, filed under the earlier pass, is refused and releases it),
        # so the two never list the user at once.
        await conn.execute(
            """INSERT INTO sync_cursors AS c (chat_service_sid, user_sid, run_id)
               SELECT $2, unnest($3::text[]), $1
               ON CONFLICT (chat_service_sid, user_sid) DO UPDATE SET
                 run_id = EXCLUDED.run_id, state = 'pending', attempts = 0,
                 claimed_by = CASE WHEN c.lease_until > now() THEN c.claimed_by END,
                 lease_until = CASE WHEN c.lease_until > now() THEN c.lease_until END,
                 run_pages = 0, run_rows_inserted = 0, run_rows_updated = 0,
                 run_rows_unchanged = 0, run_rows_removed = 0, run_rows_quarantined = 0
               WHERE c.run_id < EXCLUDED.run_id""",
            run_id,
            service,
            user_sids,
        )

    @staticmethod
    async def _mark_unlisted_users_gone(conn: asyncpg.Connection, run_id: int, service: str) -> int:
        # Gone users count in this pass, with the memberships their removal takes along.
        gone = await conn.fetch(
            f"""UPDATE sync_cursors c SET state = 'gone', run_id = $2,
                      claimed_by = NULL, lease_until = NULL, {LISTING_AT_PAGE_ONE}, run_pages = 0,
                      run_rows_inserted = 0, run_rows_updated = 0, run_rows_unchanged = 0,
                      run_rows_quarantined = 0,
                      run_rows_removed = (SELECT count(*) FROM memberships m
                                          WHERE m.chat_service_sid = c.chat_service_sid
                                            AND m.user_sid = c.user_sid
                                            AND m.removed_at IS NULL)
               WHERE chat_service_sid = $1 AND run_id < $2 AND state <> 'gone'
               RETURNING user_sid""",
            service,
            run_id,
        )
        sids = [r["user_sid"] for r in gone]
        await _remove_users(conn, service, sids)
        # Users known from an earlier pass without a cursor (never listed) are gone too.
        await conn.execute(
            """UPDATE users u SET removed_at = now() WHERE chat_service_sid = $1
                 AND removed_at IS NULL
                 AND NOT EXISTS (SELECT 1 FROM sync_cursors c
                                 WHERE c.chat_service_sid = u.chat_service_sid
                                   AND c.user_sid = u.user_sid)""",
            service,
        )
        return len(sids)

    # --- users ----------------------------------------------------------------------------

    async def claim_user(
        self,
        run_id: int,
        owner: str,
        lease_seconds: float,
        token: str | None = None,
        *,
        recover: bool = False,
    ) -> UserClaim | None:
        """Lease one pending user of this pass (see ``claim_users``)."""
        claims = await self.claim_users(
            run_id, owner, lease_seconds, token, recover=recover, limit=1
        )
        return claims[0] if claims else None

    async def claim_users(
        self,
        run_id: int,
        owner: str,
        lease_seconds: float,
        token: str | None = None,
        *,
        recover: bool = False,
        limit: int = 1,
    ) -> list[UserClaim]:
        """Lease up to ``limit`` pending users of this pass in one statement (``SKIP LOCKED``:
        replicas never collide). Each claim's token is ``token.user_sid``.

        ``recover`` (a retry of the same ``token`` after a lost connection: the claims may have
        committed with their reply lost): first return the users that token already holds,
        which would otherwise stay leased to nobody until their leases end.
        """
        token = token or new_claim_token(owner)
        columns = "chat_service_sid, user_sid, next_page_path, listing_pages, claimed_by"
        rows: list[asyncpg.Record] = []
        if recover:
            rows = await self.pool.fetch(
                f"""SELECT {columns} FROM sync_cursors
                   WHERE run_id = $1 AND starts_with(claimed_by, $2 || '.')
                     AND state = 'pending'""",
                run_id,
                token,
            )
        if not rows:
            rows = await self.pool.fetch(
                f"""UPDATE sync_cursors c SET claimed_by = $2 || '.' || c.user_sid,
                          lease_until = now() + make_interval(secs => $3),
                          attempts = attempts + 1
                   WHERE (chat_service_sid, user_sid) IN (
                       SELECT chat_service_sid, user_sid FROM sync_cursors
                       WHERE run_id = $1 AND state = 'pending'
                         AND (lease_until IS NULL OR lease_until < now())
                         AND EXISTS (SELECT 1 FROM sync_runs r
                                     WHERE r.run_id = $1 AND r.status = 'running')
                       LIMIT $4 FOR UPDATE SKIP LOCKED)
                   RETURNING {columns}""",
                run_id,
                token,
                lease_seconds,
                limit,
            )
        return [
            UserClaim(
                run_id,
                r["chat_service_sid"],
                r["user_sid"],
                r["next_page_path"],
                r["listing_pages"],
                r["claimed_by"],
            )
            for r in rows
        ]

    async def save_conversations_page(
        self,
        claim: UserClaim,
        lease_seconds: float,
        pages_written: int,
        source_path: str,
        page: ConversationsPage,
        next_page_path: str | None,
    ) -> PageOutcome:
        """Write one page of a user's listing and advance its cursor, atomically (a batch of
        one: see ``save_pages``); LeaseLost if the cursor is not where this claim left it."""
        write = PageWrite(claim, pages_written, source_path, page, next_page_path)
        (outcome,) = await self.save_pages([write], lease_seconds)
        if outcome is None:
            raise LeaseLost(f"user {claim.user_sid} was taken over or its cursor moved")
        return outcome

    async def save_pages(
        self,
        writes: Sequence[PageWrite],
        lease_seconds: float,
        conversations: Sequence[Sequence[int]] | None = None,
        *,
        conn: asyncpg.Connection | None = None,
        async_commit: bool = False,
    ) -> list[PageOutcome | None]:
        """Write a batch of pages (of distinct users) and advance their cursors in one
        transaction; per page, its outcome, or None when its claim no longer holds the cursor
        at that page (taken over, or already written): that page wrote nothing.

        ``pages_written`` is the count of pages of the listing already written. On a listing's
        last page, memberships not seen in the whole listing are removed. If PostgreSQL refuses
        a value, nothing of the batch is written and the error is raised. ``conversations``:
        per page, the items (indices into its ``sids``) whose conversation to upsert (default:
        all); a conversation left out must already be stored at least as new as the page has it.
        ``conn``: the connection to run on (default: one of the pool's). ``async_commit``:
        the transaction commits without waiting for its WAL to reach disk (synchronous_commit
        off, for it alone): a server crash may lose it whole, pages and cursors together.
        """
        if conversations is None:
            conversations = [range(len(w.page.sids)) for w in writes]
        batch = [
            _BatchPage(
                number,
                w.claim.chat_service_sid,
                w.claim.user_sid,
                w.claim.token,
                w.pages_written,
                w.next_page_path,
                w.claim.run_id,
                msgspec.Raw(w.page.members),
                [w.page.conversation_fields(i) for i in indices],
                ",".join(w.page.seen_sids),
                [_RejectedItem(r.item, r.reason) for r in w.page.rejected] or None,
                w.source_path,
                len(w.page.sids),
                w.counts,
            )
            for number, (w, indices) in enumerate(zip(writes, conversations, strict=True), 1)
        ]
        try:
            document = msgspec.json.encode(batch)
        except UnicodeEncodeError as error:  # a lone surrogate: text PostgreSQL cannot hold
            raise asyncpg.DataError(f"a page of the batch holds unstorable text: {error}") from None
        runner = self.pool if conn is None else conn
        rows = await runner.fetch(_PAGES_SQL, document, UNIDENTIFIED, lease_seconds, async_commit)
        outcomes: list[PageOutcome | None] = [None] * len(writes)
        for row in rows:
            if not row["ok"]:
                continue
            index = row["ord"] - 1
            inserted, updated = row["inserted"], row["updated"]
            outcomes[index] = PageOutcome(
                inserted,
                updated,
                len(writes[index].page.sids) - inserted - updated,
                row["removed"],
                row["quarantined"],
                bool(row["removals_skipped"]),
            )
        return outcomes

    async def restart_listing(self, claim: UserClaim) -> None:
        """Forget a rejected cursor: the listing starts again from page one, nothing removed."""
        await self.pool.execute(
            f"""UPDATE sync_cursors SET {LISTING_AT_PAGE_ONE}
               WHERE chat_service_sid = $1 AND user_sid = $2 AND claimed_by = $3""",
            claim.chat_service_sid,
            claim.user_sid,
            claim.token,
        )

    async def mark_user_failed(
        self, claim: UserClaim, error: str, *, restart: bool = False
    ) -> None:
        """The user failed this pass: its cursor stays, for the next pass to continue (or, with
        ``restart``, is reset: the next pass lists the user from page one, nothing removed).
        If a newer pass queued the user meanwhile (a re-list's claim is kept for it), the
        failure is not that pass's: the claim is only given back, for the pass to list it."""
        failed = await self.pool.execute(
            f"""UPDATE sync_cursors SET state = 'failed', last_error = $4, last_error_at = now(),
                      claimed_by = NULL, lease_until = NULL, {listing_at_page_one_if("$5")}
               WHERE chat_service_sid = $1 AND user_sid = $2 AND claimed_by = $3
                 AND state = 'pending' AND run_id = $6""",
            claim.chat_service_sid,
            claim.user_sid,
            claim.token,
            error_text(error),
            restart,
            claim.run_id,
        )
        if failed == "UPDATE 0":
            await self.release_user(claim)

    async def relist_failed(self, claim: UserClaim, error: str) -> None:
        """A re-list (no pass's work) failed: its claim is given back with the cursor at page
        one. A pass not over (running, or interrupted: to be resumed) takes the user back
        (pending: it lists the user itself, its own outcome counting); otherwise the cursor
        shows the failure until the next pass."""
        await self.pool.execute(
            f"""UPDATE sync_cursors c SET claimed_by = NULL, lease_until = NULL,
                      last_error = $4, last_error_at = now(), {LISTING_AT_PAGE_ONE},
                      state = CASE WHEN EXISTS (SELECT 1 FROM sync_runs r
                                                WHERE r.run_id = c.run_id
                                                  AND r.status IN ('running', 'interrupted'))
                                   THEN 'pending' ELSE 'failed' END
               WHERE chat_service_sid = $1 AND user_sid = $2 AND claimed_by = $3""",
            claim.chat_service_sid,
            claim.user_sid,
            claim.token,
            error_text(error),
        )

    async def mark_user_gone(self, claim: UserClaim) -> None:
        """The user no longer exists upstream: it and its memberships are marked removed."""
        async with self.pool.acquire() as conn, conn.transaction():
            updated = await conn.fetchval(
                f"""UPDATE sync_cursors SET state = 'gone', claimed_by = NULL, lease_until = NULL,
                          {LISTING_AT_PAGE_ONE}
                   WHERE chat_service_sid = $1 AND user_sid = $2 AND claimed_by = $3
                     AND state = 'pending'
                   RETURNING 1""",
                claim.chat_service_sid,
                claim.user_sid,
                claim.token,
            )
            if updated is not None:
                removed = await _remove_users(conn, claim.chat_service_sid, [claim.user_sid])
                await conn.execute(
                    """UPDATE sync_cursors SET run_rows_removed = run_rows_removed + $3
                       WHERE chat_service_sid = $1 AND user_sid = $2""",
                    claim.chat_service_sid,
                    claim.user_sid,
                    removed,
                )

    async def release_discovery(self, claim: DiscoveryClaim) -> None:
        """Give a users listing back unfinished if this claim still holds it."""
        await self.pool.execute(
            """UPDATE sync_discovery SET claimed_by = NULL, lease_until = NULL
               WHERE run_id = $1 AND chat_service_sid = $2 AND claimed_by = $3""",
            claim.run_id,
            claim.chat_service_sid,
            claim.token,
        )

    async def release_user(self, claim: UserClaim) -> None:
        """Give a claim back unfinished (shutdown): another worker may continue it."""
        await self.pool.execute(
            """UPDATE sync_cursors SET claimed_by = NULL, lease_until = NULL
               WHERE chat_service_sid = $1 AND user_sid = $2 AND claimed_by = $3""",
            claim.chat_service_sid,
            claim.user_sid,
            claim.token,
        )

    async def release_all(self, owner: str) -> None:
        """Give back every claim of this worker (shutdown)."""
        async with self.pool.acquire() as conn, conn.transaction():
            for table in CLAIM_TABLES:
                await conn.execute(
                    f"UPDATE {table} SET claimed_by = NULL, lease_until = NULL "
                    "WHERE split_part(claimed_by, '/', 1) = $1",
                    owner.replace("/", "-"),
                )

    async def interrupt_pass(self, run_id: int, owner: str) -> bool:
        """After a stop: give back this worker's claims and, when no other worker holds a live
        claim on the pass, record it 'interrupted' (the next sync or tick continues it).
        True when recorded; False when others still work it (it stays 'running')."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM sync_runs WHERE run_id = $1 FOR UPDATE", run_id)
            for table in PASS_CLAIM_TABLES:
                await conn.execute(
                    f"UPDATE {table} SET claimed_by = NULL, lease_until = NULL "
                    "WHERE split_part(claimed_by, '/', 1) = $1",
                    owner.replace("/", "-"),
                )
            if await _has_live_claims(conn, run_id):
                return False
            status = await conn.execute(
                """UPDATE sync_runs SET status = 'interrupted'
                   WHERE run_id = $1 AND status = 'running'""",
                run_id,
            )
            return bool(status == "UPDATE 1")


# --- statements shared by the methods above ---------------------------------------------------


def error_text(error: str) -> str:
    """An error message as a text column holds it, cut to 2,000 characters. Upstream text
    quoted in it (Twilio's message, a next_page_url) may hold a NUL or, through JSON's
    escapes, a lone surrogate, which PostgreSQL's text refuses: they are kept, escaped
    (``\\x00``, ``\\ud800``), so that recording the failure cannot fail too."""
    escaped = error.replace("\x00", "\\x00").encode("utf-8", "backslashreplace")
    return escaped.decode("utf-8")[:2000]


def new_claim_token(owner: str) -> str:
    """A claim's own token: its owner and a nonce (the owner part never holds a '/')."""
    return f"{owner.replace('/', '-')}/{secrets.token_hex(4)}"


async def _lease_start(
    conn: asyncpg.Connection, run_id: int, starter: str | None, lease_seconds: float
) -> None:
    """Lease the start of pass ``run_id`` to ``starter`` (``begin_or_resume_pass``)."""
    if starter is None:
        return
    await conn.execute(
        """INSERT INTO sync_pass_starts (run_id, claimed_by, lease_until)
           VALUES ($1, $2, now() + make_interval(secs => $3))
           ON CONFLICT (run_id, claimed_by) DO UPDATE SET lease_until = EXCLUDED.lease_until""",
        run_id,
        starter,
        lease_seconds,
    )


async def _drop_starts(conn: asyncpg.Connection, run_id: int) -> None:
    """Drop every start of pass ``run_id``: it ended (finished, or superseded)."""
    await conn.execute("DELETE FROM sync_pass_starts WHERE run_id = $1", run_id)


async def _has_live_claims(conn: asyncpg.Connection, run_id: int) -> bool:
    """Whether a worker of the pass holds a live claim, or is starting it (a re-list's claim on
    one of its users' cursors is no pass's work: it neither keeps the pass running nor makes it
    busy)."""
    live: bool = await conn.fetchval(
        """SELECT EXISTS (SELECT 1 FROM sync_cursors
                          WHERE run_id = $1 AND lease_until > now()
                            AND right(split_part(claimed_by, '/', 1), length($2)) <> $2)
               OR EXISTS (SELECT 1 FROM sync_discovery
                          WHERE run_id = $1 AND lease_until > now())
               OR EXISTS (SELECT 1 FROM sync_pass_starts
                          WHERE run_id = $1 AND lease_until > now())""",
        run_id,
        RELIST_OWNER_SUFFIX,
    )
    return live


def _columns(rows: Sequence[Any], width: int) -> list[list[Any]]:
    """Row objects (slotted dataclasses) -> one list per column, for ``unnest``."""
    if not rows:
        return [[] for _ in range(width)]
    names = type(rows[0]).__slots__
    return [[getattr(r, name) for r in rows] for name in names]


# A users page travels as one JSON document, an array per user in ``UserRow`` field order, as
# a conversations page does: a column array per field cost the worker three times the CPU (each
# element checked by asyncpg's array encoder). Attributes and links are JSON text, sent as
# strings: ``->>`` then ``::jsonb`` keeps a text "null" apart from no value at all.
_USERS_UPSERT_SQL = """
INSERT INTO users AS u (chat_service_sid, user_sid, account_sid, role_sid,
       identity, friendly_name, attributes, is_online, is_notifiable,
       date_created, date_updated, url, links)
SELECT r ->> 0, r ->> 1, r ->> 2, r ->> 3, r ->> 4, r ->> 5, (r ->> 6)::jsonb,
       (r ->> 7)::bool, (r ->> 8)::bool, (r ->> 9)::timestamptz, (r ->> 10)::timestamptz,
       r ->> 11, (r ->> 12)::jsonb
FROM jsonb_array_elements($1::jsonb) r
ORDER BY (r ->> 1) COLLATE "C"  -- one order for every writer of the table: no deadlocks
ON CONFLICT (chat_service_sid, user_sid) DO UPDATE SET
  account_sid = EXCLUDED.account_sid, role_sid = EXCLUDED.role_sid,
  identity = EXCLUDED.identity, friendly_name = EXCLUDED.friendly_name,
  attributes = EXCLUDED.attributes, is_online = EXCLUDED.is_online,
  is_notifiable = EXCLUDED.is_notifiable,
  date_created = EXCLUDED.date_created, date_updated = EXCLUDED.date_updated,
  url = EXCLUDED.url, links = EXCLUDED.links,
  changed_at = now(), removed_at = NULL
WHERE (u.account_sid, u.role_sid, u.identity, u.friendly_name, u.attributes,
       u.is_online, u.is_notifiable, u.date_created, u.date_updated, u.url,
       u.links, u.removed_at IS NULL)
  IS DISTINCT FROM (EXCLUDED.account_sid, EXCLUDED.role_sid,
       EXCLUDED.identity, EXCLUDED.friendly_name, EXCLUDED.attributes,
       EXCLUDED.is_online, EXCLUDED.is_notifiable, EXCLUDED.date_created,
       EXCLUDED.date_updated, EXCLUDED.url, EXCLUDED.links, true)
"""
_user_fields = operator.attrgetter(*(f.name for f in dataclasses.fields(UserRow)))


def _users_document(rows: Sequence[UserRow]) -> bytes:
    """The users upsert's one parameter (``_USERS_UPSERT_SQL``)."""
    return msgspec.json.encode(list(map(_user_fields, rows)))


class _RejectedItem(msgspec.Struct, gc=False):
    item: str
    reason: str


class _BatchPage(msgspec.Struct, gc=False):
    """One page of a ``save_pages`` batch, as the page statement reads it (``page`` below)."""

    ord: int  # its place in the batch, from 1
    service: str
    user_sid: str
    token: str
    expected: int
    next_path: str | None
    run_id: int
    members: msgspec.Raw  # the page's membership fields (ConversationsPage.members)
    conversations: list[tuple[Any, ...]]  # those it writes (conversation_fields)
    seen: str
    rejected: list[_RejectedItem] | None
    source: str
    items: int
    counts: bool  # into its pass's run_* figures (PageWrite.counts)


# A batch of pages of many users' listings, in one statement (one transaction, one commit):
# guard each page's cursor (its claim, its page number: a stale page matches nothing and writes
# nothing), read the rows out of the batch's JSON document, upsert its conversations once each
# (newest date_updated wins; sorted, so writers lock shared rows in one order; only those the
# writer did not already write at that date_updated this pass), insert the memberships of a
# user that has none yet and upsert the others' (a row stored as the page has it is left out
# of either upsert, unlocked), quarantine the rejected items, mark removed what a complete
# listing did not list (unless an item could not be identified), and advance every cursor
# with its page's counts.
# Per page, the removal and the upsert touch disjoint rows (the listing's own SIDs are listed).
_PAGES_SQL = """
WITH page AS (
    -- The batch is one JSON document (an array of _BatchPage): one parameter to encode and
    -- send, where an array per field cost the worker three times as much CPU.
    -- The large fields (members, conversations) are read where they are used, by position
    -- ($1 -> ord - 1: direct in a jsonb array), not carried through every join of the page.
    -- SIDs are read as COLLATE "C", as their columns hold them (migration 007): the sorts below
    -- compare bytes, not the database's locale.
    SELECT * FROM jsonb_to_recordset($1::jsonb) AS p(
        ord int, service text COLLATE "C", user_sid text COLLATE "C", token text, expected int,
        next_path text, run_id bigint, seen text, rejected jsonb, source text, items int,
        counts boolean)
    -- $4: commit without waiting for the WAL flush. set_config(..., true) holds for this
    -- statement's own transaction, read at its commit; CASE keeps it from being evaluated
    -- otherwise.
    WHERE CASE WHEN $4::bool THEN set_config('synchronous_commit', 'off', true) IS NOT NULL
               ELSE true END
),
guard AS (
    -- One primary-key lookup per page, the claim checked after it: a join would let the
    -- planner scan every pending cursor of the pass, a cost that grows with the pass.
    -- OFFSET 0 keeps the checks below out of the lookup: pushed into it, state = 'pending'
    -- let the planner use the partial index sync_cursors_pending (all the pass's pending
    -- cursors under one key) and filter it for the SID, in plans made while the table was
    -- small: 20,000 rows read a page at 40,000 users, in half the passes.
    SELECT p.ord, p.service, p.user_sid, p.next_path IS NULL AS complete,
           CASE WHEN c.listing_pages = 0 THEN string_to_array(p.seen, ',')
                ELSE c.seen_conversations || string_to_array(p.seen, ',') END AS listed,
           -- A user without a membership row yet (a first listing): its rows are plain
           -- inserts. Nothing else can insert them meanwhile: a user's memberships are
           -- written only under its cursor, locked above, a page at a time, and a page's SIDs
           -- are distinct (worker/model.py).
           NOT EXISTS (SELECT FROM memberships m
                       WHERE m.chat_service_sid = p.service AND m.user_sid = p.user_sid) AS fresh
    FROM page p CROSS JOIN LATERAL (
        SELECT c.run_id, c.claimed_by, c.listing_pages, c.state, c.seen_conversations
        FROM sync_cursors c
        WHERE c.chat_service_sid = p.service AND c.user_sid = p.user_sid
        OFFSET 0 FOR UPDATE
    ) c
    WHERE c.run_id = p.run_id AND c.claimed_by = p.token AND c.listing_pages = p.expected
      AND c.state = 'pending'
),
item AS (
    -- Each membership is an array of its fields, in worker/model.py's MEMBER_FIELDS order
    -- (keyless: a fifth less to parse). A JSON null read with -> is jsonb 'null': NULLIF.
    SELECT g.service, g.user_sid, g.fresh,
           (m ->> 0) COLLATE "C" AS conversation_sid, m ->> 1 AS participant_sid,
           m ->> 2 AS notification_level, (m ->> 3)::bigint AS unread_messages_count,
           (m ->> 4)::bigint AS last_read_message_index, m ->> 5 AS url,
           nullif(m -> 6, 'null') AS links
    FROM guard g
    CROSS JOIN LATERAL jsonb_array_elements($1::jsonb -> (g.ord - 1) -> 'members') AS m
),
conversation AS (
    -- Each in CONVERSATION_FIELDS order (worker/model.py).
    SELECT g.service, (c ->> 0) COLLATE "C" AS conversation_sid, c ->> 1 AS account_sid,
           c ->> 2 AS friendly_name, c ->> 3 AS unique_name, nullif(c -> 4, 'null') AS attributes,
           c ->> 5 AS conversation_state, c ->> 6 AS created_by,
           (c ->> 7)::timestamptz AS date_created, (c ->> 8)::timestamptz AS date_updated,
           (c ->> 9)::timestamptz AS date_inactive, (c ->> 10)::timestamptz AS date_closed
    FROM guard g
    CROSS JOIN LATERAL jsonb_array_elements($1::jsonb -> (g.ord - 1) -> 'conversations') AS c
),
conversations_upserted AS (
    INSERT INTO conversations AS c (chat_service_sid, conversation_sid, account_sid,
           friendly_name, unique_name, attributes, conversation_state, created_by,
           date_created, date_updated, date_inactive, date_closed)
    SELECT n.* FROM (
        SELECT DISTINCT ON (i.service, i.conversation_sid)
               i.service, i.conversation_sid, i.account_sid, i.friendly_name, i.unique_name,
               i.attributes, i.conversation_state, i.created_by, i.date_created,
               i.date_updated, i.date_inactive, i.date_closed
        FROM conversation i
        ORDER BY i.service, i.conversation_sid, i.date_updated DESC NULLS LAST
    ) n
    -- A row stored as it is here is left out before the upsert (as memberships' are, below).
    -- Judged by the snapshot: had another batch committed a version since, newest-wins makes
    -- this batch's effect the one it would have had committing first (the old code, locking,
    -- could overwrite that version with this one only where date_updated ties or is null).
    WHERE NOT EXISTS (
        SELECT FROM conversations o
        WHERE o.chat_service_sid = n.service AND o.conversation_sid = n.conversation_sid
          AND (o.account_sid, o.friendly_name, o.unique_name, o.attributes,
               o.conversation_state, o.created_by, o.date_created, o.date_updated,
               o.date_inactive, o.date_closed)
              IS NOT DISTINCT FROM (n.account_sid, n.friendly_name, n.unique_name,
               n.attributes, n.conversation_state, n.created_by, n.date_created,
               n.date_updated, n.date_inactive, n.date_closed)
        OFFSET 0)
    ORDER BY n.service, n.conversation_sid
    ON CONFLICT (chat_service_sid, conversation_sid) DO UPDATE SET
      account_sid = EXCLUDED.account_sid, friendly_name = EXCLUDED.friendly_name,
      unique_name = EXCLUDED.unique_name, attributes = EXCLUDED.attributes,
      conversation_state = EXCLUDED.conversation_state, created_by = EXCLUDED.created_by,
      date_created = EXCLUDED.date_created, date_updated = EXCLUDED.date_updated,
      date_inactive = EXCLUDED.date_inactive, date_closed = EXCLUDED.date_closed,
      changed_at = now()
    WHERE (c.date_updated IS NULL OR EXCLUDED.date_updated IS NULL
           OR EXCLUDED.date_updated >= c.date_updated)
      AND (c.account_sid, c.friendly_name, c.unique_name, c.attributes,
           c.conversation_state, c.created_by, c.date_created, c.date_updated,
           c.date_inactive, c.date_closed)
      IS DISTINCT FROM (EXCLUDED.account_sid, EXCLUDED.friendly_name,
           EXCLUDED.unique_name, EXCLUDED.attributes, EXCLUDED.conversation_state,
           EXCLUDED.created_by, EXCLUDED.date_created, EXCLUDED.date_updated,
           EXCLUDED.date_inactive, EXCLUDED.date_closed)
    RETURNING 1
),
memberships_inserted AS (
    -- (A plain insert costs PostgreSQL about 3% less a page of a first pass than the upsert
    -- below, which probes the key and inserts speculatively: measured by replaying a pass.)
    INSERT INTO memberships AS m (chat_service_sid, user_sid, conversation_sid,
           participant_sid, notification_level, unread_messages_count,
           last_read_message_index, url, links)
    SELECT i.service, i.user_sid, i.conversation_sid, i.participant_sid, i.notification_level,
           i.unread_messages_count, i.last_read_message_index, i.url, i.links
    FROM item i WHERE i.fresh
    ORDER BY 1, 2, 3
    RETURNING m.chat_service_sid AS service, m.user_sid, true AS inserted
),
memberships_upserted AS (
    INSERT INTO memberships AS m (chat_service_sid, user_sid, conversation_sid,
           participant_sid, notification_level, unread_messages_count,
           last_read_message_index, url, links)
    SELECT i.service, i.user_sid, i.conversation_sid, i.participant_sid, i.notification_level,
           i.unread_messages_count, i.last_read_message_index, i.url, i.links
    FROM item i
    -- A live row stored as the page has it is left out before the upsert: ON CONFLICT ...
    -- WHERE would lock it (a row lock is a write, and WAL) only to find nothing to update. It
    -- is judged by this statement's snapshot, not re-read under a lock, which is safe: every
    -- other writer of a user's memberships takes its cursor first, and guard holds it locked.
    -- OFFSET 0 keeps the probe a subplan run per row, never an anti-join reading the table
    -- whole; like guard's lookups, it takes the primary key once the plan sees rows.
    WHERE NOT i.fresh AND NOT EXISTS (
        SELECT FROM memberships o
        WHERE o.chat_service_sid = i.service AND o.user_sid = i.user_sid
          AND o.conversation_sid = i.conversation_sid AND o.removed_at IS NULL
          AND (o.participant_sid, o.notification_level, o.unread_messages_count,
               o.last_read_message_index, o.url, o.links)
              IS NOT DISTINCT FROM (i.participant_sid, i.notification_level,
               i.unread_messages_count, i.last_read_message_index, i.url, i.links)
        OFFSET 0)
    ORDER BY 1, 2, 3
    ON CONFLICT (chat_service_sid, user_sid, conversation_sid) DO UPDATE SET
      participant_sid = EXCLUDED.participant_sid,
      notification_level = EXCLUDED.notification_level,
      unread_messages_count = EXCLUDED.unread_messages_count,
      last_read_message_index = EXCLUDED.last_read_message_index,
      url = EXCLUDED.url, links = EXCLUDED.links, changed_at = now(), removed_at = NULL
    WHERE (m.participant_sid, m.notification_level, m.unread_messages_count,
           m.last_read_message_index, m.url, m.links, m.removed_at IS NULL)
      IS DISTINCT FROM (EXCLUDED.participant_sid, EXCLUDED.notification_level,
           EXCLUDED.unread_messages_count, EXCLUDED.last_read_message_index,
           EXCLUDED.url, EXCLUDED.links, true)
    RETURNING m.chat_service_sid AS service, m.user_sid, (xmax = 0) AS inserted
),
quarantined AS (
    INSERT INTO quarantine (run_id, chat_service_sid, user_sid, source_path, item, reason)
    SELECT p.run_id, p.service, p.user_sid, p.source, q.item, q.reason
    FROM guard g JOIN page p ON p.ord = g.ord
    CROSS JOIN LATERAL jsonb_to_recordset(p.rejected) AS q(item text, reason text)
    RETURNING chat_service_sid AS service, user_sid
),
gone AS (
    -- A complete listing's user: its live memberships minus every SID the listing named, as a
    -- set difference (hashed or sorted: linear), not each membership looked up in the array
    -- (quadratic in the user's conversations). Only for a listing's last page (complete) of a
    -- user that had a membership before this statement (not fresh): for the others there is
    -- nothing to remove yet. The conditions are all guard's, so they filter its scan, before
    -- the difference is computed (joined to page instead, the planner applied them after it,
    -- and a heavy user's every page read all its memberships).
    SELECT x.chat_service_sid, x.user_sid, x.conversation_sid
    FROM guard g
    CROSS JOIN LATERAL (
        SELECT m.chat_service_sid, m.user_sid, m.conversation_sid FROM memberships m
        WHERE m.chat_service_sid = g.service AND m.user_sid = g.user_sid
          AND m.removed_at IS NULL
        EXCEPT
        SELECT g.service, g.user_sid, unnest(g.listed)
    ) x
    WHERE g.complete AND NOT g.fresh AND NOT ($2::text = ANY (g.listed))
),
removed AS (
    UPDATE memberships m SET removed_at = now()
    FROM gone
    WHERE m.chat_service_sid = gone.chat_service_sid AND m.user_sid = gone.user_sid
      AND m.conversation_sid = gone.conversation_sid AND m.removed_at IS NULL
    RETURNING m.chat_service_sid AS service, m.user_sid
),
counts AS (
    SELECT g.ord, coalesce(u.inserted, 0) AS inserted, coalesce(u.updated, 0) AS updated,
           coalesce(r.removed, 0) AS removed, coalesce(q.quarantined, 0) AS quarantined
    FROM guard g
    LEFT JOIN (SELECT service, user_sid, count(*) FILTER (WHERE inserted)::int AS inserted,
                      count(*) FILTER (WHERE NOT inserted)::int AS updated
               FROM (SELECT * FROM memberships_inserted
                     UNION ALL SELECT * FROM memberships_upserted) w GROUP BY 1, 2) u
           ON u.service = g.service AND u.user_sid = g.user_sid
    LEFT JOIN (SELECT service, user_sid, count(*)::int AS removed FROM removed GROUP BY 1, 2) r
           ON r.service = g.service AND r.user_sid = g.user_sid
    LEFT JOIN (SELECT service, user_sid, count(*)::int AS quarantined
               FROM quarantined GROUP BY 1, 2) q
           ON q.service = g.service AND q.user_sid = g.user_sid
),
advanced AS (
    UPDATE sync_cursors c SET
      next_page_path = p.next_path,
      listing_pages = CASE WHEN p.next_path IS NULL THEN 0 ELSE c.listing_pages + 1 END,
      listing_started_at = CASE WHEN c.listing_pages = 0 THEN now()
                                ELSE c.listing_started_at END,
      seen_conversations = CASE WHEN p.next_path IS NULL THEN '{}'::text[] ELSE g.listed END,
      state = CASE WHEN p.next_path IS NULL THEN 'done' ELSE c.state END,
      last_listed_at = CASE WHEN p.next_path IS NULL THEN now() ELSE c.last_listed_at END,
      last_error = CASE WHEN p.next_path IS NULL THEN NULL ELSE c.last_error END,
      claimed_by = CASE WHEN p.next_path IS NULL THEN NULL ELSE c.claimed_by END,
      lease_until = CASE WHEN p.next_path IS NULL THEN NULL
                         ELSE now() + make_interval(secs => $3) END,
      -- a re-list's page (counts false) is no pass's work: its pass's figures stay as they are
      run_pages = c.run_pages + p.counts::int,
      run_rows_inserted = c.run_rows_inserted + k.inserted * p.counts::int,
      run_rows_updated = c.run_rows_updated + k.updated * p.counts::int,
      run_rows_unchanged = c.run_rows_unchanged
                           + (p.items - k.inserted - k.updated) * p.counts::int,
      run_rows_removed = c.run_rows_removed + k.removed * p.counts::int,
      run_rows_quarantined = c.run_rows_quarantined + k.quarantined * p.counts::int
    FROM guard g JOIN page p ON p.ord = g.ord JOIN counts k ON k.ord = g.ord
    WHERE c.chat_service_sid = g.service AND c.user_sid = g.user_sid
    RETURNING g.ord
)
SELECT p.ord, a.ord IS NOT NULL AS ok, k.inserted, k.updated, k.removed, k.quarantined,
       coalesce(p.next_path IS NULL AND $2::text = ANY (g.listed), false) AS removals_skipped
FROM page p LEFT JOIN advanced a ON a.ord = p.ord LEFT JOIN guard g ON g.ord = p.ord
     LEFT JOIN counts k ON k.ord = p.ord
"""


async def _remove_users(conn: asyncpg.Connection, service: str, user_sids: list[str]) -> int:
    """Mark users and their memberships removed; returns the memberships marked."""
    if not user_sids:
        return 0
    await conn.execute(
        """UPDATE users SET removed_at = now()
           WHERE chat_service_sid = $1 AND user_sid = ANY($2::text[]) AND removed_at IS NULL""",
        service,
        user_sids,
    )
    result: str = await conn.execute(
        """UPDATE memberships SET removed_at = now()
           WHERE chat_service_sid = $1 AND user_sid = ANY($2::text[]) AND removed_at IS NULL""",
        service,
        user_sids,
    )
    return int(result.rsplit(" ", 1)[-1])


async def _quarantine(
    conn: asyncpg.Connection,
    run_id: int,
    service: str | None,
    user: str | None,
    source_path: str,
    rejected: Sequence[Rejected],
) -> None:
    if not rejected:
        return
    await conn.executemany(
        """INSERT INTO quarantine (run_id, chat_service_sid, user_sid, source_path, item, reason)
           VALUES ($1, $2, $3, $4, $5, $6)""",
        [(run_id, service, user, source_path, r.item, r.reason) for r in rejected],
    )


# --- reports (``convsync status``) ------------------------------------------------------------


async def recent_passes(conn: asyncpg.Connection, limit: int = 10) -> list[dict[str, Any]]:
    """The last passes, newest first."""
    rows = await conn.fetch(
        """SELECT run_id, status, started_at, finished_at,
                  extract(epoch FROM coalesce(finished_at, now()) - started_at)::float8 AS seconds,
                  users_synced, users_failed, users_gone, pages, rows_inserted, rows_updated,
                  rows_unchanged, rows_removed, rows_quarantined, error
           FROM sync_runs ORDER BY run_id DESC LIMIT $1""",
        limit,
    )
    return [dict(r) for r in rows]


async def troubled_users(conn: asyncpg.Connection, limit: int = 50) -> list[dict[str, Any]]:
    """Users whose last attempt failed, or whose listing is mid-way."""
    rows = await conn.fetch(
        """SELECT chat_service_sid, user_sid, state, run_id, listing_pages, last_error,
                  last_error_at, claimed_by, lease_until
           FROM sync_cursors
           WHERE state = 'failed' OR listing_pages > 0
           ORDER BY (state = 'failed') DESC, last_error_at DESC NULLS LAST, user_sid
           LIMIT $1""",
        limit,
    )
    return [dict(r) for r in rows]
