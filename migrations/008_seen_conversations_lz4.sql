-- A listing's SIDs so far (sync_cursors.seen_conversations) compressed with lz4, not pglz.
--
-- The page statement rewrites the whole array with every page of a user's listing: 35 bytes a
-- conversation, past 2 kB compressed, and read back (decompressed) by the next page's guard, so
-- a listing of n pages compresses its SIDs about n^2 / 2 times. pglz_compress was the largest
-- single function of the cursor's update under perf; replaying a first pass's 889 page batches
-- (4,000 users of the benchmark's simulator), PostgreSQL's CPU a page fell by 1.8% and 4.4%
-- (two replays). Servers built without lz4 keep pglz: nothing else changes.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_settings WHERE name = 'default_toast_compression'
               AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE sync_cursors ALTER COLUMN seen_conversations SET COMPRESSION lz4;
    END IF;
END
$$;
