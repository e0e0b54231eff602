-- What a worker registered (its queues and its [{name, version}] workflows), or nothing if it
-- is unknown. A read: polls are frequent, and the worker's row is written by its heartbeats
-- only.
SELECT queues, workflows FROM workers WHERE namespace = $1 AND id = $2
