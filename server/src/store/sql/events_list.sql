SELECT * FROM run_events WHERE namespace = $1 AND run_id = $2 AND seq > $3 ORDER BY seq LIMIT $4
