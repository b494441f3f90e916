-- no-transaction
-- Running jobs by worker are found through apalis.claims now (…_claims.sql).
DROP INDEX CONCURRENTLY IF EXISTS apalis.jobs_running_idx;
