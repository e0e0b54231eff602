-- What a worker registered (its queues, its [{name, version}] workflows and the API key it
-- registered with), or nothing if it
-- is unknown. A read: polls are frequent, and the worker's row is written by its heartbeats
-- only.
SELECT queues, workflows, key_id FROM workers WHERE namespace = $1 AND id = $2
