-- The job table churns: every job is inserted, updated at its claim and at its ack (two
-- dead row versions each, never HOT: `status` is in the partial indexes' predicates),
-- then deleted by retention. The defaults (vacuum at 20 % dead) let a 1M-job drain leave
-- 2M dead versions before autovacuum starts, and every claim walks past them. Vacuum
-- after 2 % (and at least 10k) dead rows, without sleeping between pages; analyse as
-- often, so the planner's view of the queue follows it.
ALTER TABLE apalis.jobs SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);
