-- Up to $4 events of run ($1, $2) with a seq above $3, in order, from the view that puts the
-- history's sources together (see `run_history` in the migrations).
SELECT * FROM run_history
WHERE namespace = $1 AND run_id = $2 AND seq > $3
ORDER BY seq
LIMIT $4
