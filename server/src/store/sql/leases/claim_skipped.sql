-- Whether queue $2 of namespace $1 holds a ready run that a worker serving ($3
-- workflows, $4 pinned versions) could take; the filter of `leases/claim.sql`. Asked after a claim
-- that leased nothing: such a run was skipped because another transaction
-- held its row lock (a concurrent claim, a report batch, a heartbeat whose recheck of a lease
-- that ended meanwhile leaves the row locked), or became ready since the claim looked.
SELECT EXISTS (
    SELECT 1 FROM runs
    WHERE hashtextextended($1::text || E'\n' || $2::text, 0) = hashtextextended(namespace || E'\n' || queue, 0)
      AND namespace = $1 AND queue = $2 AND status = 'queued' AND visible_at <= now()
      AND CASE WHEN version = '' THEN workflow = ANY($3::text[]) OR '*' = ANY($3::text[])
               ELSE workflow || E'\n' || version = ANY($4::text[]) END
)
