-- Why the cancellation of run ($1, $2) was asked: the reason of its last `cancel_requested`.
SELECT details->>'reason' FROM run_events
WHERE namespace = $1 AND run_id = $2 AND type = 'cancel_requested'
ORDER BY seq DESC
LIMIT 1
