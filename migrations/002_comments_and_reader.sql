-- Self-describing schema (\d+ explains every column) and a read-only role for downstream readers.

COMMENT ON TABLE services IS 'Conversation Services (IS...) of the account, as listed by GET /v1/Services.';
COMMENT ON COLUMN services.chat_service_sid IS 'The service SID (IS + 32 hex).';
COMMENT ON COLUMN services.account_sid IS 'The account (AC...) owning the service.';
COMMENT ON COLUMN services.friendly_name IS 'The service''s display name.';
COMMENT ON COLUMN services.date_created IS 'When Twilio created the service.';
COMMENT ON COLUMN services.date_updated IS 'When Twilio last updated the service.';
COMMENT ON COLUMN services.url IS 'The API URL of the service.';
COMMENT ON COLUMN services.links IS 'The API links of the service (jsonb).';
COMMENT ON COLUMN services.first_seen_at IS 'When convsync first stored the service.';
COMMENT ON COLUMN services.last_seen_at IS 'When convsync last stored a change to the service.';

COMMENT ON TABLE users IS 'Users of each service (GET /v1/Services/{IS}/Users). Never deleted: removed_at marks users gone upstream.';
COMMENT ON COLUMN users.chat_service_sid IS 'The service the user belongs to.';
COMMENT ON COLUMN users.user_sid IS 'The user SID (US + 32 hex).';
COMMENT ON COLUMN users.account_sid IS 'The account (AC...).';
COMMENT ON COLUMN users.role_sid IS 'The user''s role (RL...).';
COMMENT ON COLUMN users.identity IS 'The application''s identity string for the user.';
COMMENT ON COLUMN users.friendly_name IS 'The user''s display name.';
COMMENT ON COLUMN users.attributes IS 'The user''s attributes: Twilio''s JSON string, stored as jsonb.';
COMMENT ON COLUMN users.is_online IS 'Whether the user is connected (null when reachability is off).';
COMMENT ON COLUMN users.is_notifiable IS 'Whether the user has a push binding (null when reachability is off).';
COMMENT ON COLUMN users.date_created IS 'When Twilio created the user.';
COMMENT ON COLUMN users.date_updated IS 'When Twilio last updated the user.';
COMMENT ON COLUMN users.url IS 'The API URL of the user.';
COMMENT ON COLUMN users.links IS 'The API links of the user (jsonb).';
COMMENT ON COLUMN users.first_seen_at IS 'When convsync first stored the user.';
COMMENT ON COLUMN users.changed_at IS 'When convsync last stored a change to the user.';
COMMENT ON COLUMN users.removed_at IS 'When a complete users listing (or a 404) showed the user gone; null while present.';

COMMENT ON TABLE conversations IS 'Conversation-level fields, shared by all members; the newest data (by date_updated) is kept.';
COMMENT ON COLUMN conversations.chat_service_sid IS 'The service of the conversation.';
COMMENT ON COLUMN conversations.conversation_sid IS 'The conversation SID (CH + 32 hex).';
COMMENT ON COLUMN conversations.account_sid IS 'The account (AC...).';
COMMENT ON COLUMN conversations.friendly_name IS 'The conversation''s display name.';
COMMENT ON COLUMN conversations.unique_name IS 'The application-defined unique name.';
COMMENT ON COLUMN conversations.attributes IS 'The conversation''s attributes: Twilio''s JSON string, stored as jsonb.';
COMMENT ON COLUMN conversations.conversation_state IS 'inactive, active or closed.';
COMMENT ON COLUMN conversations.created_by IS 'Identity of the creator.';
COMMENT ON COLUMN conversations.date_created IS 'When the conversation was created.';
COMMENT ON COLUMN conversations.date_updated IS 'When the conversation was last updated.';
COMMENT ON COLUMN conversations.date_inactive IS 'timers.date_inactive: when the conversation becomes (became) inactive.';
COMMENT ON COLUMN conversations.date_closed IS 'timers.date_closed: when the conversation closes (closed).';
COMMENT ON COLUMN conversations.first_seen_at IS 'When convsync first stored the conversation.';
COMMENT ON COLUMN conversations.changed_at IS 'When convsync last stored a change to the conversation.';

COMMENT ON TABLE memberships IS 'User-level fields of a user''s conversation. Never deleted: removed_at marks memberships missing from a complete listing.';
COMMENT ON COLUMN memberships.chat_service_sid IS 'The service.';
COMMENT ON COLUMN memberships.user_sid IS 'The user.';
COMMENT ON COLUMN memberships.conversation_sid IS 'The conversation.';
COMMENT ON COLUMN memberships.participant_sid IS 'The user''s participant (MB...) in the conversation.';
COMMENT ON COLUMN memberships.notification_level IS 'default or muted.';
COMMENT ON COLUMN memberships.unread_messages_count IS 'Messages the user has not read.';
COMMENT ON COLUMN memberships.last_read_message_index IS 'Index of the last message the user read.';
COMMENT ON COLUMN memberships.url IS 'The API URL of the user conversation.';
COMMENT ON COLUMN memberships.links IS 'The API links (participant, conversation) as jsonb.';
COMMENT ON COLUMN memberships.first_seen_at IS 'When convsync first saw the user in the conversation (joined, as far as convsync knows).';
COMMENT ON COLUMN memberships.changed_at IS 'When convsync last stored a change to the membership.';
COMMENT ON COLUMN memberships.removed_at IS 'When a complete listing of the user no longer had the conversation (left); null while a member.';

