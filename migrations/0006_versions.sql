-- Workflow versions: every (workflow, version) a worker has registered, kept after the worker
-- is gone. A run started without a version is pinned to its workflow's newest registered
-- version (none registered: left unpinned, '', and any worker of the workflow may run it);
-- a run started with a version must name a registered one.
CREATE TABLE workflow_versions (
    namespace     text        NOT NULL,
    workflow      text        NOT NULL,
    version       text        NOT NULL,              -- '' for workers that give none
    registered_at timestamptz NOT NULL DEFAULT now(),  -- first registration
    last_seen_at  timestamptz NOT NULL DEFAULT now(),  -- latest registration
    PRIMARY KEY (namespace, workflow, version)
);
