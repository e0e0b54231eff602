-- Aiki's initial schema. Every table carries `namespace` first in its primary key so that a
-- later sharding by namespace keeps each hot statement on one shard.

CREATE TABLE runs (
    namespace          text        NOT NULL,
    id                 uuid        NOT NULL,            -- UUIDv7: time-ordered
    workflow           text        NOT NULL,
    version            text        NOT NULL DEFAULT '',
    queue              text        NOT NULL,
    priority           integer     NOT NULL DEFAULT 0,
    status             text        NOT NULL
        CHECK (status IN ('queued', 'running', 'suspended', 'completed', 'failed', 'cancelled')),
    input              jsonb       NOT NULL,
    output             jsonb,
    error              jsonb,                           -- {type, message, details}
    idempotency_key    text,
    request_id         text,                            -- dedupes client retries without a key
    attempt            integer     NOT NULL DEFAULT 1,
    -- retry policy, resolved against the server defaults at start
    max_attempts       integer     NOT NULL,
    initial_interval_ms bigint     NOT NULL,
    max_interval_ms    bigint      NOT NULL,
    backoff_coefficient double precision NOT NULL,
    non_retryable_error_types text[] NOT NULL DEFAULT '{}',
    lease_expirations  integer     NOT NULL DEFAULT 0,
    cancel_requested   boolean     NOT NULL DEFAULT false,
    -- the lease: the token stays after the lease ends, with `lease_end` saying how it ended,
    -- so that a duplicate of the report that ended it can be recognised and acknowledged
    lease_owner        uuid,
    lease_token        uuid,
    lease_expires_at   timestamptz,
    lease_end          text CHECK (lease_end IN ('complete', 'fail', 'release', 'expire', 'cancel')),
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    visible_at         timestamptz NOT NULL DEFAULT now(),
    started_at         timestamptz,
    finished_at        timestamptz,
    PRIMARY KEY (namespace, id)
);

-- The ready queue: covers only queued rows, in claim order.
CREATE INDEX runs_ready ON runs (namespace, queue, priority DESC, visible_at, id)
    WHERE status = 'queued';
-- Lease expiry scan of the reaper: covers only running rows.
CREATE INDEX runs_leases ON runs (lease_expires_at) WHERE status = 'running';
CREATE UNIQUE INDEX runs_idempotency_key ON runs (namespace, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX runs_request_id ON runs (namespace, request_id)
    WHERE request_id IS NOT NULL;

-- Checkpointed task results: a re-executed run gets them back and never repeats a task.
CREATE TABLE run_tasks (
    namespace   text        NOT NULL,
    run_id      uuid        NOT NULL,
    task_key    text        NOT NULL,
    name        text        NOT NULL,
    seq         integer     NOT NULL,
    output      jsonb,
    error       jsonb,
    attempt     integer     NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, run_id, task_key)
);

-- The append-only history of every run, written in the transaction of each state change.
CREATE TABLE run_events (
    namespace text        NOT NULL,
    run_id    uuid        NOT NULL,
    seq       bigint      GENERATED ALWAYS AS IDENTITY,
    type      text        NOT NULL,
    at        timestamptz NOT NULL DEFAULT now(),
    attempt   integer     NOT NULL DEFAULT 0,
    worker_id uuid,
    details   jsonb,
    PRIMARY KEY (namespace, run_id, seq)
);

CREATE TABLE workers (
    namespace         text        NOT NULL,
    id                uuid        NOT NULL,
    identity          text        NOT NULL,
    host              text        NOT NULL,
    workflows         jsonb       NOT NULL,             -- [{name, version}]
    queues            text[]      NOT NULL,
    slots             integer     NOT NULL,
    registered_at     timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, id)
);
