-- One migrator at a time, until the end of its transaction.
SELECT pg_advisory_xact_lock($1)
