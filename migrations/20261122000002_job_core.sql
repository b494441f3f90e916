-- Job core on top of apalis-postgres' table (apalis.jobs, applied by its own migrator first).
-- apalis' status vocabulary is kept (Pending, Queued, Running, Done, Failed, Killed) so its
-- tools still read our rows; the columns below carry what it lacks: who owns a job, its
-- expiry, how a terminal job ended, and the history of its attempts.
--   Failed  = the last attempt failed and the job WILL run again at run_at (backoff moved it);
--   Killed  = terminal without success; `outcome` says dead | expired | cancelled.

ALTER TABLE apalis.jobs ADD COLUMN IF NOT EXISTS org_id       uuid;
ALTER TABLE apalis.jobs ADD COLUMN IF NOT EXISTS workspace_id uuid;
ALTER TABLE apalis.jobs ADD COLUMN IF NOT EXISTS expires_at   timestamptz;
ALTER TABLE apalis.jobs ADD COLUMN IF NOT EXISTS started_at   timestamptz;
ALTER TABLE apalis.jobs ADD COLUMN IF NOT EXISTS created_at   timestamptz NOT NULL DEFAULT now();
ALTER TABLE apalis.jobs ADD COLUMN IF NOT EXISTS last_error   text;
ALTER TABLE apalis.jobs ADD COLUMN IF NOT EXISTS outcome      text;
ALTER TABLE apalis.jobs ADD COLUMN IF NOT EXISTS attempt_log  jsonb NOT NULL DEFAULT '[]'::jsonb;

DO $$ BEGIN
    ALTER TABLE apalis.jobs ADD CONSTRAINT jobs_outcome_check
        CHECK (outcome IS NULL OR outcome IN ('succeeded', 'dead', 'expired', 'cancelled'));
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

-- Every index on apalis.jobs costs an entry per job per state change (status is indexed,
-- so no update is HOT). Keep only what a path reads; apalis' schema leaves duplicates
-- and indexes for its own fetcher, which we do not run:
--   unique_job_id           duplicates the primary key
--   lidx, idx_apalis_jobs_lock_by   full indexes on lock_by (we read it only for running jobs)
--   idx_apalis_jobs_fetch_partial   apalis' fetch order; our claim has its own index
--   idx_jobs_idempotency_key        replaced by a partial unique index (same uniqueness:
--                                   NULL keys never conflict)
-- The lock_by foreign key is dropped too: it costs a lookup and a row lock on
-- apalis.workers for every claimed job, and orphan recovery treats a missing worker row
-- as a dead worker.
DROP INDEX IF EXISTS apalis.unique_job_id;
DROP INDEX IF EXISTS apalis.lidx;
DROP INDEX IF EXISTS apalis.idx_apalis_jobs_lock_by;
DROP INDEX IF EXISTS apalis.idx_apalis_jobs_fetch_partial;
ALTER TABLE apalis.jobs DROP CONSTRAINT IF EXISTS fk_worker_lock_by;
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency_key_idx
    ON apalis.jobs (job_type, idempotency_key) WHERE idempotency_key IS NOT NULL;
DROP INDEX IF EXISTS apalis.idx_jobs_idempotency_key;

-- The claim path: available jobs of one queue in (priority, run_at, id) order. Ordering by
-- run_at over this partial index stays flat on a deep queue (NOTES: ordering by id alone
-- went quadratic once the table was analysed).
CREATE INDEX IF NOT EXISTS jobs_claim_idx
    ON apalis.jobs (job_type, priority DESC, run_at, id)
    WHERE status IN ('Pending', 'Failed');

-- Orphan recovery and release: running jobs by the worker that holds them.
CREATE INDEX IF NOT EXISTS jobs_running_idx
    ON apalis.jobs (lock_by) WHERE status IN ('Queued', 'Running');

-- Retention pruning of finished jobs, oldest first.
CREATE INDEX IF NOT EXISTS jobs_finished_idx
    ON apalis.jobs (done_at) WHERE status IN ('Done', 'Killed');

-- Client reads (A13): one org's jobs, optionally of one workspace, newest first (ids are
-- ULIDs, so id order is creation order); also serves "a pending restart of this workspace".
CREATE INDEX IF NOT EXISTS jobs_org_idx ON apalis.jobs (org_id, id DESC)
    WHERE org_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_workspace_idx ON apalis.jobs (workspace_id, job_type, id DESC)
    WHERE workspace_id IS NOT NULL;

-- apalis' insert trigger only announces jobs that are due now. Announce future-dated ones
-- too, so an idle pool re-reads its next due time and sleeps until exactly then.
CREATE OR REPLACE FUNCTION apalis.molecule_notify_scheduled() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('apalis::job::insert',
        json_build_object('job_type', NEW.job_type, 'id', NEW.id, 'run_at', NEW.run_at)::text);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS molecule_notify_scheduled ON apalis.jobs;
CREATE TRIGGER molecule_notify_scheduled
    AFTER INSERT ON apalis.jobs
    FOR EACH ROW WHEN (NEW.run_at > now())
    EXECUTE FUNCTION apalis.molecule_notify_scheduled();
