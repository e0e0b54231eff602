-- The registered versions of workflows $2 of namespace $1, newest first.
SELECT workflow, version FROM workflow_versions
WHERE namespace = $1 AND workflow = ANY($2) AND version <> ''
ORDER BY registered_at DESC, version DESC
