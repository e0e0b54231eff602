-- Ends run ($1, $2) `failed` with error $3 because a timeout of the whole run passed, whatever
-- its state; an open lease ends with it (clearing `leased_seq` has its `run_leased` event
-- written out: the trigger of the migration `transitions`). The caller holds the row lock.
UPDATE runs
SET status = 'failed', error = $3, finished_at = now(), updated_at = now(),
    lease_end = CASE WHEN status = 'running' THEN 'timeout' ELSE lease_end END,
    lease_expires_at = NULL, wake_at = NULL, pause_requested = false,
    leased_seq = NULL, leased_at = NULL
WHERE namespace = $1 AND id = $2 AND status IN ('queued', 'running', 'suspended', 'paused')
RETURNING *
