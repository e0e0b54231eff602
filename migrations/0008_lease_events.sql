-- The common path of a run writes no event rows for its lease and its completion: like its
-- creation and its checkpointed tasks, they are columns of the rows that already exist. A
-- claim draws the seq of the lease's `run_leased` event into `leased_seq`; a completion draws
-- that of `run_completed` into `completed_seq`. A lease that ends any other way (a failure, a
-- release, a suspension, an expiry, a timeout) is written out as a `run_leased` row of
-- `run_events`, with the same seq, by the statement that ends it, which clears the column.
-- The history is the view `run_history`, which puts every source together.
ALTER TABLE runs ADD COLUMN leased_seq bigint;
ALTER TABLE runs ADD COLUMN leased_at timestamptz;
ALTER TABLE runs ADD COLUMN completed_seq bigint;
-- A lease left on the row is the current one, or the one that completed the run.
ALTER TABLE runs ADD CONSTRAINT runs_lease_event_on_row
    CHECK (leased_seq IS NULL OR status IN ('running', 'completed'));

CREATE VIEW run_history AS
    SELECT namespace, id AS run_id, created_seq AS seq, 'run_created'::text AS type,
           created_at AS at, 1 AS attempt, NULL::uuid AS worker_id, NULL::jsonb AS details
    FROM runs WHERE created_seq IS NOT NULL
    UNION ALL
    SELECT namespace, id, leased_seq, 'run_leased', leased_at, attempt, lease_owner, NULL
    FROM runs WHERE leased_seq IS NOT NULL
    UNION ALL
    SELECT namespace, id, completed_seq, 'run_completed', finished_at, attempt, lease_owner, NULL
    FROM runs WHERE completed_seq IS NOT NULL
    UNION ALL
    SELECT namespace, run_id, event_seq, 'task_recorded', recorded_at, attempt, worker_id,
           jsonb_build_object('task', name, 'key', task_key, 'seq', seq, 'failed', error IS NOT NULL)
    FROM run_tasks WHERE event_seq IS NOT NULL
    UNION ALL
    SELECT namespace, run_id, seq, type, at, attempt, worker_id, details FROM run_events;
