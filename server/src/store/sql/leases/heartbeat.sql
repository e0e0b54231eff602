-- Extends every lease of worker $2 named in ($3 ids, $4 tokens) by $5 ms; answers which are
-- still held, which ended by the holder's own report, which are to be cancelled or paused, and
-- whether the worker is known. A lease that has already expired is not revived, even before
-- the reaper has ended it: it is lost. An open lease is `lease_end IS NULL` rather than a status
-- test: see `runs_running_iff_leased`.
-- The runs are locked first, in key order, as every statement that locks many runs does (a
-- completion batch, `reports/lock_runs.sql`): locked in the order the worker named them, a heartbeat and
-- a completion of the same runs could each wait for the other. Every named run that still has
-- the named token is locked, ended leases too: a row lock reads the newest version of the row,
-- so a report that committed while this statement waited for the lock is seen as the end of
-- the lease it is (`ended`), not as a lost lease.
WITH leases AS (
    SELECT * FROM unnest($3::uuid[], $4::uuid[]) AS l(id, token)
), locked AS (
    SELECT r.id, r.lease_end, r.lease_owner, r.lease_expires_at
    FROM runs r JOIN leases l ON r.id = l.id AND r.lease_token = l.token
    WHERE r.namespace = $1
    ORDER BY r.id
    FOR NO KEY UPDATE OF r
), extended AS (
    UPDATE runs r
    SET lease_expires_at = now() + least($5::bigint, coalesce(r.heartbeat_timeout_ms, $5::bigint))
                                   * interval '1 millisecond'
    FROM locked l
    WHERE r.namespace = $1 AND r.id = l.id
      AND l.lease_end IS NULL AND l.lease_owner = $2 AND l.lease_expires_at > now()
    RETURNING r.id, r.cancel_requested, r.pause_requested, r.lease_expires_at
), worker AS (
    UPDATE workers SET last_heartbeat_at = now() WHERE namespace = $1 AND id = $2 RETURNING id
)
SELECT EXISTS (SELECT 1 FROM worker) AS worker_known,
       coalesce(array_agg(e.id) FILTER (WHERE e.id IS NOT NULL), '{}') AS held,
       coalesce(array_agg(e.id) FILTER (WHERE e.cancel_requested), '{}') AS cancel,
       coalesce(array_agg(e.id) FILTER (WHERE e.pause_requested AND NOT e.cancel_requested), '{}') AS pause,
       coalesce(max(e.lease_expires_at), now() + $5::bigint * interval '1 millisecond') AS expires,
       (SELECT coalesce(array_agg(l.id), '{}') FROM locked l
        WHERE l.lease_owner = $2 AND l.lease_end IN ('complete', 'fail', 'suspend', 'release')) AS ended
FROM (SELECT 1) one LEFT JOIN extended e ON true
