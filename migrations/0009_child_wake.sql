-- The end of a child locks its parent's row (to write the parent's history in order). A claim
-- that runs meanwhile skips the locked parent (`SKIP LOCKED`): if the parent was queued, its
-- pollers would wait for a wake-up that never comes. So the trigger now also wakes the
-- pollers of a queued parent's queue when its transaction commits. Otherwise as in 0005.
CREATE OR REPLACE FUNCTION aiki_child_ended() RETURNS trigger LANGUAGE plpgsql AS $$
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
    IF p.status = 'queued' THEN
        -- The payload of `wake::ready_payload`: namespace, queue, delay in ms.
        PERFORM pg_notify('aiki_ready', p.namespace || E'\n' || p.queue || E'\n' ||
            greatest(ceil(extract(epoch FROM p.visible_at - now()) * 1000), 0)::bigint);
    END IF;
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
        PERFORM pg_notify('aiki_ready', p.namespace || E'\n' || p.queue || E'\n0');
    END IF;
    RETURN NULL;
END
$$;
