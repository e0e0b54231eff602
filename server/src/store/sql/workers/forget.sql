-- Forgets up to $2 workers not heard from for $1 ms that hold no lease: `ListWorkers` stops
-- listing them. One that comes back is told it is unknown and registers again. Answers how
-- many were forgotten.
WITH gone AS (
    SELECT w.namespace, w.id FROM workers w
    WHERE w.last_heartbeat_at < now() - $1::bigint * interval '1 millisecond'
      AND NOT EXISTS (
          SELECT 1 FROM runs r
          WHERE r.namespace = w.namespace AND r.lease_owner = w.id AND r.lease_end IS NULL
            AND r.lease_token IS NOT NULL
      )
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM workers w USING gone
WHERE w.namespace = gone.namespace AND w.id = gone.id
