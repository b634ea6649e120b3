-- One Atlas session per adapter session: the ingestor upserts ON CONFLICT (adapter_session_id). A plain
-- (non-partial) unique index so ON CONFLICT can infer it; NULLs are distinct in a unique index, so legacy
-- rows without an adapter session stay valid. Builds under a write lock on sessions for its duration.
CREATE UNIQUE INDEX IF NOT EXISTS sessions_adapter_session_id_key
    ON sessions (adapter_session_id);

-- Exports and joins look steps up by adapter session.
CREATE INDEX IF NOT EXISTS step_results_adapter_session_id_idx
    ON step_results (adapter_session_id);

-- The Atlas plans table (one plan per session), left as it is where Atlas already created it.
CREATE TABLE IF NOT EXISTS plans (
    session_id INTEGER PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
    plan JSONB NOT NULL
);
