-- Stores an event for run ($1, $2): name $3, payload $4, optional event key $5. Answers its seq,
-- or nothing when the run already has an event with that key.
INSERT INTO run_inbox (namespace, run_id, name, payload, event_key)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT DO NOTHING
RETURNING seq
