-- A13's vocabulary: `failed` is a job that failed permanently (its handler said another
-- attempt would fail the same way), `dead` one out of attempts, `retrying` one whose last
-- attempt failed and that runs again (apalis' `Failed`). The outcome `failed` is new.
-- NOT VALID: no scan of the job table under this statement's exclusive lock; the next
-- migration validates it (the old constraint's values are a subset, so it holds).
ALTER TABLE apalis.jobs DROP CONSTRAINT IF EXISTS jobs_outcome_check;
ALTER TABLE apalis.jobs ADD CONSTRAINT jobs_outcome_check
    CHECK (outcome IS NULL OR outcome IN ('succeeded', 'failed', 'dead', 'expired', 'cancelled', 'interrupted')) NOT VALID;
