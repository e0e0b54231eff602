-- A history event: ($1 namespace, $2 run, $3 type, $4 attempt, $5 worker, $6 details, $7 the
-- API key that did it; NULL: the transaction's `aiki.actor`, if any, see `session/set_actor`).
INSERT INTO run_events (namespace, run_id, type, attempt, worker_id, details, actor)
VALUES ($1, $2, $3, $4, $5, $6, coalesce($7::uuid, nullif(current_setting('aiki.actor', true), '')::uuid))
