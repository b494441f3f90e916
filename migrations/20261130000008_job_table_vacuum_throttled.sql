-- Vacuum of the job table throttled again (the default cost delay), keeping the early
-- start of …_job_table_autovacuum.sql. Unthrottled, a vacuum that starts during a 1M-job
-- drain takes one of this machine's two cores from it: 33,775 jobs/s and a pickup p99 of
-- 31 ms (from before the enqueue call) behind it, against 39,583 jobs/s and 2.5 ms with
-- no vacuum at all and 40,961 jobs/s and 5.2 ms throttled (bench/queue, 2026-11-30).
-- The dead versions still go, at the default pace, a little later.
ALTER TABLE apalis.jobs RESET (autovacuum_vacuum_cost_delay);
