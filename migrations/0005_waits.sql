-- Waiting for an event or for a child run, as a suspended run that holds no worker.

-- What a suspended run waits for besides its wake time: an event of this name, or the end of
-- this child run. A wait for an event may also have a wake time: its timeout.
ALTER TABLE runs ADD COLUMN wait_event text;
ALTER TABLE runs ADD COLUMN wait_child uuid;

-- The run that started this one (`ctx.start_child`): cancelling it cancels this run too, and
-- this run's end wakes it if it waits for it.
ALTER TABLE runs ADD COLUMN parent_id uuid;
CREATE INDEX runs_children ON runs (namespace, parent_id) WHERE parent_id IS NOT NULL;

-- Events sent to runs (SendEvent). A run consumes the events of one name in the order they
-- arrived, one per wait; an event that arrives before the run waits stays here until it does.
-- An event key makes a resend of the same event a no-op.
CREATE TABLE run_inbox (
    namespace   text        NOT NULL,
    run_id      uuid        NOT NULL,
    seq         bigint      GENERATED ALWAYS AS IDENTITY,
    name        text        NOT NULL,
    payload     jsonb       NOT NULL,
    event_key   text,
    sent_at     timestamptz NOT NULL DEFAULT now(),
    -- The wait step (its task key) that received the event.
    consumed_by text,
    consumed_at timestamptz,
    PRIMARY KEY (namespace, run_id, seq)
);
CREATE UNIQUE INDEX run_inbox_event_key ON run_inbox (namespace, run_id, event_key)
    WHERE event_key IS NOT NULL;
CREATE INDEX run_inbox_pending ON run_inbox (namespace, run_id, name, seq)
    WHERE consumed_by IS NULL;

-- The end of a child run, whichever statement ends it (a report, the reaper, a cancellation,
-- a timeout): a `child_ended` event in the parent's history, and, if the parent is suspended
-- waiting for this child, the parent's wait step recorded with the child's outcome and the
-- parent queued again, in the same transaction. A trigger rather than code in each of those
-- statements, so that no way of ending a run can forget its parent. Its WHEN clause keeps
-- runs without a parent from calling the function at all.
CREATE FUNCTION aiki_child_ended() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    p runs%ROWTYPE;
    outcome jsonb := jsonb_build_object('child', NEW.id, 'status', NEW.status,
                                        'output', NEW.output, 'error', NEW.error);
BEGIN
    SELECT * INTO p FROM runs WHERE namespace = NEW.namespace AND id = NEW.parent_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO run_events (namespace, run_id, type, attempt, details)
    VALUES (p.namespace, p.id, 'child_ended', p.attempt,
            jsonb_build_object('child', NEW.id, 'workflow', NEW.workflow, 'status', NEW.status));
    IF p.status <> 'suspended' OR p.wait_child IS DISTINCT FROM NEW.id THEN
        RETURN NULL;
    END IF;
    INSERT INTO run_tasks (namespace, run_id, task_key, name, seq, output, attempt)
    VALUES (p.namespace, p.id, p.wait_key, p.wait_name, p.wait_seq, outcome, p.attempt)
    ON CONFLICT DO NOTHING;
    UPDATE runs
    SET status = CASE WHEN pause_requested THEN 'paused' ELSE 'queued' END,
        pause_requested = false, visible_at = now(), wake_at = NULL, wait_key = NULL,
        wait_name = NULL, wait_seq = NULL, wait_event = NULL, wait_child = NULL,
        updated_at = now()
    WHERE namespace = p.namespace AND id = p.id;
    INSERT INTO run_events (namespace, run_id, type, attempt, details)
    VALUES (p.namespace, p.id, 'run_woken', p.attempt,
            jsonb_build_object('child', NEW.id, 'status', NEW.status));
    IF NOT p.pause_requested THEN
        -- The payload of `wake::ready_payload`: namespace, queue, delay in ms.
        PERFORM pg_notify('aiki_ready', p.namespace || E'\n' || p.queue || E'\n0');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER runs_child_ended AFTER UPDATE OF status ON runs
    FOR EACH ROW
    WHEN (NEW.parent_id IS NOT NULL
          AND NEW.status IN ('completed', 'failed', 'cancelled')
          AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION aiki_child_ended();
