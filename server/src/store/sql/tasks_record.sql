-- Records many task results at once, under leases the caller has checked and locked
-- (`runs_lock.sql`). Input rows are ($1 namespace, $2 run id, $3 key, $4 name, $5 seq,
-- $6 output, $7 error, $8 attempt, $9 worker). A task already recorded is kept. Answers the
-- (namespace, run, key) of each row recorded, with its `task_recorded` event written from the
-- inserted row alone (no join: the planner cannot misjudge one).
WITH inserted AS (
    INSERT INTO run_tasks (namespace, run_id, task_key, name, seq, output, error, attempt, worker_id)
    SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::int[], $6::jsonb[],
                         $7::jsonb[], $8::int[], $9::uuid[])
    ON CONFLICT DO NOTHING
    RETURNING namespace, run_id, task_key, name, seq, error IS NOT NULL AS failed, attempt, worker_id
), events AS (
    INSERT INTO run_events (namespace, run_id, type, attempt, worker_id, details)
    SELECT namespace, run_id, 'task_recorded', attempt, worker_id,
           jsonb_build_object('task', name, 'key', task_key, 'seq', seq, 'failed', failed)
    FROM inserted
)
SELECT namespace, run_id, task_key FROM inserted
