-- Domain tables (SPEC §2). Idempotent: every object is created only when missing.

CREATE EXTENSION IF NOT EXISTS pgcrypto;

DO $$ BEGIN
    CREATE TYPE workspace_status AS ENUM (
        'provisioning', 'online', 'degraded', 'offline', 'failed',
        'awaiting_agent', 'hibernating', 'hibernated', 'removed'
    );
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

DO $$ BEGIN
    CREATE TYPE delivery_mode AS ENUM ('push', 'poll');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

CREATE TABLE IF NOT EXISTS organizations (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS org_tokens (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id       uuid NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    token_sha256 bytea NOT NULL UNIQUE CHECK (length(token_sha256) = 32),
    label        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX IF NOT EXISTS org_tokens_org_idx ON org_tokens (org_id);

CREATE TABLE IF NOT EXISTS workspaces (
    id                      uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id                  uuid NOT NULL REFERENCES organizations(id),
    parent_id               uuid REFERENCES workspaces(id),
    name                    text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    runtime                 text NOT NULL,
    tier                    smallint NOT NULL CHECK (tier BETWEEN 1 AND 4),
    status                  workspace_status NOT NULL DEFAULT 'provisioning',
    delivery_mode           delivery_mode NOT NULL DEFAULT 'push',
    url                     text,
    instance_id             text,
    container_name          text,
    last_heartbeat_at       timestamptz,
    last_sample_error       text,
    runtime_image_digest    text,
    platform_inbound_secret text,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS workspaces_org_idx ON workspaces (org_id, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS workspaces_parent_idx ON workspaces (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS workspaces_status_idx ON workspaces (status);

CREATE TABLE IF NOT EXISTS workspace_auth_tokens (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id uuid NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    token_sha256 bytea NOT NULL UNIQUE CHECK (length(token_sha256) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX IF NOT EXISTS workspace_auth_tokens_ws_idx
    ON workspace_auth_tokens (workspace_id) WHERE revoked_at IS NULL;

CREATE TABLE IF NOT EXISTS activity_logs (
    id            bigserial PRIMARY KEY,
    workspace_id  uuid NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    org_id        uuid NOT NULL,
    type          text NOT NULL,
    source_id     text,
    method        text,
    request_body  jsonb,
    response_body jsonb,
    status        text,
    created_at    timestamptz NOT NULL DEFAULT now()
);
-- Serves `since_id` polling (rows strictly after a cursor, per workspace) and newest-first reads.
CREATE INDEX IF NOT EXISTS activity_logs_ws_id_idx ON activity_logs (workspace_id, id);

CREATE TABLE IF NOT EXISTS a2a_queue (
    queue_id        uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id          uuid NOT NULL,
    workspace_id    uuid NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    caller_id       uuid,
    method          text NOT NULL,
    body            jsonb NOT NULL,
    idempotency_key text,
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'dispatched', 'completed', 'failed', 'expired')),
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    response_body   jsonb,
    expires_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, idempotency_key)
);
CREATE INDEX IF NOT EXISTS a2a_queue_expiry_idx ON a2a_queue (expires_at) WHERE status = 'queued';

CREATE TABLE IF NOT EXISTS rescue_bundles (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id uuid NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    org_id       uuid NOT NULL,
    trigger      text NOT NULL CHECK (trigger IN ('provision_timeout', 'bootstrap_failed')),
    captured_at  timestamptz NOT NULL DEFAULT now(),
    sections     jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS rescue_bundles_latest_idx
    ON rescue_bundles (workspace_id, org_id, captured_at DESC, id DESC);

CREATE TABLE IF NOT EXISTS runtime_image_pins (
    runtime     text PRIMARY KEY,
    sha256      text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    pinned_by   text NOT NULL,
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Never holds command output: only who ran what, how it ended and how long it took.
CREATE TABLE IF NOT EXISTS audit_events (
    id           bigserial PRIMARY KEY,
    actor        text NOT NULL,
    action       text NOT NULL,
    workspace_id uuid,
    org_id       uuid,
    argv         text[],
    exit_code    integer,
    duration_ms  bigint,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS audit_events_ws_idx ON audit_events (workspace_id, created_at DESC);

-- Lifecycle events a client can read back (created, removed, restart requested, provision failed …).
CREATE TABLE IF NOT EXISTS structure_events (
    id           bigserial PRIMARY KEY,
    org_id       uuid NOT NULL,
    workspace_id uuid,
    event_type   text NOT NULL,
    payload      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS structure_events_ws_idx ON structure_events (workspace_id, id);
