-- Locks the parents ($1 namespaces, $2 ids) of runs about to start, so that a parent cannot
-- be cancelled (which cancels its children) while a child is being added, and reads whether
-- each may still take children.
SELECT r.namespace, r.id, r.status, r.cancel_requested, r.attempt, r.queue
FROM runs r
JOIN unnest($1::text[], $2::uuid[]) AS p (namespace, id) ON r.namespace = p.namespace AND r.id = p.id
ORDER BY r.namespace COLLATE "C", r.id
FOR SHARE OF r
