-- title: Recent sync passes
-- answers: When did convsync last sync, how did each pass end, and how much did it do?
--   status: running, succeeded, partial (some users failed) or failed (see error).
-- params: $1 passes = 10
SELECT run_id,
       status,
       started_at,
       finished_at,
       round(extract(epoch FROM coalesce(finished_at, now()) - started_at), 1) AS seconds,
       users_synced,
       users_failed,
       users_gone,
       pages,
       rows_inserted,
       rows_updated,
       rows_removed,
       rows_quarantined,
       error
FROM sync_runs
ORDER BY run_id DESC
LIMIT $1::integer;
