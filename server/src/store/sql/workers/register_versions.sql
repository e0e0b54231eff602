-- Records the (workflow $2, version $3) pairs a worker of namespace $1 registers.
INSERT INTO workflow_versions (namespace, workflow, version)
SELECT $1, w, v FROM unnest($2::text[], $3::text[]) AS s (w, v)
ON CONFLICT (namespace, workflow, version) DO UPDATE SET last_seen_at = now()
