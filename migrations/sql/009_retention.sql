-- Retention: `python -m ingestor prune --before T` deletes complete sessions that completed before T and
-- whose JSONL line is in a final file (their step_results and plan go with them, ON DELETE CASCADE). This
-- one-row table keeps the newest T a prune used, written before it deletes anything: `producer audit` and
-- `status` count a succeeded task whose ledger row is older than it and whose session is gone as pruned
-- after export, not as lost. A new table: nothing existing is touched.
CREATE TABLE IF NOT EXISTS retention (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    pruned_before TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
