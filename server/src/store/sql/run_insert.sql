-- Inserts a run unless its idempotency key or request id is taken (then returns nothing).
INSERT INTO runs (namespace, id, workflow, version, queue, priority, status, input,
                  idempotency_key, request_id, max_attempts, initial_interval_ms,
                  max_interval_ms, backoff_coefficient, non_retryable_error_types, visible_at)
VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $8, $9, $10, $11, $12, $13, $14,
        now() + $15::bigint * interval '1 millisecond')
ON CONFLICT DO NOTHING
RETURNING *
