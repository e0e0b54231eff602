-- Ends up to $1 expired leases: the run is queued again at its place in the queue (its
-- `visible_at` kept; see the migration `queue_place`) or paused, if that was asked, or
-- ends `failed` once its lease has expired more than $2 times, or `cancelled` if that was
-- requested. Records the events (the `run_leased` event is written out by the trigger of the
-- migration `transitions` as `leased_seq` is cleared). Runs with a heartbeat timeout are left
-- to the timeouts
-- (`waits/heartbeat_timeouts.sql`): for them an expired lease is a failed attempt.
WITH expired AS (
    SELECT namespace, id FROM runs
    WHERE status = 'running' AND lease_expires_at < now() AND heartbeat_timeout_ms IS NULL
    ORDER BY lease_expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), updated AS (
    UPDATE runs r
    SET lease_expirations = r.lease_expirations + 1,
        status = CASE WHEN r.cancel_requested THEN 'cancelled'
                      WHEN r.lease_expirations + 1 > $2 THEN 'failed'
                      WHEN r.pause_requested THEN 'paused'
                      ELSE 'queued' END,
        pause_requested = false,
        error = CASE
            WHEN r.cancel_requested THEN jsonb_build_object('type', 'Cancelled', 'message',
                'cancelled: the worker did not acknowledge before its lease expired')
            WHEN r.lease_expirations + 1 > $2 THEN jsonb_build_object('type', 'LeaseExpired',
                'message', format('the lease expired %s times without a report (limit %s): each '
                    'worker that held the run stopped heartbeating (it crashed, was killed, or '
                    'lost the server); if the run itself makes its worker crash (out of memory, a '
                    'fatal signal), fix that, else raise max_lease_expirations',
                    r.lease_expirations + 1, $2))
            ELSE r.error END,
        finished_at = CASE WHEN r.cancel_requested OR r.lease_expirations + 1 > $2
                           THEN now() END,
        lease_end = 'expire', lease_expires_at = NULL, requeued_at = now(), updated_at = now(),
        leased_seq = NULL, leased_at = NULL
    FROM expired
    WHERE r.namespace = expired.namespace AND r.id = expired.id
    RETURNING r.*
), events AS (
    INSERT INTO run_events (namespace, run_id, type, attempt, worker_id, details)
    SELECT namespace, id, 'lease_expired', attempt, lease_owner,
           jsonb_build_object('lease_expirations', lease_expirations)
    FROM updated
    UNION ALL
    SELECT namespace, id, CASE status WHEN 'failed' THEN 'run_failed' ELSE 'run_cancelled' END,
           attempt, lease_owner, error
    FROM updated WHERE status IN ('failed', 'cancelled')
    UNION ALL
    SELECT namespace, id, 'run_paused', attempt, NULL, NULL
    FROM updated WHERE status = 'paused'
)
SELECT namespace, id, queue, status FROM updated
