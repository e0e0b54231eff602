-- Resumes a paused run (queued again, visible when it would have been) or withdraws a pause
-- request of a running run; the caller holds the row lock and has checked the status. Answers
-- the run and how long until it is visible (ms).
UPDATE runs
SET status = CASE WHEN status = 'paused' THEN 'queued' ELSE status END,
    pause_requested = false,
    updated_at = now()
WHERE namespace = $1 AND id = $2
RETURNING *, greatest(0, ceil(extract(epoch FROM visible_at - now()) * 1000))::bigint AS delay_ms
