-- Validates 20261202000002's constraint in a transaction of its own: the scan takes a
-- SHARE UPDATE EXCLUSIVE lock, so the job table's reads and writes go on meanwhile.
ALTER TABLE apalis.jobs VALIDATE CONSTRAINT jobs_outcome_check;
