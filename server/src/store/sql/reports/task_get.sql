SELECT * FROM run_tasks WHERE namespace = $1 AND run_id = $2 AND task_key = $3
