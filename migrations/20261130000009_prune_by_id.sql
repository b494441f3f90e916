-- The pruner walks finished jobs in id order (ids are ULIDs: creation time first) instead
-- of an index on done_at. Every ack added an entry to that index (acks are not HOT
-- updates): with it, claim and ack cost PostgreSQL 18.9 µs per job, 14.7 without it and
-- the running index (bench/queue --designs 1: our_indexes against apalis_row). A job
-- finishes after it is created, so every job finished before the retention cutoff has an
-- id below the cutoff's ULID: the pruner reads that key range (jobs/src/maintenance/pruner.rs).
DROP INDEX IF EXISTS apalis.jobs_finished_idx;
