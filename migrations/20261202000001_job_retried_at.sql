-- When a job was last retried by hand (POST /jobs/{id}/retry). A job that waits its turn
-- (the restart lock, workers/src/restart.rs) may wait TURN_WAIT from its enqueue or from
-- this, whichever is later: a dead restart retried by hand while the lock is still held
-- waits again instead of failing at once. Nullable without a default: no table rewrite.
ALTER TABLE apalis.jobs ADD COLUMN IF NOT EXISTS retried_at timestamptz;
