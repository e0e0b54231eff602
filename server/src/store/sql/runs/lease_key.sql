-- Whether run ($1, $2) exists, and the API key of the worker holding its lease (NULL: not
-- leased, or leased without authentication).
SELECT CASE WHEN lease_end IS NULL THEN lease_key END AS lease_key FROM runs
WHERE namespace = $1 AND id = $2
