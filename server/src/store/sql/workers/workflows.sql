-- Every registered (workflow, version) of namespace $1, newest version first, with the live
-- workers (a heartbeat within the last $2 ms) that serve it.
WITH live AS (
    SELECT w.id, w.identity, s.name, s.version
    FROM workers w, jsonb_to_recordset(w.workflows) AS s (name text, version text)
    WHERE w.namespace = $1 AND w.last_heartbeat_at > now() - $2::bigint * interval '1 millisecond'
)
SELECT v.workflow, v.version, v.registered_at, v.last_seen_at,
       coalesce(array_agg(l.id ORDER BY l.id) FILTER (WHERE l.id IS NOT NULL), '{}') AS worker_ids,
       coalesce(array_agg(l.identity ORDER BY l.id) FILTER (WHERE l.id IS NOT NULL), '{}') AS identities
FROM workflow_versions v
LEFT JOIN live l ON l.name = v.workflow AND l.version = v.version
WHERE v.namespace = $1
GROUP BY v.workflow, v.version, v.registered_at, v.last_seen_at
ORDER BY v.workflow, v.registered_at DESC, v.version DESC
