-- A CREATE INDEX CONCURRENTLY that fails (cancelled, its process killed) leaves an
-- INVALID index behind, which …_claimable_idx.sql's IF NOT EXISTS then takes for done;
-- …_drop_status_claim_idx.sql would next drop the claim index the claims still use. So an
-- invalid jobs_claimable_idx is rebuilt here, plainly (writes to the job table wait for
-- the build: a repair, not the usual path).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index WHERE indexrelid = to_regclass('apalis.jobs_claimable_idx') AND NOT indisvalid)
       OR to_regclass('apalis.jobs_claimable_idx') IS NULL THEN
        DROP INDEX IF EXISTS apalis.jobs_claimable_idx;
        CREATE INDEX jobs_claimable_idx ON apalis.jobs (job_type, priority DESC, run_at, id) WHERE lock_at IS NULL;
    END IF;
END $$;
