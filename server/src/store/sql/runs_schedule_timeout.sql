-- Up to $1 queued runs that have been ready longer than their schedule-to-start timeout.
SELECT namespace, id FROM runs
WHERE schedule_timeout_ms IS NOT NULL AND status = 'queued'
  AND visible_at + schedule_timeout_ms * interval '1 millisecond' <= now()
ORDER BY visible_at
LIMIT $1
FOR UPDATE SKIP LOCKED
