-- Whether run ($1, $2) has received an event with key $3.
SELECT EXISTS (SELECT 1 FROM run_inbox WHERE namespace = $1 AND run_id = $2 AND event_key = $3)
