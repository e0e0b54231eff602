SELECT * FROM run_tasks WHERE namespace = $1 AND run_id = ANY($2) ORDER BY run_id, seq
