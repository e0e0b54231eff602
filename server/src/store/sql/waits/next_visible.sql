-- How long until the earliest delayed run of each queue becomes visible, in ms (database
-- time), to arm wake-up timers.
SELECT namespace, queue,
       ceil(extract(epoch FROM min(visible_at) - now()) * 1000)::bigint AS delay_ms
FROM runs WHERE status = 'queued' AND visible_at > now()
GROUP BY namespace, queue
