-- Becomes the reaper if no other session is: held until this session ends.
SELECT pg_try_advisory_lock($1)
