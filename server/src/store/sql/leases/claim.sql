-- Leases up to $3 ready runs of one queue to worker $4 for $5 ms, in priority then age order,
-- skipping rows other pollers hold. Each lease's `run_leased` event is the row itself (its seq
-- drawn into `leased_seq`; see the migration `lease_events`). `fresh` says the
-- run was never leased before, so it has no recorded task to fetch. Only runs the worker
-- serves: an unpinned run (version '') if the worker serves its workflow in any version ($6,
-- workflow names, where '*' stands for every workflow); a pinned one if the worker registered
-- that version ($7, "workflow\nversion" pairs). The lease is bound to the worker's API key ($8,
-- NULL without authentication): reports under it from another key are refused.
-- The update finds each locked row by its `ctid` rather than by its key: no second index
-- descent per run. The lock keeps that row version in place until the transaction ends; a row
-- whose locked version is newer than the statement's snapshot is not found, so it is simply
-- not leased this time (it stays queued, and the poll looks again: see `leases/claim_skipped.sql`).
-- The first condition is the key of the ready index, a hash of namespace and queue (see the
-- migration `ready_key`); the names are tested too.
WITH ready AS (
    SELECT ctid, started_at FROM runs
    WHERE hashtextextended($1::text || E'\n' || $2::text, 0) = hashtextextended(namespace || E'\n' || queue, 0)
      AND namespace = $1 AND queue = $2 AND status = 'queued' AND visible_at <= now()
      AND CASE WHEN version = '' THEN workflow = ANY($6::text[]) OR '*' = ANY($6::text[])
               ELSE workflow || E'\n' || version = ANY($7::text[]) END
    ORDER BY priority DESC, visible_at, id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE runs r
    SET status = 'running', lease_owner = $4, lease_token = gen_random_uuid(), lease_key = $8::uuid,
        lease_expires_at = now() + least($5::bigint, coalesce(r.heartbeat_timeout_ms, $5::bigint))
                                   * interval '1 millisecond',
        attempt_deadline = now() + r.attempt_timeout_ms * interval '1 millisecond', lease_end = NULL,
        started_at = coalesce(r.started_at, now()), updated_at = now(),
        leased_seq = nextval('run_events_seq_seq'), leased_at = now()
    FROM ready
    WHERE r.ctid = ready.ctid
    -- Only what the worker gets: every column sent back costs the database an output call.
    RETURNING r.id, r.workflow, r.version, r.queue, r.input, r.attempt, r.lease_token,
              r.lease_expires_at, ready.started_at IS NULL AS fresh
