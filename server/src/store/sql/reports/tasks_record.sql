-- Records many task results at once, under leases the caller has checked and holds locked
-- (`reports/lock_runs.sql`). Input rows are ($1 namespace, $2 run id, $3 key, $4 name, $5 seq,
-- $6 output, $7 error, $8 attempt, $9 worker, $10 the lease's API key). A task already recorded is kept. Each row is its
-- own `task_recorded` event (`event_seq`, drawn by its default; see the migrations). Answers
-- the (namespace, run, key) of each row recorded.
INSERT INTO run_tasks (namespace, run_id, task_key, name, seq, output, error, attempt, worker_id,
                       key_id)
SELECT namespace, run_id, task_key, name, seq, output, error, attempt, worker_id, key_id
FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::int[], $6::jsonb[],
            $7::jsonb[], $8::int[], $9::uuid[], $10::uuid[])
    AS i (namespace, run_id, task_key, name, seq, output, error, attempt, worker_id, key_id)
ON CONFLICT DO NOTHING
RETURNING namespace, run_id, task_key
