-- Accountability: every task the ledger calls succeeded is stored and exported, or there is a reason.
--
-- task_ledger.claim_token: the claim that holds the row. A worker whose claim commit reply was lost asks
-- again with the same token and recognises its own claim; succeed/settle only change a row their token
-- still holds; a running row's updated_at is its holder's heartbeat (see worker/_ledger.py).
ALTER TABLE task_ledger ADD COLUMN IF NOT EXISTS claim_token TEXT;

-- What the ingestor could not store, and sessions it flagged as incomplete, with the reason: what
-- `python -m producer audit` explains a missing session with. One row per (session, seq, problem);
-- seq is NULL for a flag about the whole session. Rows are only ever added (and counted again).
--   problem   rejected (refused by PostgreSQL or not storable), inconsistent (task_id / seq / kind do not
--             fit the session), invalid (failed the wire contract), never_opened, missing_steps
CREATE TABLE IF NOT EXISTS telemetry_problems (
    id BIGSERIAL PRIMARY KEY,
    adapter_session_id TEXT NOT NULL DEFAULT '',
    task_id TEXT,
    seq INTEGER NOT NULL DEFAULT -1,
    kind TEXT,
    problem TEXT NOT NULL,
    reason TEXT NOT NULL,
    occurrences INTEGER NOT NULL DEFAULT 1,
    first_seen TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (adapter_session_id, seq, problem)
);

CREATE INDEX IF NOT EXISTS telemetry_problems_task_idx ON telemetry_problems (task_id);

-- The audit walks succeeded tasks by their session.
CREATE INDEX IF NOT EXISTS task_ledger_session_idx ON task_ledger (adapter_session_id)
    WHERE adapter_session_id IS NOT NULL;

-- The accountability figure counts recently succeeded tasks (succeeded rows are never updated again, so
-- this partial index costs one insert per task and nothing per heartbeat).
CREATE INDEX IF NOT EXISTS task_ledger_succeeded_idx ON task_ledger (updated_at) WHERE state = 'succeeded';

-- The sweep that flags sessions whose opened never came (stubs are few: this index stays small).
CREATE INDEX IF NOT EXISTS sessions_stub_idx ON sessions (created_at)
    WHERE attempt IS NULL AND task_id IS NOT NULL;
