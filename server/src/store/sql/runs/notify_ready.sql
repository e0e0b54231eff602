-- Wakes the pollers of every replica: one `aiki_ready` notification per distinct
-- ($1 namespace, $2 queue, $3 delay in ms), its payload built by `aiki_ready_payload`, sent
-- when the transaction commits.
SELECT count(pg_notify('aiki_ready', aiki_ready_payload(ns, q, d)))
FROM (SELECT DISTINCT * FROM unnest($1::text[], $2::text[], $3::bigint[]) AS n(ns, q, d)) n
