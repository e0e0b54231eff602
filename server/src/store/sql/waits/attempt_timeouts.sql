-- Up to $1 running runs whose attempt deadline has passed, with their lease token.
SELECT namespace, id, lease_token FROM runs
WHERE attempt_deadline <= now() AND attempt_deadline IS NOT NULL AND status = 'running'
ORDER BY attempt_deadline
LIMIT $1
FOR UPDATE SKIP LOCKED
