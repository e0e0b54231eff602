-- Milliseconds until the earliest wake time of a suspended run (negative: overdue), if any.
SELECT ceil(extract(epoch FROM min(wake_at) - now()) * 1000)::bigint
FROM runs WHERE status = 'suspended'
