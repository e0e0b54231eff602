-- Up to $4 events of run ($1, $2) with a seq above $3, in order. Two kinds of event are their
-- own rows rather than rows of `run_events` (see `created_seq` and `event_seq` in the
-- migrations): the creation, read from the run, and each checkpointed task.
SELECT * FROM (
    SELECT namespace, id AS run_id, created_seq AS seq, 'run_created' AS type, created_at AS at,
           1 AS attempt, NULL::uuid AS worker_id, NULL::jsonb AS details
    FROM runs
    WHERE namespace = $1 AND id = $2 AND created_seq > $3
    UNION ALL
    SELECT namespace, run_id, event_seq, 'task_recorded', recorded_at, attempt, worker_id,
           jsonb_build_object('task', name, 'key', task_key, 'seq', seq, 'failed', error IS NOT NULL)
    FROM run_tasks
    WHERE namespace = $1 AND run_id = $2 AND event_seq > $3
    UNION ALL
    SELECT namespace, run_id, seq, type, at, attempt, worker_id, details
    FROM run_events
    WHERE namespace = $1 AND run_id = $2 AND seq > $3
) e
ORDER BY seq
LIMIT $4
