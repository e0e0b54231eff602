-- The recorded tasks of runs ($2) of namespace $1, in run then execution order. One index
-- lookup per run, whatever the table's statistics say.
SELECT t.*
FROM unnest($2::uuid[]) AS i (run_id)
CROSS JOIN LATERAL (
    SELECT * FROM run_tasks WHERE namespace = $1 AND run_id = i.run_id
) t
ORDER BY t.run_id, t.seq
