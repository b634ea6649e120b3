-- The worker's task ledger: where task_id idempotency is enforced.
-- A worker claims a task here before running it (attempts + 1) and records success, with the encoded
-- session.closed telemetry of the successful session, BEFORE publishing that close and acking the task.
-- A redelivered or resubmitted task whose id already succeeded is acked without running again, and its
-- stored close is re-published (the ingestor drops the duplicate), so a worker killed between the ledger
-- write and the ack loses nothing and runs nothing twice.
CREATE TABLE IF NOT EXISTS task_ledger (
    task_id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('running', 'retrying', 'succeeded', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 1 CHECK (attempts >= 1),
    adapter_session_id TEXT,
    close_message BYTEA,
    worker_id TEXT,
    last_error TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS task_ledger_state_idx ON task_ledger (state);
