-- When a session became complete in Postgres (every step and its close stored, and its JSONL line assigned):
-- the "stored" end of submit-to-stored latency. NULL for sessions not (yet) complete and for legacy rows.
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS stored_at TIMESTAMPTZ;
