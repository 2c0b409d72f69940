-- A worker starting a pass (listing its services, then opening its users listings) held no
-- claim yet: a pass of another scope found none live and superseded it (marked it failed) under
-- the worker's feet, and a replica stopping meanwhile recorded it interrupted. Each worker now
-- leases its start here, as it leases a users listing or a user: taken with the pass (begun or
-- resumed), renewed with its claims, deleted once it holds a claim (or leaves the pass), given
-- back (claimed_by null) with its claims at shutdown or when found dead.
CREATE TABLE sync_pass_starts (
    run_id      bigint NOT NULL REFERENCES sync_runs,
    claimed_by  text,
    lease_until timestamptz
);
-- (A begin retried after a lost reply finds its row: one row per token.)
CREATE UNIQUE INDEX sync_pass_starts_token ON sync_pass_starts (run_id, claimed_by);

COMMENT ON TABLE sync_pass_starts IS 'Workers starting a pass (listing its services): a live lease here makes the pass busy, as a live claim does; deleted once the worker holds a claim.';
COMMENT ON COLUMN sync_pass_starts.run_id IS 'The pass being started (sync_runs).';
COMMENT ON COLUMN sync_pass_starts.claimed_by IS 'The starting worker''s claim token (worker id/nonce); null once given back (shutdown, or the worker found dead).';
COMMENT ON COLUMN sync_pass_starts.lease_until IS 'Until when the start holds (renewed while the worker lives).';

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'convsync_reader') THEN
        GRANT SELECT ON sync_pass_starts TO convsync_reader;
    END IF;
END
$$;
