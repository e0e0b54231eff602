-- Records many task results at once (reports coalesced into one transaction). Input rows are
-- ($1 namespace, $2 run id, $3 lease token, $4 key, $5 name, $6 seq, $7 output, $8 error), at
-- most one per (run, key). A result is recorded only under the run's current lease; the runs
-- are locked in key order (so that concurrent batches cannot deadlock on them) and stay locked
-- until commit, so a lease cannot end between the check and the insert. A task already
-- recorded is kept. Answers, per input position (`ord`, from 1): whether the lease held and
-- whether this row was recorded; anything else is sorted out one report at a time.
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::int[],
                         $7::jsonb[], $8::jsonb[])
        WITH ORDINALITY AS i (namespace, run_id, token, task_key, name, seq, output, error, ord)
), run AS (
    SELECT r.namespace, r.id, r.attempt, r.lease_owner, r.lease_token FROM runs r
    WHERE (r.namespace, r.id) IN (SELECT namespace, run_id FROM input) AND r.status = 'running'
    ORDER BY r.namespace, r.id
    FOR NO KEY UPDATE
), live AS (
    SELECT i.*, run.attempt, run.lease_owner FROM input i
    JOIN run ON run.namespace = i.namespace AND run.id = i.run_id AND run.lease_token = i.token
), inserted AS (
    INSERT INTO run_tasks (namespace, run_id, task_key, name, seq, output, error, attempt)
    SELECT namespace, run_id, task_key, name, seq, output, error, attempt FROM live ORDER BY ord
    ON CONFLICT DO NOTHING
    RETURNING namespace, run_id, task_key
), events AS (
    INSERT INTO run_events (namespace, run_id, type, attempt, worker_id, details)
    SELECT l.namespace, l.run_id, 'task_recorded', l.attempt, l.lease_owner,
           jsonb_build_object('task', l.name, 'key', l.task_key, 'seq', l.seq,
                              'failed', l.error IS NOT NULL)
    FROM live l JOIN inserted i USING (namespace, run_id, task_key)
    ORDER BY l.ord
)
SELECT l.ord, (i.task_key IS NOT NULL) AS recorded
FROM live l LEFT JOIN inserted i USING (namespace, run_id, task_key)
