-- Wakes up to $1 suspended runs whose wake time has come: queued again (paused, if that was
-- asked meanwhile), the step they waited at recorded as a task result ({"woke": true} for a
-- sleep, {"timeout": true} for a wait for an event), a `run_woken` event each. Answers the
-- woken runs' namespace, id, queue and status.
WITH due AS (
    SELECT namespace, id, wait_key, wait_name, wait_seq, wait_event FROM runs
    WHERE status = 'suspended' AND wake_at <= now()
    ORDER BY wake_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), woke AS (
    UPDATE runs r
    SET status = CASE WHEN r.pause_requested THEN 'paused' ELSE 'queued' END,
        pause_requested = false, visible_at = now(), wake_at = NULL,
        wait_key = NULL, wait_name = NULL, wait_seq = NULL, wait_event = NULL, wait_child = NULL,
        updated_at = now()
    FROM due
    WHERE r.namespace = due.namespace AND r.id = due.id
    RETURNING r.namespace, r.id, r.queue, r.status, r.attempt, due.wait_key, due.wait_name,
              due.wait_seq, due.wait_event
), events AS (
    INSERT INTO run_events (namespace, run_id, type, attempt, details)
    SELECT namespace, id, 'run_woken', attempt,
           CASE WHEN wait_event IS NULL THEN jsonb_build_object('early', false)
                ELSE jsonb_build_object('event', wait_event, 'timeout', true) END
    FROM woke
), tasks AS (
    INSERT INTO run_tasks (namespace, run_id, task_key, name, seq, output, attempt)
    SELECT namespace, id, wait_key, wait_name, wait_seq,
           CASE WHEN wait_event IS NULL THEN jsonb_build_object('woke', true)
                ELSE jsonb_build_object('timeout', true) END,
           attempt
    FROM woke WHERE wait_key IS NOT NULL
    ON CONFLICT DO NOTHING
)
SELECT namespace, id, queue, status FROM woke
