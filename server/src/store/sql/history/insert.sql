INSERT INTO run_events (namespace, run_id, type, attempt, worker_id, details)
VALUES ($1, $2, $3, $4, $5, $6)
