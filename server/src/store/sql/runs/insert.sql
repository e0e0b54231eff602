-- Inserts many runs in one statement, each unless its idempotency key or request id is taken
-- (those are left out of the answer). Each run's creation event is the run row itself (its
-- `created_seq` default draws the event seq). Input rows are
-- ($1 namespace, $2 id, $3 workflow, $4 version, $5 queue, $6 priority, $7 input,
-- $8 idempotency key, $9 request id, $10 max attempts, $11 initial interval ms,
-- $12 max interval ms, $13 backoff coefficient, $14 non-retryable error types (a JSON array),
-- $15 delay ms, $16 parent run id, $17 execution timeout ms, $18 attempt timeout ms,
-- $19 schedule-to-start timeout ms, $20 heartbeat timeout ms, $24 the API key that starts it),
-- inserted in the order given
-- (the caller sorts them by key, so that batches sharing keys wait for each other in one order
-- and cannot deadlock). ($21 namespace, $22 queue, $23 delay in ms) are the ready
-- notifications to send, one NOTIFY each (its payload built by `aiki_ready_payload`) when the
-- statement's transaction commits: with them in the same statement, a
-- start needs no transaction of its own (a run whose key was taken may send one for nothing,
-- which wakes a poller that finds nothing new).
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::int[],
                         $7::jsonb[], $8::text[], $9::text[], $10::int[], $11::bigint[],
                         $12::bigint[], $13::float8[], $14::jsonb[], $15::bigint[], $16::uuid[],
                         $17::bigint[], $18::bigint[], $19::bigint[], $20::bigint[], $24::uuid[])
        WITH ORDINALITY AS i (namespace, id, workflow, version, queue, priority, input,
                              idempotency_key, request_id, max_attempts, initial_interval_ms,
                              max_interval_ms, backoff_coefficient, non_retryable, delay_ms, parent_id,
                              execution_ms, attempt_ms, schedule_ms, heartbeat_ms, created_by, ord)
), inserted AS (
    INSERT INTO runs (namespace, id, workflow, version, queue, priority, status, input,
                      idempotency_key, request_id, max_attempts, initial_interval_ms,
                      max_interval_ms, backoff_coefficient, non_retryable_error_types, visible_at,
                      parent_id, execution_deadline, attempt_timeout_ms, schedule_timeout_ms,
                      heartbeat_timeout_ms, created_by)
    SELECT namespace, id, workflow, version, queue, priority, 'queued', input,
           idempotency_key, request_id, max_attempts, initial_interval_ms,
           max_interval_ms, backoff_coefficient,
           CASE WHEN non_retryable = '[]' THEN '{}'
                ELSE ARRAY(SELECT jsonb_array_elements_text(non_retryable)) END,
           now() + delay_ms * interval '1 millisecond', parent_id,
           now() + execution_ms * interval '1 millisecond', attempt_ms, schedule_ms, heartbeat_ms,
           created_by
    FROM input ORDER BY ord
    ON CONFLICT DO NOTHING
    -- What the answer needs; not the input, which the caller sent (nor output and error,
    -- which a new run has not).
    RETURNING namespace, id, workflow, version, queue, priority, status, NULL::jsonb AS input,
              NULL::jsonb AS output, NULL::jsonb AS error, idempotency_key, attempt,
              max_attempts, initial_interval_ms, max_interval_ms, backoff_coefficient,
              non_retryable_error_types, lease_expirations, cancel_requested, lease_owner,
              created_at, updated_at, visible_at, started_at, finished_at, lease_expires_at,
              parent_id, execution_deadline, attempt_timeout_ms, schedule_timeout_ms,
              heartbeat_timeout_ms
), woken AS (
    SELECT count(pg_notify('aiki_ready', aiki_ready_payload(ns, q, d)))
    FROM (SELECT DISTINCT * FROM unnest($21::text[], $22::text[], $23::bigint[]) AS n(ns, q, d)) n
)
SELECT inserted.* FROM inserted, woken
