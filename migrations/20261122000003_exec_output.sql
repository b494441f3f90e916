-- Exec output as the worker produces it (A5 streaming): chunks in order, already capped
-- and redacted. Readers follow a job with NOTIFY on `molecule_exec_output` (payload: the
-- job id) and read the chunks after the last sequence number they saw. Pruned with the
-- job's retention.
CREATE TABLE IF NOT EXISTS exec_output (
    job_id     text NOT NULL,
    seq        integer NOT NULL,
    stream     text NOT NULL CHECK (stream IN ('stdout', 'stderr')),
    data       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, seq)
);
CREATE INDEX IF NOT EXISTS exec_output_created_idx ON exec_output (created_at);

-- One bundle per capture job (at-least-once delivery must not store two).
ALTER TABLE rescue_bundles ADD COLUMN IF NOT EXISTS job_id text;
CREATE UNIQUE INDEX IF NOT EXISTS rescue_bundles_job_idx ON rescue_bundles (job_id) WHERE job_id IS NOT NULL;
