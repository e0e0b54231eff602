-- Events of run ($1, $2) with a seq above $3, in order, from the view that puts the history's
-- sources together (see `run_history` in the migrations): at most $4 of them, and only as many
-- as fit in $5 bytes of details (the first one always), so that no page is large whatever the
-- events hold. `page_rows` is how many the page could have held by number: fewer answered
-- means the byte budget ended the page. `actor_name`: the name of the API key that did it.
SELECT p.*, k.name AS actor_name FROM (
    SELECT h.*, count(*) OVER () AS page_rows,
           sum(coalesce(octet_length(h.details::text), 0)) OVER (ORDER BY h.seq) AS page_bytes,
           coalesce(octet_length(h.details::text), 0) AS row_bytes
    FROM (
        SELECT * FROM run_history
        WHERE namespace = $1 AND run_id = $2 AND seq > $3
        ORDER BY seq
        LIMIT $4
    ) h
) p
LEFT JOIN api_keys k ON k.id = p.actor
WHERE page_bytes - row_bytes < $5
ORDER BY seq
