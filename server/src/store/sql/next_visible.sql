-- The earliest future visibility per queue, to arm wake-up timers at start.
SELECT namespace, queue, min(visible_at) AS due
FROM runs WHERE status = 'queued' AND visible_at > now()
GROUP BY namespace, queue
