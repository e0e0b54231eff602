-- Each transition once. Ending a wait (a sleep or an event's timeout by the timers, `WakeRun`,
-- a delivered event, a child's end) and writing out an ended lease's `run_leased` event were
-- written out in several statements each; a new kind of wait or lease end had to edit them all.

-- Every ready notification's payload: namespace, queue and the delay in ms until the run is
-- visible. The store's statements and the child-end trigger alike build it here; the server's
-- listener (`wake::parse_ready`) reads it.
CREATE FUNCTION aiki_ready_payload(ns text, queue text, delay_ms bigint) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT ns || E'\n' || queue || E'\n' || greatest(delay_ms, 0)::text
$$;

-- Ends the wait of suspended run (ns, run) now, whatever it waits for: the step it waited at is
-- recorded with `output` (as a task result; the first result of a step counts), the run is
-- queued again (paused, if that was asked meanwhile), and `run_woken` is written with
-- `details`. Locks the run. Answers the run as it is now, or nothing if it was not suspended.
CREATE FUNCTION aiki_end_wait(ns text, run uuid, output jsonb, details jsonb) RETURNS SETOF runs
LANGUAGE plpgsql AS $$
DECLARE
    w runs%ROWTYPE;
    r runs%ROWTYPE;
BEGIN
    SELECT * INTO w FROM runs WHERE namespace = ns AND id = run AND status = 'suspended' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF w.wait_key IS NOT NULL THEN
        INSERT INTO run_tasks (namespace, run_id, task_key, name, seq, output, attempt)
        VALUES (w.namespace, w.id, w.wait_key, w.wait_name, w.wait_seq, output, w.attempt)
        ON CONFLICT DO NOTHING;
    END IF;
    UPDATE runs
    SET status = CASE WHEN pause_requested THEN 'paused' ELSE 'queued' END,
        pause_requested = false, visible_at = now(), wake_at = NULL, wait_key = NULL,
        wait_name = NULL, wait_seq = NULL, wait_event = NULL, wait_child = NULL,
        updated_at = now()
    WHERE namespace = w.namespace AND id = w.id
    RETURNING * INTO r;
    INSERT INTO run_events (namespace, run_id, type, attempt, details)
    VALUES (w.namespace, w.id, 'run_woken', w.attempt, details);
    RETURN NEXT r;
END
$$;

-- A lease's `run_leased` event is kept on the run's row while the lease lasts (`leased_seq`,
-- `leased_at`; see the migration `lease_events`). Whatever statement ends the lease otherwise
-- than by completing the run (a failure, a release, a suspension, an expiry, a timeout) clears
-- `leased_seq`, and this trigger writes the event out as a row of `run_events`.
CREATE FUNCTION aiki_write_out_lease() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO run_events (namespace, run_id, seq, type, at, attempt, worker_id)
    OVERRIDING SYSTEM VALUE
    VALUES (OLD.namespace, OLD.id, OLD.leased_seq, 'run_leased', OLD.leased_at, OLD.attempt,
            OLD.lease_owner);
    RETURN NULL;
END
$$;

CREATE TRIGGER runs_lease_written_out AFTER UPDATE OF leased_seq ON runs
    FOR EACH ROW
    WHEN (OLD.leased_seq IS NOT NULL AND NEW.leased_seq IS NULL)
    EXECUTE FUNCTION aiki_write_out_lease();

-- The end of a child: as in the migration `child_wake`, through `aiki_end_wait`.
CREATE OR REPLACE FUNCTION aiki_child_ended() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    p runs%ROWTYPE;
    woke runs%ROWTYPE;
BEGIN
    SELECT * INTO p FROM runs WHERE namespace = NEW.namespace AND id = NEW.parent_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO run_events (namespace, run_id, type, attempt, details)
    VALUES (p.namespace, p.id, 'child_ended', p.attempt,
            jsonb_build_object('child', NEW.id, 'workflow', NEW.workflow, 'status', NEW.status));
    IF p.status = 'queued' THEN
        -- A claim that ran meanwhile skipped the locked parent: its pollers look again.
        PERFORM pg_notify('aiki_ready', aiki_ready_payload(p.namespace, p.queue,
            ceil(extract(epoch FROM p.visible_at - now()) * 1000)::bigint));
    END IF;
    IF p.status <> 'suspended' OR p.wait_child IS DISTINCT FROM NEW.id THEN
        RETURN NULL;
    END IF;
    SELECT * INTO woke FROM aiki_end_wait(p.namespace, p.id,
        jsonb_build_object('child', NEW.id, 'status', NEW.status, 'output', NEW.output,
                           'error', NEW.error),
        jsonb_build_object('child', NEW.id, 'status', NEW.status));
    IF woke.status = 'queued' THEN
        PERFORM pg_notify('aiki_ready', aiki_ready_payload(p.namespace, p.queue, 0));
    END IF;
    RETURN NULL;
END
$$;
