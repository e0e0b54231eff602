-- Hands the oldest pending event named $3 of run ($1, $2) to the wait step $4: answers its
-- seq and payload, or nothing if none is pending. The caller holds the run's row lock, so two
-- waits of one run never take the same event.
UPDATE run_inbox
SET consumed_by = $4, consumed_at = now()
WHERE (namespace, run_id, seq) = (
    SELECT namespace, run_id, seq FROM run_inbox
    WHERE namespace = $1 AND run_id = $2 AND name = $3 AND consumed_by IS NULL
    ORDER BY seq
    LIMIT 1
)
RETURNING seq, payload
