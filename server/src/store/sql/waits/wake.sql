-- Ends the wait of suspended run ($1, $2) now, whatever it waits for: queued again (paused,
-- if that was asked meanwhile), the step it waited at recorded with output $3, a `run_woken`
-- event with details $4. Used by WakeRun, by a delivered event and by a wait whose event or
-- child had already come. Answers nothing if the run is not suspended.
WITH due AS (
    SELECT namespace, id, wait_key, wait_name, wait_seq FROM runs
    WHERE namespace = $1 AND id = $2 AND status = 'suspended'
    FOR UPDATE
), woke AS (
    UPDATE runs r
    SET status = CASE WHEN r.pause_requested THEN 'paused' ELSE 'queued' END,
        pause_requested = false, visible_at = now(), wake_at = NULL,
        wait_key = NULL, wait_name = NULL, wait_seq = NULL, wait_event = NULL, wait_child = NULL,
        updated_at = now()
    FROM due
    WHERE r.namespace = due.namespace AND r.id = due.id
    RETURNING r.*, due.wait_key AS waited_key, due.wait_name AS waited_name, due.wait_seq AS waited_seq
), events AS (
    INSERT INTO run_events (namespace, run_id, type, attempt, details)
    SELECT namespace, id, 'run_woken', attempt, $4::jsonb FROM woke
), tasks AS (
    INSERT INTO run_tasks (namespace, run_id, task_key, name, seq, output, attempt)
    SELECT namespace, id, waited_key, waited_name, waited_seq, $3::jsonb, attempt
    FROM woke WHERE waited_key IS NOT NULL
    ON CONFLICT DO NOTHING
)
SELECT * FROM woke