COMMENT ON TABLE sync_runs IS 'One row per pass: when, status (running, succeeded, partial, failed) and counts.';
COMMENT ON COLUMN sync_runs.run_id IS 'The pass number.';
COMMENT ON COLUMN sync_runs.started_at IS 'When the pass started.';
COMMENT ON COLUMN sync_runs.finished_at IS 'When the pass ended; null while running (an interrupted pass is continued by the next sync).';
COMMENT ON COLUMN sync_runs.status IS 'running, succeeded (every user synced), partial (some failed) or failed.';
COMMENT ON COLUMN sync_runs.scope IS 'The services and users the pass covers (null: all).';
COMMENT ON COLUMN sync_runs.tick IS 'The schedule tick a convsync run pass serves (null for convsync sync).';
COMMENT ON COLUMN sync_runs.error IS 'Why the pass failed, if it did.';
COMMENT ON COLUMN sync_runs.users_synced IS 'Users whose listing completed in the pass.';
COMMENT ON COLUMN sync_runs.users_failed IS 'Users that failed in the pass (see sync_cursors.last_error).';
COMMENT ON COLUMN sync_runs.users_gone IS 'Users found gone upstream in the pass.';
COMMENT ON COLUMN sync_runs.pages IS 'Conversation pages written in the pass.';
COMMENT ON COLUMN sync_runs.rows_inserted IS 'Memberships inserted.';
COMMENT ON COLUMN sync_runs.rows_updated IS 'Memberships whose fields changed.';
COMMENT ON COLUMN sync_runs.rows_unchanged IS 'Memberships listed unchanged (not rewritten).';
COMMENT ON COLUMN sync_runs.rows_removed IS 'Memberships marked removed.';
COMMENT ON COLUMN sync_runs.rows_quarantined IS 'Items quarantined (see quarantine).';

COMMENT ON TABLE sync_discovery IS 'The users listing of each service within a pass, resumable by page.';
COMMENT ON COLUMN sync_discovery.run_id IS 'The pass.';
COMMENT ON COLUMN sync_discovery.chat_service_sid IS 'The service whose users are listed.';
COMMENT ON COLUMN sync_discovery.next_page_path IS 'Path and query (with PageToken) of the next users page; null before the first.';
COMMENT ON COLUMN sync_discovery.pages IS 'Users pages written.';
COMMENT ON COLUMN sync_discovery.users_seen IS 'Users listed so far.';
COMMENT ON COLUMN sync_discovery.completed_at IS 'When the listing ended.';
COMMENT ON COLUMN sync_discovery.error IS 'Why the listing ended early (then nobody was marked gone).';
COMMENT ON COLUMN sync_discovery.claimed_by IS 'The worker listing it now.';
COMMENT ON COLUMN sync_discovery.lease_until IS 'When the claim expires unless renewed.';

COMMENT ON TABLE sync_cursors IS 'Per user: its state in the current pass and the cursor of its current listing.';
COMMENT ON COLUMN sync_cursors.chat_service_sid IS 'The service.';
COMMENT ON COLUMN sync_cursors.user_sid IS 'The user.';
COMMENT ON COLUMN sync_cursors.run_id IS 'The last pass that queued the user.';
COMMENT ON COLUMN sync_cursors.state IS 'pending, done, failed or gone, within run_id.';
COMMENT ON COLUMN sync_cursors.next_page_path IS 'Path and query (with PageToken) of the next page to fetch; null: start at the first page.';
COMMENT ON COLUMN sync_cursors.listing_started_at IS 'When the current listing fetched its first page.';
COMMENT ON COLUMN sync_cursors.listing_pages IS 'Pages of the current listing written (0: no listing under way).';
COMMENT ON COLUMN sync_cursors.seen_conversations IS 'Conversation SIDs seen so far in the current listing (removal detection).';
COMMENT ON COLUMN sync_cursors.last_listed_at IS 'When the user''s last complete listing ended.';
COMMENT ON COLUMN sync_cursors.attempts IS 'Claims of the user in this pass.';
COMMENT ON COLUMN sync_cursors.last_error IS 'The last failure (secrets redacted).';
COMMENT ON COLUMN sync_cursors.last_error_at IS 'When it failed.';
COMMENT ON COLUMN sync_cursors.claimed_by IS 'The worker listing the user now.';
COMMENT ON COLUMN sync_cursors.lease_until IS 'When the claim expires unless renewed by a page.';
COMMENT ON COLUMN sync_cursors.run_pages IS 'Pages written for the user in this pass.';
COMMENT ON COLUMN sync_cursors.run_rows_inserted IS 'Memberships inserted in this pass.';
COMMENT ON COLUMN sync_cursors.run_rows_updated IS 'Memberships updated in this pass.';
COMMENT ON COLUMN sync_cursors.run_rows_unchanged IS 'Memberships unchanged in this pass.';
COMMENT ON COLUMN sync_cursors.run_rows_removed IS 'Memberships removed in this pass.';
COMMENT ON COLUMN sync_cursors.run_rows_quarantined IS 'Items quarantined in this pass.';

