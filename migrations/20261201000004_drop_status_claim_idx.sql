-- no-transaction
-- Replaced by jobs_claimable_idx (…_claimable_idx.sql). CONCURRENTLY: a plain DROP INDEX
-- waits for an exclusive lock on the job table, and claims and acks would queue behind it.
DROP INDEX CONCURRENTLY IF EXISTS apalis.jobs_claim_idx;
