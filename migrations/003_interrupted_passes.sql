-- A pass stopped by SIGTERM/SIGINT that no other replica was still working is recorded as
-- 'interrupted' rather than left looking live ('running'); the next `convsync sync` or tick of
-- `convsync run` continues it. It is still unfinished: at most one pass is running or
-- interrupted at a time.
ALTER TABLE sync_runs DROP CONSTRAINT sync_runs_status_check;
ALTER TABLE sync_runs ADD CONSTRAINT sync_runs_status_check
    CHECK (status IN ('running', 'interrupted', 'succeeded', 'partial', 'failed'));

DROP INDEX sync_runs_one_running;
CREATE UNIQUE INDEX sync_runs_one_unfinished ON sync_runs ((true))
    WHERE status IN ('running', 'interrupted');

COMMENT ON TABLE sync_runs IS 'One row per pass: when, status (running, interrupted, succeeded, partial, failed) and counts.';
COMMENT ON COLUMN sync_runs.finished_at IS 'When the pass ended; null while running or interrupted (an unfinished pass is continued by the next sync or tick).';
COMMENT ON COLUMN sync_runs.status IS 'running, interrupted (stopped by a signal with no replica left on it; the next sync or tick continues it), succeeded (every user synced), partial (some failed) or failed.';
