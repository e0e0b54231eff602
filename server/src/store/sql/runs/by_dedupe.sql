-- The run holding an idempotency key ($2) or request id ($3, or $6 for a request id that is
-- the run's id), and whether it was started with the same workflow and input.
SELECT *, (workflow = $4 AND input = $5) AS same_start
FROM runs
WHERE namespace = $1
  AND ((idempotency_key = $2 AND $2 IS NOT NULL) OR (request_id = $3 AND $3 IS NOT NULL)
       OR (id = $6 AND $6 IS NOT NULL))
LIMIT 1
