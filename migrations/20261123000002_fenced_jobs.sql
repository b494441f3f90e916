-- Issue 9: fenced attempts, interrupted jobs, audited execs, streaming wake-ups.

-- fence: bumped by every claim and returned to the claimant; every ack matches it, so an
-- ack from an earlier claim (a worker whose lease lapsed and whose job was handed out
-- again — possibly to the same worker) can never finalize a newer attempt. Unlike
-- `attempts` it never goes back (a release un-counts the attempt, not the fence).
ALTER TABLE apalis.jobs ADD COLUMN IF NOT EXISTS fence bigint NOT NULL DEFAULT 0;

-- interrupted: a job of a kind that must not run twice (exec) that was running when its
-- worker stopped — at the end of the shutdown grace period, or with the worker lost.
-- Terminal: never run again automatically (POST /jobs/:id/retry can).
ALTER TABLE apalis.jobs DROP CONSTRAINT IF EXISTS jobs_outcome_check;
ALTER TABLE apalis.jobs ADD CONSTRAINT jobs_outcome_check
    CHECK (outcome IS NULL OR outcome IN ('succeeded', 'dead', 'expired', 'cancelled', 'interrupted'));

-- One audit row per run of an exec, written before the command starts (outcome
-- 'started') and completed after it: a command that ran always has its row, even when
-- its worker was killed.
ALTER TABLE audit_events ADD COLUMN IF NOT EXISTS job_id text;
ALTER TABLE audit_events ADD COLUMN IF NOT EXISTS attempt integer;
ALTER TABLE audit_events ADD COLUMN IF NOT EXISTS outcome text;
ALTER TABLE audit_events ADD COLUMN IF NOT EXISTS finished_at timestamptz;
CREATE UNIQUE INDEX IF NOT EXISTS audit_events_run_idx ON audit_events (job_id, attempt) WHERE job_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS audit_events_created_idx ON audit_events (created_at);
