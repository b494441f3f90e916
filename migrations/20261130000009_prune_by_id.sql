-- no-transaction
-- The pruner walks finished jobs in id order (ids are ULIDs: creation time first) instead
-- of an index on done_at. Every ack added an entry to that index (acks are not HOT
-- updates); without it, claim and ack cost PostgreSQL about 10 % less (bench/queue
-- --designs 1, `current` before and after). A job finishes after it is created, so every
-- job finished before the retention cutoff has an id below the cutoff's ULID: the pruner
-- reads that key range (jobs/src/maintenance/pruner.rs).
-- CONCURRENTLY (hence no transaction): a plain DROP INDEX waits for an exclusive lock on
-- the job table, and claims and acks would queue behind it until it is granted.
DROP INDEX CONCURRENTLY IF EXISTS apalis.jobs_finished_idx;
