-- What the page statement costs PostgreSQL beyond its rows (measured with perf on the server's
-- processes during a first pass of 4,000 users of the benchmark's simulator).
--
-- 1. Conversations without a per-row foreign-key check. A conversation row is written only by
--    the page statement (worker/store.py, _PAGES_SQL), for a user whose sync_cursors row exists,
--    and that row's user (foreign key kept) belongs to a service (foreign key kept); services are
--    never deleted. The trigger's lookup and row lock on the shared service row, per
--    conversation written, were about 4% of the server's CPU in a pass.
ALTER TABLE conversations DROP CONSTRAINT conversations_chat_service_sid_fkey;

COMMENT ON TABLE conversations IS 'Conversation-level fields, shared by every member; the newest date_updated wins. Its service always exists: only the page statement writes conversations, for a claimed user of a stored service (no foreign key since migration 006).';

-- 2. No planner statistics for the long JSON and URL columns. ANALYZE sorts every sampled value
--    of each column to build its histogram, and comparing jsonb values is costly: autoanalyze of
--    the growing tables was about a seventh of the server's CPU in a first pass. Nobody filters
--    on these columns as a whole (a query on attributes->>'key' needs an expression index,
--    which has statistics of its own), so the planner loses nothing.
ALTER TABLE conversations ALTER COLUMN attributes SET STATISTICS 0;
ALTER TABLE memberships ALTER COLUMN links SET STATISTICS 0;
ALTER TABLE memberships ALTER COLUMN url SET STATISTICS 0;
ALTER TABLE users ALTER COLUMN attributes SET STATISTICS 0;
ALTER TABLE users ALTER COLUMN url SET STATISTICS 0;
ALTER TABLE users ALTER COLUMN links SET STATISTICS 0;
