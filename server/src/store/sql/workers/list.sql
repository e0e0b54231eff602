-- The workers of namespace $1, most recently seen first; `live`: a heartbeat (or the
-- registration) within the last $2 ms, the lease time.
SELECT w.*, coalesce(l.held, 0) AS leases_held,
       w.last_heartbeat_at > now() - $2::bigint * interval '1 millisecond' AS live
FROM workers w
LEFT JOIN (
    SELECT lease_owner, count(*) AS held FROM runs
    WHERE namespace = $1 AND status = 'running' GROUP BY lease_owner
) l ON l.lease_owner = w.id
WHERE w.namespace = $1
ORDER BY w.last_heartbeat_at DESC
LIMIT 1000
