-- Issue 15: a success ack that touches no indexed column (a HOT update), so the ack of a
-- job costs a new row version on its page and no index entries.
--
-- Before, `status` was in two indexes' predicates (the claim index: waiting jobs; the
-- running index: running jobs by worker), so every ack wrote a new version of the whole
-- row elsewhere plus an entry in the primary key and each index it matched. Now:
--   * the claim index's predicate is `lock_at IS NULL` (…_claimable_idx.sql): the claim sets
--     lock_at, a finishing ack keeps it, a retry or a hand-back clears it;
--   * the running index goes (…_drop_running_idx.sql). What the lease rescuer, the pruner
--     and the operators' view read instead: one row per claimed batch, below, naming the
--     worker and the batch's jobs, written by the claim statement itself and deleted with
--     the ack of the batch's last job (jobs/src/runtime/acker.rs).
--   * fillfactor 50 leaves each page the room for its rows' acks (72 % of acks were HOT
--     in bench/queue's `hot_ack` design at 50; few are at 100, where the pages a bulk
--     enqueue or a claim fills are full).
-- bench/queue --designs 1: PostgreSQL's time per job 11–16 % lower (2026-11-30).
CREATE TABLE IF NOT EXISTS apalis.claims (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    worker_id  text NOT NULL,
    ids        text[] NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS claims_worker_idx ON apalis.claims (worker_id);
-- A batch's ids (27 bytes each, up to a pool's batch of them) go out of line (TOAST)
-- past ~2 kB anyway; stored uncompressed: pglz compressing every batch row was ~0.5 %
-- of PostgreSQL's time in a drain (perf, call graph from the claim), and the row lives
-- for one batch.
ALTER TABLE apalis.claims ALTER COLUMN ids SET STORAGE EXTERNAL;
ALTER TABLE apalis.jobs SET (fillfactor = 50);
-- A job that ended without ever being claimed (cancelled while waiting) has no lock_at:
-- it would stay in the new claim index (the claim filters on status too, so it would
-- only be stepped over). Cancels now set it; these are the ones from before.
UPDATE apalis.jobs SET lock_at = COALESCE(done_at, now())
WHERE lock_at IS NULL AND status NOT IN ('Pending', 'Failed');
