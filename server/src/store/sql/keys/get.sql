-- The API keys with ids $1, revoked ones too (a revoked key is refused by name).
SELECT id, name, role, namespaces, digest, rate_limit, revoked_at IS NOT NULL AS revoked
FROM api_keys WHERE id = ANY($1::uuid[])
