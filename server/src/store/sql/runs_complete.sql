-- Completes many runs at once (reports coalesced into one transaction): input rows are
-- ($1 namespace, $2 run id, $3 lease token, $4 output, $5 how many task results the
-- completion carries), sorted by run by the caller so that concurrent batches lock rows in one
-- order. A run is completed only under its current, open lease (`lease_end IS NULL` rather than
-- a status test: see `runs_running_iff_leased`). Answers the input positions (`ord`, from 1)
-- that completed a run, with what the caller needs to insert the carried task results under
-- this row lock (`tasks_record.sql`): the attempt, the owner and `task_seqs`, their event seqs.
-- Those are drawn as the input row is read, so before the completion's own (`completed_seq`,
-- drawn as the row is updated): the task events come before `run_completed` in the history.
-- The others are sorted out one report at a time (a duplicate of the report that completed it,
-- or a refusal). The `run_completed` event is the row itself, with its lease's `run_leased`.
WITH input AS MATERIALIZED (
    SELECT i.*,
           CASE WHEN i.ntasks = 0 THEN '{}'::bigint[]
                ELSE ARRAY(SELECT nextval('run_events_seq_seq') FROM generate_series(1, i.ntasks)) END
               AS task_seqs
    FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::jsonb[], $5::int[])
        WITH ORDINALITY AS i (namespace, id, token, output, ntasks, ord)
), done AS (
    UPDATE runs r
    SET status = 'completed', output = i.output, error = NULL, lease_end = 'complete',
        lease_expires_at = NULL, finished_at = now(), updated_at = now(),
        completed_seq = nextval('run_events_seq_seq')
    FROM input i
    WHERE r.namespace = i.namespace AND r.id = i.id AND r.lease_token = i.token
      AND r.lease_end IS NULL
    RETURNING i.ord, r.attempt, r.lease_owner, i.task_seqs
)
SELECT * FROM done
