-- Run timeouts. Each is optional (NULL: none):
-- - execution: the whole run, from its start; `execution_deadline` is fixed at creation;
-- - attempt: one lease, from its claim to its end; `attempt_deadline` is set at each claim;
-- - schedule-to-start: how long a run may stay ready in its queue without being leased;
-- - heartbeat: how long a lease lives without a heartbeat (caps the server's lease time).
-- A timeout that ends an attempt is retried by the run's policy; the others end the run.
ALTER TABLE runs ADD COLUMN execution_deadline timestamptz;
ALTER TABLE runs ADD COLUMN attempt_timeout_ms bigint;
ALTER TABLE runs ADD COLUMN attempt_deadline timestamptz;
ALTER TABLE runs ADD COLUMN schedule_timeout_ms bigint;
ALTER TABLE runs ADD COLUMN heartbeat_timeout_ms bigint;

ALTER TABLE runs DROP CONSTRAINT runs_lease_end_check;
ALTER TABLE runs ADD CONSTRAINT runs_lease_end_check
    CHECK (lease_end IN ('complete', 'fail', 'release', 'expire', 'cancel', 'suspend', 'timeout'));

-- The reaper's scans, each over the runs that have that timeout only.
CREATE INDEX runs_execution_deadline ON runs (execution_deadline)
    WHERE execution_deadline IS NOT NULL AND status IN ('queued', 'running', 'suspended', 'paused');
CREATE INDEX runs_attempt_deadline ON runs (attempt_deadline)
    WHERE attempt_deadline IS NOT NULL AND status = 'running';
CREATE INDEX runs_schedule_timeout ON runs (visible_at)
    WHERE schedule_timeout_ms IS NOT NULL AND status = 'queued';
