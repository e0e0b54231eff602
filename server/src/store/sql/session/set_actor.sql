-- Makes $1 the API key behind what this transaction writes (`aiki.actor`, read by the defaults
-- of `run_events.actor` and `run_tasks.key_id`), until it ends.
SELECT set_config('aiki.actor', $1, true)
