-- API keys: what authenticates a caller and what it may do. The secret is never stored: only
-- its SHA-256 digest, compared in constant time after the key is found by its public id. A key
-- holds one role in a set of namespaces ('*': every namespace).
CREATE TABLE api_keys (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL,
    role        text        NOT NULL CHECK (role IN ('read', 'client', 'worker', 'admin')),
    namespaces  text[]      NOT NULL CHECK (cardinality(namespaces) > 0),
    digest      bytea       NOT NULL,
    rate_limit  integer     NOT NULL DEFAULT 0 CHECK (rate_limit >= 0),  -- requests/s; 0: the server's
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text        NOT NULL,
    revoked_at  timestamptz
);

-- A worker is bound to the key that registered it (NULL: registered without authentication):
-- its polls and heartbeats from any other key are refused.
ALTER TABLE workers ADD COLUMN key_id uuid;

-- The key whose worker holds the current lease (NULL: leased without authentication): reports
-- under the lease from any other key are refused, even with the right token.
ALTER TABLE runs ADD COLUMN lease_key uuid;

-- Who did it: the API key behind each start (`runs.created_by`), each report (the lease's key,
-- `runs.lease_key`, which reports must match; `run_tasks.key_id`) and each other event
-- (`run_events.actor`), shown in the history by key id and name. NULL: without
-- authentication, or the server itself (timers, timeouts). The statements that write events
-- in SQL functions (a wait that ends, a child's end) take the key from the transaction's
-- setting `aiki.actor`, which the server sets where a caller's request does that.
ALTER TABLE runs ADD COLUMN created_by uuid;
ALTER TABLE run_tasks ADD COLUMN key_id uuid
    DEFAULT nullif(current_setting('aiki.actor', true), '')::uuid;
ALTER TABLE run_events ADD COLUMN actor uuid
    DEFAULT nullif(current_setting('aiki.actor', true), '')::uuid;

-- As in the migration `final_task_seqs`, with the key of each result.
CREATE OR REPLACE VIEW task_results AS
    SELECT namespace, run_id, task_key, name, seq, output, error, attempt, worker_id,
           recorded_at, event_seq, key_id
    FROM run_tasks
    UNION ALL
    SELECT r.namespace, r.id, t.task->>'key', t.task->>'name', (t.task->>'seq')::int,
           t.task->'output', t.task->'error', r.attempt, r.lease_owner, r.finished_at,
           coalesce((t.task->>'event_seq')::bigint, r.final_task_seqs[t.n]), r.lease_key
    FROM runs r CROSS JOIN LATERAL jsonb_array_elements(r.final_tasks) WITH ORDINALITY AS t (task, n)
    WHERE r.final_tasks IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM run_tasks rt
                      WHERE rt.namespace = r.namespace AND rt.run_id = r.id
                        AND rt.task_key = t.task->>'key');

-- As in the migration `final_tasks`, with who did it.
CREATE OR REPLACE VIEW run_history AS
    SELECT namespace, id AS run_id, created_seq AS seq, 'run_created'::text AS type,
           created_at AS at, 1 AS attempt, NULL::uuid AS worker_id, NULL::jsonb AS details,
           created_by AS actor
    FROM runs WHERE created_seq IS NOT NULL
    UNION ALL
    SELECT namespace, id, leased_seq, 'run_leased', leased_at, attempt, lease_owner, NULL, lease_key
    FROM runs WHERE leased_seq IS NOT NULL
    UNION ALL
    SELECT namespace, id, completed_seq, 'run_completed', finished_at, attempt, lease_owner, NULL,
           lease_key
    FROM runs WHERE completed_seq IS NOT NULL
    UNION ALL
    SELECT namespace, run_id, event_seq, 'task_recorded', recorded_at, attempt, worker_id,
           jsonb_build_object('task', name, 'key', task_key, 'seq', seq, 'failed', error IS NOT NULL),
           key_id
    FROM task_results WHERE event_seq IS NOT NULL
    UNION ALL
    SELECT namespace, run_id, seq, type, at, attempt, worker_id, details, actor FROM run_events;

-- As in the migration `transitions`, with the lease's key as the event's actor.
CREATE OR REPLACE FUNCTION aiki_write_out_lease() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO run_events (namespace, run_id, seq, type, at, attempt, worker_id, actor)
    OVERRIDING SYSTEM VALUE
    VALUES (OLD.namespace, OLD.id, OLD.leased_seq, 'run_leased', OLD.leased_at, OLD.attempt,
            OLD.lease_owner, OLD.lease_key);
    RETURN NULL;
END
$$;
