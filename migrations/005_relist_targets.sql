-- Targeted re-lists (Twilio webhooks, CONVSYNC_WEBHOOKS): a durable queue of the users an event
-- changed, recorded before the webhook is answered 200.

-- One row per webhook recorded, by Twilio's I-Twilio-Idempotency-Token (else a digest of the
-- body): a retried or replayed webhook finds its row and adds nothing. Pruned after a day.
CREATE TABLE webhook_events (
    idempotency_key text PRIMARY KEY,
    event_type      text NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_events_received ON webhook_events (received_at);

-- One row per user to re-list from page one. Events for a user already waiting coalesce into
-- its row (requests + 1, generation + 1); a re-list serves the generation it claimed, so an
-- event that arrives while it runs leaves the row waiting for another re-list.
CREATE TABLE relist_targets (
    chat_service_sid   text NOT NULL CHECK (chat_service_sid ~ '^IS[0-9a-fA-F]{32}$'),
    user_ref           text NOT NULL,  -- a user SID, or an identity the mirror does not know
    requested_at       timestamptz NOT NULL DEFAULT now(),  -- oldest request not yet served
    rerequested_at     timestamptz,  -- first request since the running re-list was claimed
    due_at             timestamptz NOT NULL,
    requests           integer NOT NULL DEFAULT 1,
    generation         bigint NOT NULL DEFAULT 1,
    claimed_generation bigint,
    claimed_by         text,
    lease_until        timestamptz,
    attempts           integer NOT NULL DEFAULT 0,
    last_error         text,
    PRIMARY KEY (chat_service_sid, user_ref)
);
CREATE INDEX relist_targets_due ON relist_targets (due_at);
CREATE INDEX relist_targets_claimed ON relist_targets (claimed_by) WHERE claimed_by IS NOT NULL;
