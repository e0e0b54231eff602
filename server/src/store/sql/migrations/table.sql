-- The migrations applied so far (the one table without a namespace: it is about the schema).
-- Quiet: `IF NOT EXISTS` would otherwise send a NOTICE, logged at every start.
SET LOCAL client_min_messages = warning;
CREATE TABLE IF NOT EXISTS aiki_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
