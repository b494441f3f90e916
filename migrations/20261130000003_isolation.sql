-- Issue 12: a failed attempt's detail (engine or SDK text, image references, hosts) is for
-- operators only; `last_error` keeps the code and canned sentence tenants read.
ALTER TABLE apalis.jobs ADD COLUMN IF NOT EXISTS last_error_detail text;
