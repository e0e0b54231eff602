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
