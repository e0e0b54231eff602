SELECT w.*, coalesce(l.held, 0) AS leases_held
FROM workers w
LEFT JOIN (
    SELECT lease_owner, count(*) AS held FROM runs
    WHERE namespace = $1 AND status = 'running' GROUP BY lease_owner
) l ON l.lease_owner = w.id
WHERE w.namespace = $1
ORDER BY w.last_heartbeat_at DESC
LIMIT 1000
