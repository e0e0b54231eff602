-- Newest first; the cursor is the id of the last run of the previous page (UUIDv7 ids sort
-- by creation time, so the primary key serves both the order and the time range).
SELECT * FROM runs
WHERE namespace = $1
  AND ($2::text IS NULL OR workflow = $2)
  AND (cardinality($3::text[]) = 0 OR status = ANY($3))
  AND ($4::text IS NULL OR queue = $4)
  AND ($5::uuid IS NULL OR id >= $5)
  AND ($6::uuid IS NULL OR id < $6)
  AND ($7::uuid IS NULL OR id < $7)
  AND ($9::uuid IS NULL OR parent_id = $9)
ORDER BY id DESC
LIMIT $8
