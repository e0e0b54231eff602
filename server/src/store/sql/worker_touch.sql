UPDATE workers SET last_heartbeat_at = now() WHERE namespace = $1 AND id = $2 RETURNING queues
