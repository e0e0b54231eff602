-- Up to $1 queued runs that have been ready longer than their schedule-to-start timeout, since
-- they became ready or were queued again after a lease (whichever is later).
SELECT namespace, id FROM runs
WHERE schedule_timeout_ms IS NOT NULL AND status = 'queued'
  AND greatest(visible_at, requeued_at) + schedule_timeout_ms * interval '1 millisecond' <= now()
ORDER BY greatest(visible_at, requeued_at)
LIMIT $1
FOR UPDATE SKIP LOCKED
