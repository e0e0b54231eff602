-- Revokes API key $1 (a key revoked before keeps its first revocation time); answers it.
UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
WHERE id = $1
RETURNING id, name, role, namespaces, rate_limit, created_at, created_by, revoked_at
