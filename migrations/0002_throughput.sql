-- Hot-path support.

-- The worker that recorded each task result: the task's history event is written from the
-- inserted row alone, without joining back to the run.
ALTER TABLE run_tasks ADD COLUMN worker_id uuid;

-- A run is running exactly when it holds a lease that has not ended. Statements that look up
-- many runs by key test `lease_end IS NULL` rather than the status: a condition on the status
-- would let the planner choose the partial index `runs_leases`, whose dead entries (the runs
-- that ran since the last vacuum) make it slow under a sustained drain.
ALTER TABLE runs ADD CONSTRAINT runs_running_iff_leased
    CHECK ((status = 'running') = (lease_token IS NOT NULL AND lease_end IS NULL));

-- A run's creation is the first event of its history, but it is not written as a row of
-- `run_events` (that row cost a third of the time of every start): its seq comes from the
-- same sequence as the events' and is kept on the run, and the history reads it from there.
-- Runs created before this migration keep their `run_created` rows and no `created_seq`.
ALTER TABLE runs ADD COLUMN created_seq bigint;
ALTER TABLE runs ALTER COLUMN created_seq SET DEFAULT nextval('run_events_seq_seq');

-- Likewise a checkpointed task is its own `task_recorded` event: the task row keeps the event
-- seq. Tasks recorded before this migration keep their event rows and no `event_seq`.
ALTER TABLE run_tasks ADD COLUMN event_seq bigint;
ALTER TABLE run_tasks ALTER COLUMN event_seq SET DEFAULT nextval('run_events_seq_seq');
