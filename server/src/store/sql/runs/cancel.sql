-- Cancels a queued or suspended run at once ($3 = true) or flags a running one ($3 = false).
UPDATE runs
SET status = CASE WHEN $3 THEN 'cancelled' ELSE status END,
    cancel_requested = true,
    error = CASE WHEN $3 THEN $4 ELSE error END,
    finished_at = CASE WHEN $3 THEN now() ELSE finished_at END,
    updated_at = now()
WHERE namespace = $1 AND id = $2
RETURNING *
