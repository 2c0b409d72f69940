-- Membership writes without per-row foreign-key checks.
--
-- A membership row is written only by the page statement (worker/store.py, _PAGES_SQL), which
-- upserts the page's conversations in the same statement and runs only for a user whose
-- sync_cursors row exists (and sync_cursors keeps its foreign key to users). The two foreign
-- keys below were therefore true by construction, and their triggers (two lookups and two row
-- locks on shared conversation and user rows per membership written) were about a third of the
-- page statement's time. Memberships are never deleted, nor are users or conversations.
ALTER TABLE memberships
    DROP CONSTRAINT memberships_chat_service_sid_user_sid_fkey,
    DROP CONSTRAINT memberships_chat_service_sid_conversation_sid_fkey;

COMMENT ON TABLE memberships IS 'User-level fields of a user''s conversation. Never deleted: removed_at marks memberships missing from a complete listing. Its users and conversations rows always exist: the page statement writes them first (no foreign keys since migration 004).';
