-- The ingestor's bookkeeping. Additive only: nullable columns without defaults (no row is rewritten, legacy
-- Atlas rows keep NULL and are never touched by the ingestor, which only reads rows with a task_id), new
-- indexes, and the table of rolling JSONL files.
--
--   task_id         the task the adapter session ran (every telemetry message carries it)
--   attempt         SessionOpened.attempt; NULL until the opened message arrived (a stub row)
--   steps_expected  SessionClosed.steps; NULL until the closed message arrived
--   export_file     the JSONL file the complete session was assigned to, exactly once (see ingestor/_jsonl.py)
ALTER TABLE sessions
    ADD COLUMN IF NOT EXISTS task_id TEXT,
    ADD COLUMN IF NOT EXISTS attempt INTEGER,
    ADD COLUMN IF NOT EXISTS steps_expected INTEGER,
    ADD COLUMN IF NOT EXISTS export_file TEXT;

-- The abandonment rule looks sessions up by task.
CREATE INDEX IF NOT EXISTS sessions_task_id_idx ON sessions (task_id) WHERE task_id IS NOT NULL;

-- Recovery regenerates a file from the sessions assigned to it.
CREATE INDEX IF NOT EXISTS sessions_export_file_idx ON sessions (export_file) WHERE export_file IS NOT NULL;

-- The safety sweep looks for closed, exportable sessions that no file holds yet (normally none).
CREATE INDEX IF NOT EXISTS sessions_unexported_idx ON sessions (id)
    WHERE export_file IS NULL AND steps_expected IS NOT NULL AND status IN ('succeeded', 'failed');

-- `atlas-ingestor export --since` walks completed sessions in completion order.
CREATE INDEX IF NOT EXISTS sessions_completed_at_idx ON sessions (completed_at, id);

-- One row per rolling JSONL file, created in the transaction that first assigns a session to it.
-- owner_token names the owning ingestor process generation; the owner holds a session-level advisory lock
-- derived from it for its life, so a recoverer that can take that lock knows the owner is gone.
CREATE TABLE IF NOT EXISTS jsonl_files (
    name TEXT PRIMARY KEY,
    ingestor_id TEXT NOT NULL,
    owner_token TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'final')),
    sessions INTEGER NOT NULL DEFAULT 0 CHECK (sessions >= 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    finalized_at TIMESTAMPTZ
);

CREATE INDEX IF NOT EXISTS jsonl_files_open_idx ON jsonl_files (name) WHERE state = 'open';
