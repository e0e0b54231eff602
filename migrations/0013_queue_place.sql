-- A run whose lease expired or was released (without a delay) keeps its place in its queue:
-- `visible_at`, which orders the ready queue, stays when the run first became ready, so that
-- the runs of a crashed worker are taken again before the backlog that queued up behind them.
-- `requeued_at` records when such a run was queued again: the schedule-to-start timeout is
-- measured from the later of the two, as it was measured from `visible_at` before.
ALTER TABLE runs ADD COLUMN requeued_at timestamptz;
DROP INDEX runs_schedule_timeout;
CREATE INDEX runs_schedule_timeout ON runs (greatest(visible_at, requeued_at))
    WHERE schedule_timeout_ms IS NOT NULL AND status = 'queued';
