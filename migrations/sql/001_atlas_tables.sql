-- The Atlas runtime tables, column-compatible with the Atlas SDK's own schema (same names, types and
-- defaults, including status 'running'). IF NOT EXISTS: in an existing Atlas deployment the tables, their
-- extra columns (reward_stats, review_status, ...) and their rows are left exactly as they are.

CREATE TABLE IF NOT EXISTS sessions (
    id SERIAL PRIMARY KEY,
    task TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'running',
    metadata JSONB,
    final_answer TEXT,
    reward JSONB,
    student_learning TEXT,
    teacher_learning TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    completed_at TIMESTAMPTZ
);

CREATE TABLE IF NOT EXISTS step_results (
    session_id INTEGER REFERENCES sessions(id) ON DELETE CASCADE,
    step_id INTEGER NOT NULL,
    trace TEXT,
    output TEXT,
    evaluation JSONB,
    attempts INTEGER,
    metadata JSONB,
    PRIMARY KEY (session_id, step_id)
);

-- Early Atlas releases created these tables without the reward / learning columns and without
-- step_results.metadata, all of which the pipeline writes. Nullable and without a default, so adding them
-- only changes the catalog: no row is rewritten. A no-op where they exist.
ALTER TABLE sessions
    ADD COLUMN IF NOT EXISTS metadata JSONB,
    ADD COLUMN IF NOT EXISTS final_answer TEXT,
    ADD COLUMN IF NOT EXISTS reward JSONB,
    ADD COLUMN IF NOT EXISTS student_learning TEXT,
    ADD COLUMN IF NOT EXISTS teacher_learning TEXT,
    ADD COLUMN IF NOT EXISTS completed_at TIMESTAMPTZ;

ALTER TABLE step_results
    ADD COLUMN IF NOT EXISTS trace TEXT,
    ADD COLUMN IF NOT EXISTS output TEXT,
    ADD COLUMN IF NOT EXISTS evaluation JSONB,
    ADD COLUMN IF NOT EXISTS attempts INTEGER,
    ADD COLUMN IF NOT EXISTS metadata JSONB;
