-- The API keys that share a namespace with $1 ('*' in $1: every key), oldest first, revoked
-- ones only if $2; at most $3.
SELECT id, name, role, namespaces, rate_limit, created_at, created_by, revoked_at
FROM api_keys
WHERE ('*' = ANY($1::text[]) OR namespaces && $1::text[]) AND ($2 OR revoked_at IS NULL)
ORDER BY created_at, id
LIMIT $3
