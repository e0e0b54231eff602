-- A new API key: ($1 id, $2 name, $3 role, $4 namespaces, $5 digest of the secret, $6 rate
-- limit, $7 who made it).
INSERT INTO api_keys (id, name, role, namespaces, digest, rate_limit, created_by)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING created_at
