-- Issue 10: the A2A relay (A9–A12b, J5a, J6, S6).

-- The A2A generation a workspace's agent speaks. NULL: not known yet — the dispatcher
-- reads the agent's card on its first delivery and records what it found here.
-- a2a_version_source says where the value came from: the registration's explicit
-- `a2a_version` (it wins), the card sent with the registration or read by the dispatcher,
-- or the default (0.3) when no card could be read.
DO $$ BEGIN
    CREATE TYPE a2a_version AS ENUM ('0.3', '1.0');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
ALTER TABLE workspaces ADD COLUMN IF NOT EXISTS a2a_version a2a_version;
ALTER TABLE workspaces ADD COLUMN IF NOT EXISTS a2a_version_source text
    CHECK (a2a_version_source IN ('registration', 'card', 'default'));

-- The queue row of a push delivery.
--   caller_generation: what the caller sent (0.2, 0.3, 1.0); the agent's reply is rendered
--                      back in it (0.2 callers get 0.3 replies).
--   agent_version:     the generation the message was delivered in.
--   job_id:            its a2a_dispatch job.
--   response_status:   the agent's HTTP status; restarting/retry_after_secs: the agent was
--                      found dead behind a 5xx and a restart was queued (J6).
ALTER TABLE a2a_queue ADD COLUMN IF NOT EXISTS caller_generation text NOT NULL DEFAULT '0.3'
    CHECK (caller_generation IN ('0.2', '0.3', '1.0'));
ALTER TABLE a2a_queue ADD COLUMN IF NOT EXISTS agent_version a2a_version;
ALTER TABLE a2a_queue ADD COLUMN IF NOT EXISTS job_id text;
ALTER TABLE a2a_queue ADD COLUMN IF NOT EXISTS response_status integer;
ALTER TABLE a2a_queue ADD COLUMN IF NOT EXISTS restarting boolean NOT NULL DEFAULT false;
ALTER TABLE a2a_queue ADD COLUMN IF NOT EXISTS retry_after_secs integer;
ALTER TABLE a2a_queue ADD COLUMN IF NOT EXISTS dispatched_at timestamptz;
ALTER TABLE a2a_queue ADD COLUMN IF NOT EXISTS completed_at timestamptz;

-- An idempotency key is the caller's: two callers that happen to pick the same key for the
-- same target get two messages (and neither learns of the other's queue_id). Org-token
-- callers (no caller workspace) share one scope per target.
ALTER TABLE a2a_queue DROP CONSTRAINT IF EXISTS a2a_queue_workspace_id_idempotency_key_key;
CREATE UNIQUE INDEX IF NOT EXISTS a2a_queue_idempotency_idx
    ON a2a_queue (workspace_id, COALESCE(caller_id, '00000000-0000-0000-0000-000000000000'::uuid), idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- A delivery's activity rows point at their queue row.
ALTER TABLE activity_logs ADD COLUMN IF NOT EXISTS queue_id uuid;

-- A poll-mode inbox honours the sender's idempotency key (one row per key, per sender
-- and inbox) and TTL (a message past expires_at is no longer listed).
ALTER TABLE activity_logs ADD COLUMN IF NOT EXISTS idempotency_key text;
ALTER TABLE activity_logs ADD COLUMN IF NOT EXISTS expires_at timestamptz;
CREATE UNIQUE INDEX IF NOT EXISTS activity_logs_idempotency_idx
    ON activity_logs (workspace_id, COALESCE(source_id, ''), idempotency_key)
    WHERE idempotency_key IS NOT NULL;
