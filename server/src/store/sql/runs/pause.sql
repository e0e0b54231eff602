-- Pauses a queued run at once ($3 = true) or asks a running one to pause ($3 = false); the
-- caller holds the row lock and has checked the status.
UPDATE runs
SET status = CASE WHEN $3 THEN 'paused' ELSE status END,
    pause_requested = NOT $3,
    updated_at = now()
WHERE namespace = $1 AND id = $2
RETURNING *
