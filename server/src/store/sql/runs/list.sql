-- Newest first; the cursor is the id of the last run of the previous page (UUIDv7 ids sort
-- by creation time, so the primary key serves both the order and the time range). At most $8
-- runs, and only as many as fit in $10 bytes of input, output and error (the first one
-- always), so that no page is large whatever the runs hold; `page_rows` is how many the page
-- could have held by number: fewer answered means the byte budget ended the page.
SELECT * FROM (
    SELECT r.*, count(*) OVER () AS page_rows,
           sum(r.row_bytes) OVER (ORDER BY r.id DESC) AS page_bytes
    FROM (
        SELECT *, coalesce(octet_length(input::text), 0) + coalesce(octet_length(output::text), 0)
                  + coalesce(octet_length(error::text), 0) AS row_bytes
        FROM runs
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
    ) r
) p
WHERE page_bytes - row_bytes < $10
ORDER BY id DESC
