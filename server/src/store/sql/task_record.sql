-- Records a task result if ($3) is the run's current lease; locks the run row so that the lease
-- cannot end between the check and the insert, and so that the reports of one run (and their
-- history events) are written one after another, in `seq` order. A task already recorded is
-- kept.
WITH run AS (
    SELECT namespace, id, attempt, lease_owner FROM runs
    WHERE namespace = $1 AND id = $2 AND lease_token = $3 AND status = 'running'
    FOR NO KEY UPDATE
), inserted AS (
    INSERT INTO run_tasks (namespace, run_id, task_key, name, seq, output, error, attempt, worker_id)
    SELECT namespace, id, $4, $5, $6, $7, $8, attempt, lease_owner FROM run
    ON CONFLICT DO NOTHING
    RETURNING *
), events AS (
    INSERT INTO run_events (namespace, run_id, type, attempt, worker_id, details)
    SELECT i.namespace, i.run_id, 'task_recorded', i.attempt, run.lease_owner,
           jsonb_build_object('task', i.name, 'key', i.task_key, 'seq', i.seq,
                              'failed', i.error IS NOT NULL)
    FROM inserted i, run
)
SELECT EXISTS (SELECT 1 FROM run) AS lease_ok, EXISTS (SELECT 1 FROM inserted) AS recorded
