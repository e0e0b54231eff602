-- Locks a run only if ($3) is its current lease: a stale report never holds the row of a run
-- that has been queued again (claims skip locked rows).
SELECT * FROM runs
WHERE namespace = $1 AND id = $2 AND status = 'running' AND lease_token = $3
FOR UPDATE
