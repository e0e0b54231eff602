-- The task results a completion carries (a run's last tasks, sent with CompleteRun) are kept
-- on the completed run's row, as a JSON array, rather than as rows of `run_tasks`: a completed
-- run never executes again, so nothing replays them; they are read only as history and by
-- people. That saves a heap row and an index entry per task on the busiest path. Each element
-- is {"key", "name", "seq", "output" or "error", "event_seq"}, its `task_recorded` event seq
-- drawn before the run's `completed_seq`. A key already in `run_tasks` is left out (the first
-- result recorded is the one that counts).
ALTER TABLE runs ADD COLUMN final_tasks jsonb;

-- Every checkpointed task result, wherever it is kept.
CREATE VIEW task_results AS
    SELECT namespace, run_id, task_key, name, seq, output, error, attempt, worker_id,
           recorded_at, event_seq
    FROM run_tasks
    UNION ALL
    SELECT r.namespace, r.id, t->>'key', t->>'name', (t->>'seq')::int, t->'output', t->'error',
           r.attempt, r.lease_owner, r.finished_at, (t->>'event_seq')::bigint
    FROM runs r CROSS JOIN LATERAL jsonb_array_elements(r.final_tasks) AS t
    WHERE r.final_tasks IS NOT NULL;

CREATE OR REPLACE VIEW run_history AS
    SELECT namespace, id AS run_id, created_seq AS seq, 'run_created'::text AS type,
           created_at AS at, 1 AS attempt, NULL::uuid AS worker_id, NULL::jsonb AS details
    FROM runs WHERE created_seq IS NOT NULL
    UNION ALL
    SELECT namespace, id, leased_seq, 'run_leased', leased_at, attempt, lease_owner, NULL
    FROM runs WHERE leased_seq IS NOT NULL
    UNION ALL
    SELECT namespace, id, completed_seq, 'run_completed', finished_at, attempt, lease_owner, NULL
    FROM runs WHERE completed_seq IS NOT NULL
    UNION ALL
    SELECT namespace, run_id, event_seq, 'task_recorded', recorded_at, attempt, worker_id,
           jsonb_build_object('task', name, 'key', task_key, 'seq', seq, 'failed', error IS NOT NULL)
    FROM task_results WHERE event_seq IS NOT NULL
    UNION ALL
    SELECT namespace, run_id, seq, type, at, attempt, worker_id, details FROM run_events;
