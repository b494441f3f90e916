-- As …_claimable_idx_valid.sql for the index before it: a CREATE INDEX CONCURRENTLY that
-- failed leaves an INVALID jobs_claim_shard_idx, which IF NOT EXISTS takes for built, and
-- …_drop_claimable_idx.sql would next drop the index claims could still use. Rebuilt here,
-- plainly (writes to the job table wait for the build: a repair, not the usual path).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index WHERE indexrelid = to_regclass('apalis.jobs_claim_shard_idx') AND NOT indisvalid)
       OR to_regclass('apalis.jobs_claim_shard_idx') IS NULL THEN
        DROP INDEX IF EXISTS apalis.jobs_claim_shard_idx;
        CREATE INDEX jobs_claim_shard_idx
            ON apalis.jobs (job_type, (hashtext(id) & 1), priority DESC, run_at, id) WHERE lock_at IS NULL;
    END IF;
END $$;
