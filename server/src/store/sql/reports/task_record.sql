-- Records a task result if ($3) is the run's current lease (and $9, the reporting API key, if
-- any, is the one its worker holds); locks the run row so that the lease
-- cannot end between the check and the insert, and so that the reports of one run (and their
-- history events) are written one after another, in `seq` order. A task already recorded is
-- kept. The row is its own `task_recorded` event (`event_seq`, see the migrations).
WITH run AS (
    SELECT namespace, id, attempt, lease_owner, lease_key FROM runs
    WHERE namespace = $1 AND id = $2 AND lease_token = $3 AND status = 'running'
      AND ($9::uuid IS NULL OR lease_key = $9::uuid)
    FOR NO KEY UPDATE
), inserted AS (
    INSERT INTO run_tasks (namespace, run_id, task_key, name, seq, output, error, attempt, worker_id,
                           key_id)
    SELECT namespace, id, $4, $5, $6, $7, $8, attempt, lease_owner, lease_key FROM run
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM run) AS lease_ok, EXISTS (SELECT 1 FROM inserted) AS recorded
