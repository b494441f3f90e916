-- EC2 backend (issue 13).

-- SSH host keys pinned on first use, one per instance: every later connection to the
-- instance must present the same key. EC2 never reuses an instance id.
CREATE TABLE ssh_host_keys (
    instance_id text PRIMARY KEY,
    host_key    text NOT NULL,
    pinned_at   timestamptz NOT NULL DEFAULT now()
);

-- The latest serial console output of a workspace's instance (A8): decoded, redacted,
-- bounded; refreshed by a `console` job, read by GET /workspaces/{id}/console.
CREATE TABLE workspace_consoles (
    workspace_id uuid PRIMARY KEY REFERENCES workspaces (id) ON DELETE CASCADE,
    instance_id  text NOT NULL,
    output       text NOT NULL,
    truncated    boolean NOT NULL,
    fetched_at   timestamptz NOT NULL DEFAULT now()
);
