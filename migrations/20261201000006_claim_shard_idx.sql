-- no-transaction
-- The claim path in shards: a queue's waiting jobs in (priority, run_at, id) order within
-- each of two shards, a job's shard being a hash of its id. A pool runs one claim per
-- shard at a time (jobs/src/store/claim.rs: CLAIM_SHARDS), on disjoint ranges of this
-- index. Built CONCURRENTLY before jobs_claimable_idx goes (…_claim_shard_idx_valid.sql
-- checks it was built, as …_claimable_idx_valid.sql does for that one).
CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_claim_shard_idx
    ON apalis.jobs (job_type, (hashtext(id) & 1), priority DESC, run_at, id) WHERE lock_at IS NULL;
