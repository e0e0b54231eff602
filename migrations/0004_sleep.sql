-- Durable sleep: a suspended run holds no lease and no worker; it is queued again when
-- `wake_at` comes (or earlier, by WakeRun). The step it waits at (`wait_*`) is recorded as a
-- task result when it wakes.
ALTER TABLE runs DROP CONSTRAINT runs_lease_end_check;
ALTER TABLE runs ADD CONSTRAINT runs_lease_end_check
    CHECK (lease_end IN ('complete', 'fail', 'release', 'expire', 'cancel', 'suspend'));
ALTER TABLE runs ADD COLUMN wake_at timestamptz;
ALTER TABLE runs ADD COLUMN wait_key text;
ALTER TABLE runs ADD COLUMN wait_name text;
ALTER TABLE runs ADD COLUMN wait_seq integer;
-- Due wake-ups, in order: covers only suspended runs.
CREATE INDEX runs_wake ON runs (wake_at) WHERE status = 'suspended';
