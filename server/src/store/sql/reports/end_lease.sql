-- Ends the current lease of a run: the new status, error, visibility and finish time are
-- decided by the caller, which holds the row lock. A pause request is fulfilled (or moot),
-- except by a suspension: it then takes effect when the run wakes. Clearing `leased_seq` has
-- the lease's `run_leased` event written out (the trigger of the migration `transitions`).
-- A release without a delay keeps the run's place in its queue (`visible_at` stays; see the
-- migration `queue_place`).
UPDATE runs
SET status = $3, error = $4, lease_end = $5, lease_expires_at = NULL,
    pause_requested = ($3 = 'suspended' AND pause_requested),
    attempt = $6,
    visible_at = CASE WHEN $5::text = 'release' AND $7::bigint = 0 THEN visible_at
                      ELSE now() + $7::bigint * interval '1 millisecond' END,
    requeued_at = CASE WHEN $5::text = 'release' AND $7::bigint = 0 THEN now() ELSE requeued_at END,
    finished_at = CASE WHEN $3 IN ('completed', 'failed', 'cancelled') THEN now() END,
    updated_at = now(), leased_seq = NULL, leased_at = NULL
WHERE namespace = $1 AND id = $2
RETURNING *
