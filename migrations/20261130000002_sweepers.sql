-- Issue 11: the cron scheduler and the sweepers (SPEC §5).

-- One row per (sweeper, tick) fired. Whichever scheduler replica inserts it first enqueues
-- the sweep job in the same transaction; the others find the row and do nothing. Kept far
-- longer than jobs (a job's own idempotency key leaves with the job when retention prunes
-- it, and must not let a late replica fire an old tick again); the scheduler prunes it.
CREATE TABLE IF NOT EXISTS scheduler_ticks (
    sweeper  text NOT NULL,
    tick     timestamptz NOT NULL,
    job_id   text,
    fired_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sweeper, tick)
);
CREATE INDEX IF NOT EXISTS scheduler_ticks_fired_idx ON scheduler_ticks (fired_at);

-- S5: when a workspace last did what someone asked of it (an A2A message to or from it, an
-- exec). It is idle when this — or, if it never did anything, its entry into `online` —
-- is older than the idle time.
ALTER TABLE workspaces ADD COLUMN IF NOT EXISTS last_active_at timestamptz;
CREATE INDEX IF NOT EXISTS workspaces_online_idx ON workspaces (status_changed_at) WHERE status = 'online';

-- S7 prunes each table by age, oldest first, in batches.
CREATE INDEX IF NOT EXISTS activity_logs_created_idx ON activity_logs (created_at);
CREATE INDEX IF NOT EXISTS structure_events_created_idx ON structure_events (created_at);
CREATE INDEX IF NOT EXISTS rescue_bundles_captured_idx ON rescue_bundles (captured_at);
CREATE INDEX IF NOT EXISTS a2a_queue_finished_idx ON a2a_queue (updated_at)
    WHERE status IN ('completed', 'failed', 'expired');

