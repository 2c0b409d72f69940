-- convsync schema: a typed mirror of Twilio Conversations user memberships, plus sync bookkeeping.
-- Keys follow the API: a service, its users, and their conversations within the service.

CREATE TABLE services (
    chat_service_sid text PRIMARY KEY CHECK (chat_service_sid ~ '^IS[0-9a-fA-F]{32}$'),
    account_sid      text,
    friendly_name    text,
    date_created     timestamptz,
    date_updated     timestamptz,
    url              text,
    links            jsonb,
    first_seen_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    chat_service_sid text NOT NULL REFERENCES services,
    user_sid         text NOT NULL CHECK (user_sid ~ '^US[0-9a-fA-F]{32}$'),
    account_sid      text,
    role_sid         text,
    identity         text,
    friendly_name    text,
    attributes       jsonb,
    is_online        boolean,
    is_notifiable    boolean,
    date_created     timestamptz,
    date_updated     timestamptz,
    url              text,
    links            jsonb,
    first_seen_at    timestamptz NOT NULL DEFAULT now(),
    changed_at       timestamptz NOT NULL DEFAULT now(),
    removed_at       timestamptz,
    PRIMARY KEY (chat_service_sid, user_sid)
);

-- Conversation-level fields: shared by every member, newest data kept.
CREATE TABLE conversations (
    chat_service_sid   text NOT NULL REFERENCES services,
    conversation_sid   text NOT NULL CHECK (conversation_sid ~ '^CH[0-9a-fA-F]{32}$'),
    account_sid        text,
    friendly_name      text,
    unique_name        text,
    attributes         jsonb,
    conversation_state text CHECK (conversation_state IN ('inactive', 'active', 'closed')),
    created_by         text,
    date_created       timestamptz,
    date_updated       timestamptz,
    date_inactive      timestamptz,
    date_closed        timestamptz,
    first_seen_at      timestamptz NOT NULL DEFAULT now(),
    changed_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chat_service_sid, conversation_sid)
);

-- User-level fields: one row per (service, user, conversation); never deleted, removed_at instead.
CREATE TABLE memberships (
    chat_service_sid        text NOT NULL,
    user_sid                text NOT NULL,
    conversation_sid        text NOT NULL,
    participant_sid         text,
    notification_level      text CHECK (notification_level IN ('default', 'muted')),
    unread_messages_count   bigint,
    last_read_message_index bigint,
    url                     text,
    links                   jsonb,
    first_seen_at           timestamptz NOT NULL DEFAULT now(),
    changed_at              timestamptz NOT NULL DEFAULT now(),
    removed_at              timestamptz,
    PRIMARY KEY (chat_service_sid, user_sid, conversation_sid),
    FOREIGN KEY (chat_service_sid, user_sid) REFERENCES users,
    FOREIGN KEY (chat_service_sid, conversation_sid) REFERENCES conversations
);
CREATE INDEX memberships_conversation ON memberships (chat_service_sid, conversation_sid);

-- One row per pass. At most one pass runs at a time: replicas and restarts share it.
CREATE TABLE sync_runs (
    run_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    status        text NOT NULL DEFAULT 'running'
                  CHECK (status IN ('running', 'succeeded', 'partial', 'failed')),
    scope         jsonb NOT NULL DEFAULT '{}',
    tick          timestamptz UNIQUE,  -- the schedule tick a `convsync run` pass serves
    error         text,
    users_synced  integer NOT NULL DEFAULT 0,
    users_failed  integer NOT NULL DEFAULT 0,
    users_gone    integer NOT NULL DEFAULT 0,
    pages         bigint NOT NULL DEFAULT 0,
    rows_inserted bigint NOT NULL DEFAULT 0,
    rows_updated  bigint NOT NULL DEFAULT 0,
    rows_unchanged bigint NOT NULL DEFAULT 0,
    rows_removed  bigint NOT NULL DEFAULT 0,
    rows_quarantined bigint NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX sync_runs_one_running ON sync_runs ((true)) WHERE status = 'running';

-- Users listing of one service within one pass (discovery), resumable by page.
CREATE TABLE sync_discovery (
    run_id           bigint NOT NULL REFERENCES sync_runs,
    chat_service_sid text NOT NULL REFERENCES services,
    next_page_path   text,
    pages            integer NOT NULL DEFAULT 0,
    users_seen       integer NOT NULL DEFAULT 0,
    completed_at     timestamptz,
    error            text,         -- set when the listing ended without its last page
    claimed_by       text,
    lease_until      timestamptz,
    PRIMARY KEY (run_id, chat_service_sid)
);

-- Per user: the work state within the current pass and the cursor of the current listing.
-- A listing is the walk from a user's first page to its last; it may span interruptions and
-- passes. seen_conversations holds the SIDs seen so far in it, for removal detection.
CREATE TABLE sync_cursors (
    chat_service_sid   text NOT NULL,
    user_sid           text NOT NULL,
    run_id             bigint NOT NULL REFERENCES sync_runs,
    state              text NOT NULL DEFAULT 'pending'
                       CHECK (state IN ('pending', 'done', 'failed', 'gone')),
    next_page_path     text,
    listing_started_at timestamptz,
    listing_pages      integer NOT NULL DEFAULT 0,
    seen_conversations text[] NOT NULL DEFAULT '{}',
    last_listed_at     timestamptz,
    attempts           integer NOT NULL DEFAULT 0,
    last_error         text,
    last_error_at      timestamptz,
    claimed_by         text,
    lease_until        timestamptz,
    run_pages          integer NOT NULL DEFAULT 0,
    run_rows_inserted  integer NOT NULL DEFAULT 0,
    run_rows_updated   integer NOT NULL DEFAULT 0,
    run_rows_unchanged integer NOT NULL DEFAULT 0,
    run_rows_removed   integer NOT NULL DEFAULT 0,
    run_rows_quarantined integer NOT NULL DEFAULT 0,
    PRIMARY KEY (chat_service_sid, user_sid),
    FOREIGN KEY (chat_service_sid, user_sid) REFERENCES users
);
CREATE INDEX sync_cursors_pending ON sync_cursors (run_id) WHERE state = 'pending';
CREATE INDEX sync_cursors_claimed ON sync_cursors (claimed_by) WHERE claimed_by IS NOT NULL;

-- Items that could not be stored as typed rows: kept raw with the reason and their origin.
CREATE TABLE quarantine (
    quarantine_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id           bigint REFERENCES sync_runs,
    chat_service_sid text,
    user_sid         text,
    source_path      text NOT NULL,
    item             text NOT NULL,
    reason           text NOT NULL,
    quarantined_at   timestamptz NOT NULL DEFAULT now()
);

-- The API resource, one row per current membership, fields named as in the API.
CREATE VIEW user_conversations_v AS
SELECT c.account_sid,
       m.chat_service_sid,
       m.conversation_sid,
       m.unread_messages_count,
       m.last_read_message_index,
       m.participant_sid,
       m.user_sid,
       c.friendly_name,
       c.conversation_state,
       c.date_inactive,
       c.date_closed,
       c.attributes,
       c.date_created,
       c.date_updated,
       c.created_by,
       m.notification_level,
       c.unique_name,
       m.url,
       m.links,
       m.first_seen_at,
       greatest(m.changed_at, k.last_listed_at) AS last_seen_at
FROM memberships m
JOIN conversations c USING (chat_service_sid, conversation_sid)
LEFT JOIN sync_cursors k USING (chat_service_sid, user_sid)
WHERE m.removed_at IS NULL;
