-- The planner's picture of step_results as it grows. ANALYZE estimates the number of distinct session_id
-- (and adapter_session_id) values from a 30,000-row sample of whole pages; the steps of a session lie
-- together on a page, so the sample holds every sampled session with all its rows, which the estimator
-- reads as few distinct values: its estimate stays near 100,000 however many sessions there are, and
-- PostgreSQL expected 112 steps a session at 10 M rows, 277 at 25 M (there are 5.8; bench/bigtable.py).
-- Every "count the steps of this session" in the ingestor's sweeps, export, prune, the audit and the
-- console was costed that many times too high, which pushed plans towards sorting whole ranges and
-- statements past jit_above_cost. A fixed ratio instead: a negative n_distinct is distinct values per
-- row, -0.15 about 6.7 steps a session (the estimate became 7). Off by a constant factor for sessions with
-- many more steps, never by one that grows with the table. A catalog change (SHARE UPDATE EXCLUSIVE lock:
-- reads and writes go on), used from the next ANALYZE, which runs here (a 30,000-row sample: seconds).
ALTER TABLE step_results ALTER COLUMN session_id SET (n_distinct = -0.15);
ALTER TABLE step_results ALTER COLUMN adapter_session_id SET (n_distinct = -0.15);
ANALYZE step_results;
