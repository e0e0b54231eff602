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
