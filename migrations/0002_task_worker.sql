-- The worker that recorded each task result: the task's history event is written from the
-- inserted row alone, without joining back to the run.
ALTER TABLE run_tasks ADD COLUMN worker_id uuid;
