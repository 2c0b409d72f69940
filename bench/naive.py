"""The naive alternative: the official ``twilio`` SDK listing user by user, one upsert per row.

``client.conversations.v1.services(IS).users(US).user_conversations.list()`` for each user in
turn (one request at a time), then ``INSERT ... ON CONFLICT DO UPDATE`` per row with psycopg2,
one commit per user. The SDK is pointed at the simulator through its ``conversations`` domain's
``base_url``; ``next_page_url`` is absolute, so later pages follow it there too.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench.sim import SimProcess, count

_DDL = """
CREATE SCHEMA IF NOT EXISTS naive;
CREATE TABLE IF NOT EXISTS naive.user_conversations (
    chat_service_sid text NOT NULL, user_sid text NOT NULL, conversation_sid text NOT NULL,
    account_sid text, friendly_name text, unique_name text, attributes jsonb,
    conversation_state text, timers jsonb, created_by text, date_created timestamptz,
    date_updated timestamptz, participant_sid text, notification_level text,
    unread_messages_count bigint, last_read_message_index bigint, url text, links jsonb,
    PRIMARY KEY (chat_service_sid, user_sid, conversation_sid))
"""
_UPSERT = """
INSERT INTO naive.user_conversations VALUES
    (%s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s::jsonb, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)
ON CONFLICT (chat_service_sid, user_sid, conversation_sid) DO UPDATE SET
    account_sid = EXCLUDED.account_sid, friendly_name = EXCLUDED.friendly_name,
    unique_name = EXCLUDED.unique_name, attributes = EXCLUDED.attributes,
    conversation_state = EXCLUDED.conversation_state, timers = EXCLUDED.timers,
    created_by = EXCLUDED.created_by, date_created = EXCLUDED.date_created,
    date_updated = EXCLUDED.date_updated, participant_sid = EXCLUDED.participant_sid,
    notification_level = EXCLUDED.notification_level,
    unread_messages_count = EXCLUDED.unread_messages_count,
    last_read_message_index = EXCLUDED.last_read_message_index, url = EXCLUDED.url,
    links = EXCLUDED.links
"""


@dataclass(frozen=True)
class NaiveRun:
    """The SDK loop over a subset of users (per-page rates extrapolate to the whole set)."""

    users: int
    seconds: float
    pages: int
    rows: int
    sdk_version: str

    @property
    def pages_per_second(self) -> float:
        return self.pages / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "pages_per_second": self.pages_per_second}


def _row(item: Any) -> tuple[Any, ...]:
    def js(value: Any) -> str | None:
        return None if value is None else json.dumps(value)

    return (
        item.chat_service_sid, item.user_sid, item.conversation_sid, item.account_sid,
        item.friendly_name, item.unique_name, item.attributes, item.conversation_state,
        js(item.timers), item.created_by, item.date_created, item.date_updated,
        item.participant_sid, item.notification_level, item.unread_messages_count,
        item.last_read_message_index, item.url, js(item.links),
    )  # fmt: skip


def run_naive(sim: SimProcess, db_url: str, users: int) -> NaiveRun:
    """List the first ``users`` users' conversations with the SDK and upsert them row by row."""
    import psycopg2  # type: ignore[import-untyped]
    import twilio  # type: ignore[import-untyped]
    from twilio.rest import Client  # type: ignore[import-untyped]

    client = Client(sim.account_sid, sim.auth_token)
    client.conversations.base_url = sim.url
    conn = psycopg2.connect(db_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(_DDL)
        sim.reset_stats()
        started = time.perf_counter()
        rows = done = 0
        api = client.conversations.v1
        for service in api.services.list():
            wanted = users - done
            listed = api.services(service.sid).users.list(limit=wanted, page_size=min(50, wanted))
            for user in listed:
                listing = api.services(service.sid).users(user.sid).user_conversations.list()
                with conn, conn.cursor() as cur:  # one transaction per user
                    for item in listing:
                        cur.execute(_UPSERT, _row(item))
                rows += len(listing)
                done += 1
            if done >= users:
                break
        seconds = time.perf_counter() - started
    finally:
        conn.close()
    stats = sim.stats()
    return NaiveRun(done, seconds, count(stats, 200), rows, twilio.__version__)
