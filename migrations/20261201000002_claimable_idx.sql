-- no-transaction
-- The claim path (…_claims.sql says why the predicate is lock_at): waiting jobs of one
-- queue in (priority, run_at, id) order. Built CONCURRENTLY before the old index goes
-- (…_drop_status_claim_idx.sql; …_claimable_idx_valid.sql checks it was built), so claims
-- never lose their index during an upgrade;
-- one statement per file: CONCURRENTLY cannot run in a transaction block.
CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_claimable_idx
    ON apalis.jobs (job_type, priority DESC, run_at, id) WHERE lock_at IS NULL;
