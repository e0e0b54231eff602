-- The ready queue is keyed by a 64-bit hash of (namespace, queue) instead of the two names.
-- Every comparison a claim or an insertion makes in this index compared both texts under the
-- database's collation (a `strcoll` each, whatever the names), and every entry repeated them;
-- a hash compares as one integer and makes the index about a quarter smaller (for a
-- 22-character namespace and a 5-character queue name). Statements that use the index name the
-- same expression, and still test the names themselves (two names may share a hash).
-- Rebuilding the index blocks writes to `runs` while it is built.
DROP INDEX runs_ready;
CREATE INDEX runs_ready ON runs (hashtextextended(namespace || E'\n' || queue, 0), priority DESC, visible_at, id)
    WHERE status = 'queued';
