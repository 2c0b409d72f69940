-- relist_targets.attempts counts a target's failed re-lists, no longer its claims.
--
-- A target waiting behind another walker (a pass holding its user) is claimed and given back
-- every second; counted as attempts, those claims used up its retries, and a target that had
-- waited a few seconds was dropped at its first failure (worker/targets.py, worker/relist.py).
-- Rows already counted keep their count: a target is deleted once served, so few are left.
COMMENT ON COLUMN relist_targets.attempts IS 'Its re-lists that failed so far (waiting behind another walker is not one); after 5 it is left to the next pass.';
