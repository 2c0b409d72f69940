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

COMMENT ON TABLE webhook_events IS 'Twilio webhooks recorded (convsync run, CONVSYNC_WEBHOOKS), one row per idempotency key, kept a day: a retried or replayed webhook adds nothing.';
COMMENT ON COLUMN webhook_events.idempotency_key IS 'I-Twilio-Idempotency-Token, else sha256: and a digest of the body.';
COMMENT ON COLUMN webhook_events.event_type IS 'The EventType (onParticipantAdded, onMessageAdded, ...), or ignored for an event that changes nothing mirrored.';
COMMENT ON COLUMN webhook_events.received_at IS 'When the webhook was recorded (and then answered 200).';
COMMENT ON TABLE relist_targets IS 'Users a webhook changed, waiting to be re-listed from page one between passes; a row goes once a re-list served every request it holds.';
COMMENT ON COLUMN relist_targets.chat_service_sid IS 'The service (IS...) of the user.';
COMMENT ON COLUMN relist_targets.user_ref IS 'The user SID (US...), or an identity the mirror did not know yet (resolved through Twilio when re-listed).';
COMMENT ON COLUMN relist_targets.requested_at IS 'The oldest request not yet served (the re-list delay is measured from it).';
COMMENT ON COLUMN relist_targets.rerequested_at IS 'The first request that came while the target was being re-listed (it then needs one more re-list).';
COMMENT ON COLUMN relist_targets.due_at IS 'When it may be re-listed: its first request plus CONVSYNC_WEBHOOK_COALESCE_SECONDS (later requests coalesce into it).';
COMMENT ON COLUMN relist_targets.requests IS 'Webhooks coalesced into this target.';
COMMENT ON COLUMN relist_targets.generation IS 'Bumped by each request; a re-list serves the generation it claimed.';
COMMENT ON COLUMN relist_targets.claimed_generation IS 'The generation the running re-list serves.';
COMMENT ON COLUMN relist_targets.claimed_by IS 'The claim token of the worker re-listing it (NULL: waiting).';
COMMENT ON COLUMN relist_targets.lease_until IS 'Until when the claim holds unrenewed (a dead worker''s expires).';
COMMENT ON COLUMN relist_targets.attempts IS 'Times it was claimed.';
COMMENT ON COLUMN relist_targets.last_error IS 'Why the last attempt could not list the user (redacted), if it could not.';

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'convsync_reader') THEN
        GRANT SELECT ON webhook_events, relist_targets TO convsync_reader;
    END IF;
END
$$;
