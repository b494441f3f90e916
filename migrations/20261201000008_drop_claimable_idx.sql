-- no-transaction
-- Replaced by jobs_claim_shard_idx (…_claim_shard_idx.sql): one index entry per waiting job,
-- not two. CONCURRENTLY: a plain DROP INDEX waits for an exclusive lock on the job table,
-- and claims and acks would queue behind it. A process of the version before (claims
-- without the shard) still claims correctly during a rolling upgrade, by the new index's
-- leading column and a sort of the queue's waiting jobs: slower with a deep backlog.
DROP INDEX CONCURRENTLY IF EXISTS apalis.jobs_claimable_idx;
