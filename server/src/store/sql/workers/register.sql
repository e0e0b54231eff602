INSERT INTO workers (namespace, id, identity, host, workflows, queues, slots, key_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
