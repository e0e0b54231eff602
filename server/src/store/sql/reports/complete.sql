-- Completes many runs at once (reports coalesced into one transaction): input rows are
-- ($1 namespace, $2 run id, $3 lease token, $4 output, $5 the task results the completion
-- carries, a JSON array of {"key", "name", "seq", "output" or "error"}, or NULL, and $6 how many
-- it holds, $7 the reporting API key, or NULL without authentication), sorted by run by the caller so that concurrent batches lock rows in one order. A
-- run is completed only under its current, open lease, by the key its worker holds (`lease_end IS NULL` rather than a status
-- test: see `runs_running_iff_leased`). The carried results go on the row as sent
-- (`final_tasks`, see the migrations of that name), with their `task_recorded` event seqs in
-- `final_task_seqs`, drawn as the input row is read, so before the completion's own
-- (`completed_seq`, drawn as the row is updated): the task events come before `run_completed`
-- in the history. Nothing here takes the JSON apart (the view `task_results` leaves out a key
-- that `run_tasks` already holds). Answers the input positions (`ord`, from 1) that completed a
-- run. The others are sorted out one report at a time (a duplicate of the report that
-- completed it, or a refusal). The `run_completed` event is the row itself, with its lease's
-- `run_leased`.
WITH input AS MATERIALIZED (
    SELECT i.namespace, i.id, i.token, i.output, i.tasks, i.key, i.ord,
           CASE i.n WHEN 0 THEN NULL
                    WHEN 1 THEN ARRAY[nextval('run_events_seq_seq')]
                    ELSE ARRAY(SELECT nextval('run_events_seq_seq') FROM generate_series(1, i.n)) END
               AS seqs
    FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::jsonb[], $5::jsonb[], $6::int[], $7::uuid[])
        WITH ORDINALITY AS i (namespace, id, token, output, tasks, n, key, ord)
), done AS (
    UPDATE runs r
    SET status = 'completed', output = i.output, error = NULL, lease_end = 'complete',
        lease_expires_at = NULL, finished_at = now(), updated_at = now(),
        final_tasks = i.tasks, final_task_seqs = i.seqs,
        completed_seq = nextval('run_events_seq_seq')
    FROM input i
    WHERE r.namespace = i.namespace AND r.id = i.id AND r.lease_token = i.token
      AND r.lease_end IS NULL AND (i.key IS NULL OR r.lease_key = i.key)
    RETURNING i.ord
)
SELECT * FROM done
