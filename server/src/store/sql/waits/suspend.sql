-- Records what a run that has just been suspended waits for: the step ($4 key, $5 name,
-- $6 seq), and when it wakes ($3 ms from now; NULL: only by what it waits for), an event
-- ($7) or a child run ($8). The caller holds the row lock.
UPDATE runs
SET wake_at = now() + $3::bigint * interval '1 millisecond',
    visible_at = now() + coalesce($3::bigint, 0) * interval '1 millisecond',
    wait_key = $4, wait_name = $5, wait_seq = $6, wait_event = $7, wait_child = $8
WHERE namespace = $1 AND id = $2
RETURNING *
