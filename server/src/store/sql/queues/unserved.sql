-- Queued runs of namespace $1 that no live worker (one that heartbeat within the last $2 ms)
-- can lease, by queue, workflow and version; `other_versions` says that live workers serve
-- the workflow on that queue, in other versions.
WITH live AS (
    SELECT w.queues, s.name, s.version
    FROM workers w, jsonb_to_recordset(w.workflows) AS s (name text, version text)
    WHERE w.namespace = $1 AND w.last_heartbeat_at > now() - $2::bigint * interval '1 millisecond'
), waiting AS (
    SELECT queue, workflow, version, count(*) AS n FROM runs
    WHERE namespace = $1 AND status = 'queued'
    GROUP BY queue, workflow, version
)
SELECT queue, workflow, version, n,
       EXISTS (SELECT 1 FROM live l WHERE waiting.queue = ANY(l.queues) AND l.name = waiting.workflow)
           AS other_versions
FROM waiting
WHERE NOT EXISTS (
    SELECT 1 FROM live l
    WHERE waiting.queue = ANY(l.queues) AND (l.name = waiting.workflow OR l.name = '*')
      AND (waiting.version = '' OR l.version = waiting.version)
)
ORDER BY queue, workflow, version
