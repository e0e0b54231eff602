-- Wakes up to $1 suspended runs whose wake time has come (see `aiki_end_wait`, the migration
-- `transitions`): the step they waited at recorded as a task result ({"woke": true} for a
-- sleep, {"timeout": true} for a wait for an event). Answers the woken runs' namespace, id,
-- queue and status.
WITH due AS (
    SELECT namespace, id, wait_event FROM runs
    WHERE status = 'suspended' AND wake_at <= now()
    ORDER BY wake_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
SELECT w.namespace, w.id, w.queue, w.status
FROM due, LATERAL aiki_end_wait(
    due.namespace, due.id,
    CASE WHEN due.wait_event IS NULL THEN jsonb_build_object('woke', true)
         ELSE jsonb_build_object('timeout', true) END,
    CASE WHEN due.wait_event IS NULL THEN jsonb_build_object('early', false)
         ELSE jsonb_build_object('event', due.wait_event, 'timeout', true) END) w
