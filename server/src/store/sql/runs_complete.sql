-- Completes many runs at once (reports coalesced into one transaction): input rows are
-- ($1 namespace, $2 run id, $3 lease token, $4 output, $5 the task results the completion
-- carries, a JSON array of {"key", "name", "seq", "output" or "error"}, or NULL), sorted by run
-- by the caller so that concurrent batches lock rows in one order. A run is completed only
-- under its current, open lease (`lease_end IS NULL` rather than a status test: see
-- `runs_running_iff_leased`). The carried results go on the row (`final_tasks`, see the
-- migration of that name), each with its `task_recorded` event seq, drawn as the input row is
-- read, so before the completion's own (`completed_seq`, drawn as the row is updated): the
-- task events come before `run_completed` in the history. A key already recorded in
-- `run_tasks` is left out. Answers the input positions (`ord`, from 1) that completed a run.
-- The others are sorted out one report at a time (a duplicate of the report that completed it,
-- or a refusal). The `run_completed` event is the row itself, with its lease's `run_leased`.
WITH input AS MATERIALIZED (
    SELECT i.namespace, i.id, i.token, i.output, i.ord,
           CASE WHEN i.tasks IS NULL THEN NULL
                ELSE (SELECT jsonb_agg(t.task || jsonb_build_object('event_seq',
                                                                    nextval('run_events_seq_seq'))
                                       ORDER BY t.n)
                      FROM jsonb_array_elements(i.tasks) WITH ORDINALITY AS t (task, n)
                      WHERE NOT EXISTS (SELECT 1 FROM run_tasks rt
                                        WHERE rt.namespace = i.namespace AND rt.run_id = i.id
                                          AND rt.task_key = t.task->>'key')) END
               AS final_tasks
    FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::jsonb[], $5::jsonb[])
        WITH ORDINALITY AS i (namespace, id, token, output, tasks, ord)
), done AS (
    UPDATE runs r
    SET status = 'completed', output = i.output, error = NULL, lease_end = 'complete',
        lease_expires_at = NULL, finished_at = now(), updated_at = now(),
        final_tasks = i.final_tasks, completed_seq = nextval('run_events_seq_seq')
    FROM input i
    WHERE r.namespace = i.namespace AND r.id = i.id AND r.lease_token = i.token
      AND r.lease_end IS NULL
    RETURNING i.ord
)
SELECT * FROM done
