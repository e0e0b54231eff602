-- Locks the runs ($1 namespaces, $2 ids) until commit, in key order (byte order, as the server
-- sorts a completion batch, whatever the database's collation) so that concurrent batches
-- cannot deadlock: a lease cannot end while reports under it are applied, and the reports of
-- one run (and their history events) are written one after another. Answers each run's
-- current lease (token, and whether it is open), attempt, lease owner and the owner's API key. No condition on the
-- status: see `runs_running_iff_leased` in the migrations.
SELECT r.namespace, r.id, r.lease_token, r.lease_end IS NULL AS open, r.attempt, r.lease_owner,
       r.lease_key
FROM runs r
WHERE (r.namespace, r.id) IN (SELECT * FROM unnest($1::text[], $2::uuid[]))
ORDER BY r.namespace COLLATE "C", r.id
FOR NO KEY UPDATE