COMMENT ON TABLE quarantine IS 'Items that could not be stored as typed rows, kept raw with the reason and their origin.';
COMMENT ON COLUMN quarantine.quarantine_id IS 'Row number.';
COMMENT ON COLUMN quarantine.run_id IS 'The pass that met the item.';
COMMENT ON COLUMN quarantine.chat_service_sid IS 'The service listed.';
COMMENT ON COLUMN quarantine.user_sid IS 'The user listed (null for a users page).';
COMMENT ON COLUMN quarantine.source_path IS 'The API path and query of the page.';
COMMENT ON COLUMN quarantine.item IS 'The item as received (JSON text).';
COMMENT ON COLUMN quarantine.reason IS 'Why it was not stored.';
COMMENT ON COLUMN quarantine.quarantined_at IS 'When.';

COMMENT ON VIEW user_conversations_v IS 'The API''s User Conversation resource, one row per current membership; timers flattened to date_inactive and date_closed.';
COMMENT ON COLUMN user_conversations_v.account_sid IS 'The account (AC...).';
COMMENT ON COLUMN user_conversations_v.chat_service_sid IS 'The service (IS...).';
COMMENT ON COLUMN user_conversations_v.conversation_sid IS 'The conversation (CH...).';
COMMENT ON COLUMN user_conversations_v.unread_messages_count IS 'Messages the user has not read.';
COMMENT ON COLUMN user_conversations_v.last_read_message_index IS 'Index of the last message the user read.';
COMMENT ON COLUMN user_conversations_v.participant_sid IS 'The user''s participant (MB...) in the conversation.';
COMMENT ON COLUMN user_conversations_v.user_sid IS 'The user (US...).';
COMMENT ON COLUMN user_conversations_v.friendly_name IS 'The conversation''s display name.';
COMMENT ON COLUMN user_conversations_v.conversation_state IS 'inactive, active or closed.';
COMMENT ON COLUMN user_conversations_v.date_inactive IS 'timers.date_inactive.';
COMMENT ON COLUMN user_conversations_v.date_closed IS 'timers.date_closed.';
COMMENT ON COLUMN user_conversations_v.attributes IS 'The conversation''s attributes (jsonb).';
COMMENT ON COLUMN user_conversations_v.date_created IS 'When the conversation was created.';
COMMENT ON COLUMN user_conversations_v.date_updated IS 'When the conversation was last updated.';
COMMENT ON COLUMN user_conversations_v.created_by IS 'Identity of the creator.';
COMMENT ON COLUMN user_conversations_v.notification_level IS 'default or muted.';
COMMENT ON COLUMN user_conversations_v.unique_name IS 'The application-defined unique name.';
COMMENT ON COLUMN user_conversations_v.url IS 'The API URL of the user conversation.';
COMMENT ON COLUMN user_conversations_v.links IS 'The API links (participant, conversation) as jsonb.';
COMMENT ON COLUMN user_conversations_v.first_seen_at IS 'When convsync first saw the user in the conversation.';
COMMENT ON COLUMN user_conversations_v.last_seen_at IS 'When a listing last confirmed the membership (its last change or the user''s last complete listing).';

-- Read-only role for dashboards and analysts. Roles are cluster-wide: create once; where the
-- migrating role may not create roles (managed Postgres), skip with a notice.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'convsync_reader') THEN
        CREATE ROLE convsync_reader NOLOGIN;
    END IF;
EXCEPTION
    WHEN insufficient_privilege THEN
        RAISE NOTICE 'convsync_reader not created: this role may not create roles';
    WHEN duplicate_object OR unique_violation THEN
        NULL;  -- created meanwhile by a migration of another database of this cluster
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'convsync_reader') THEN
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO convsync_reader', current_database());
        GRANT USAGE ON SCHEMA public TO convsync_reader;
        GRANT SELECT ON services, users, conversations, memberships, sync_runs, sync_cursors,
                        sync_discovery, quarantine, user_conversations_v TO convsync_reader;
    END IF;
END
$$;
