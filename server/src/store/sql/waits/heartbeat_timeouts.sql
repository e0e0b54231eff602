-- Up to $1 running runs with a heartbeat timeout whose lease expired (no heartbeat in time),
-- with their lease token.
SELECT namespace, id, lease_token FROM runs
WHERE status = 'running' AND lease_expires_at < now() AND heartbeat_timeout_ms IS NOT NULL
ORDER BY lease_expires_at
LIMIT $1
FOR UPDATE SKIP LOCKED
