-- Issue 12: a failed attempt's detail (engine or SDK text, image references, hosts) is for
-- operators only; `last_error` keeps the code and canned sentence tenants read.
ALTER TABLE apalis.jobs ADD COLUMN IF NOT EXISTS last_error_detail text;

-- Jobs that failed before this: their raw error text moves to the operators' column, and
-- tenants read a canned sentence; no attempt entry keeps the worker (host and pid) it ran on.
UPDATE apalis.jobs
SET last_error_detail = last_error,
    last_error = 'job_failed: The job failed; the platform''s log has the details.'
WHERE last_error IS NOT NULL AND last_error_detail IS NULL;
UPDATE apalis.jobs
SET attempt_log = (
    SELECT jsonb_agg((e - 'worker') || jsonb_build_object('error', 'job_failed: The job failed; the platform''s log has the details.'))
    FROM jsonb_array_elements(attempt_log) e)
WHERE jsonb_typeof(attempt_log) = 'array' AND jsonb_array_length(attempt_log) > 0
  AND EXISTS (SELECT 1 FROM jsonb_array_elements(attempt_log) e WHERE e ? 'worker' OR NOT (e ->> 'error' ~ '^[a-z_]+: '));
