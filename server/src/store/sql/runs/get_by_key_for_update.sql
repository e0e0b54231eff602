SELECT * FROM runs WHERE namespace = $1 AND idempotency_key = $2 FOR UPDATE
