-- Pause and resume: a paused run is not leased until resumed. A pause asked while the run is
-- running is kept in `pause_requested` until the run's lease ends.
ALTER TABLE runs DROP CONSTRAINT runs_status_check;
ALTER TABLE runs ADD CONSTRAINT runs_status_check CHECK (status IN
    ('queued', 'running', 'suspended', 'paused', 'completed', 'failed', 'cancelled'));
ALTER TABLE runs ADD COLUMN pause_requested boolean NOT NULL DEFAULT false;
