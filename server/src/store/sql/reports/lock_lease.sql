-- Locks a run only if ($3) is its current lease, held by a worker of API key $4 (NULL: any; a
-- call without authentication, or the server itself): a stale report never holds the row of a
-- run that has been queued again (claims skip locked rows).
SELECT * FROM runs
WHERE namespace = $1 AND id = $2 AND status = 'running' AND lease_token = $3
  AND ($4::uuid IS NULL OR lease_key = $4::uuid)
FOR UPDATE
