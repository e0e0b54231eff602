-- Completes a run if ($3) is its current lease.
WITH done AS (
    UPDATE runs
    SET status = 'completed', output = $4, error = NULL, lease_end = 'complete',
        lease_expires_at = NULL, finished_at = now(), updated_at = now()
    WHERE namespace = $1 AND id = $2 AND lease_token = $3 AND status = 'running'
    RETURNING *
), events AS (
    INSERT INTO run_events (namespace, run_id, type, attempt, worker_id, details)
    SELECT namespace, id, 'run_completed', attempt, lease_owner, NULL FROM done
)
SELECT * FROM done
