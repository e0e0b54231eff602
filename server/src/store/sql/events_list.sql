-- Up to $4 events of run ($1, $2) with a seq above $3, in order: the creation event, read from
-- the run row (see `created_seq` in the migrations), then the rows of `run_events`.
SELECT * FROM (
    SELECT namespace, id AS run_id, created_seq AS seq, 'run_created' AS type, created_at AS at,
           1 AS attempt, NULL::uuid AS worker_id, NULL::jsonb AS details
    FROM runs
    WHERE namespace = $1 AND id = $2 AND created_seq > $3
    UNION ALL
    SELECT namespace, run_id, seq, type, at, attempt, worker_id, details
    FROM run_events
    WHERE namespace = $1 AND run_id = $2 AND seq > $3
) e
ORDER BY seq
LIMIT $4
