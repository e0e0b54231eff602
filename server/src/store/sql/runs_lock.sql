-- Locks the running runs among ($1 namespaces, $2 ids) until commit, in key order so that
-- concurrent batches cannot deadlock: a lease cannot end while reports under it are applied,
-- and the reports of one run (and their history events) are written one after another.
-- Answers each locked run's current lease token, attempt and lease owner.
SELECT r.namespace, r.id, r.lease_token, r.attempt, r.lease_owner
FROM runs r
WHERE (r.namespace, r.id) IN (SELECT * FROM unnest($1::text[], $2::uuid[]))
  AND r.status = 'running'
ORDER BY r.namespace, r.id
FOR NO KEY UPDATE
