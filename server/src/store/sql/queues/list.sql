SELECT queue,
       count(*) FILTER (WHERE status = 'queued' AND visible_at <= now()) AS ready,
       count(*) FILTER (WHERE status = 'queued' AND visible_at > now()) AS delayed,
       count(*) FILTER (WHERE status = 'running') AS running,
       count(*) FILTER (WHERE status = 'suspended') AS suspended,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE status = 'paused') AS paused,
       extract(epoch FROM now() - min(visible_at) FILTER (WHERE status = 'queued' AND visible_at <= now()))::float8 AS oldest_ready_secs
FROM runs
WHERE namespace = $1
GROUP BY queue
ORDER BY queue
