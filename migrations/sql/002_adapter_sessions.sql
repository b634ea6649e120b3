-- The adapter-session migration exactly as Atlas documents it for existing deployments, so a database
-- that already ran it by hand is unchanged. Nullable, no default: existing rows keep NULL, nothing rewritten.

ALTER TABLE sessions
    ADD COLUMN IF NOT EXISTS adapter_session_id TEXT,
    ADD COLUMN IF NOT EXISTS adapter_usage JSONB,
    ADD COLUMN IF NOT EXISTS adapter_events JSONB;

ALTER TABLE step_results
    ADD COLUMN IF NOT EXISTS adapter_session_id TEXT,
    ADD COLUMN IF NOT EXISTS adapter_usage JSONB,
    ADD COLUMN IF NOT EXISTS adapter_events JSONB;
