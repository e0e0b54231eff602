-- The children of runs $2 (namespace $1), ended or not (an ended child may have children of
-- its own that have not).
SELECT id FROM runs
WHERE namespace = $1 AND parent_id = ANY($2)
ORDER BY id
