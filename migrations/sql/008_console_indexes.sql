-- What the web console (python -m console) reads at any table size: the sessions list newest first
-- filtered by status (keyset on id), by a time range (created_at), and the stored-per-second chart
-- (stored_at over the last minutes). Each is one small btree; without them those pages scan the table.
-- Plain CREATE INDEX (the runner applies a file in one transaction): it blocks writes while it builds,
-- about a second per million sessions; on a large deployment build them first by hand with
-- CREATE INDEX CONCURRENTLY under the same names, and this file is then a no-op.
CREATE INDEX IF NOT EXISTS sessions_status_id_idx ON sessions (status, id);

CREATE INDEX IF NOT EXISTS sessions_created_at_idx ON sessions (created_at);

CREATE INDEX IF NOT EXISTS sessions_stored_at_idx ON sessions (stored_at) WHERE stored_at IS NOT NULL;
