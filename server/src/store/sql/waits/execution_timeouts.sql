-- Up to $1 runs that have not ended and whose execution deadline has passed.
SELECT namespace, id FROM runs
WHERE execution_deadline <= now() AND execution_deadline IS NOT NULL
  AND status IN ('queued', 'running', 'suspended', 'paused')
ORDER BY execution_deadline
LIMIT $1
FOR UPDATE SKIP LOCKED
