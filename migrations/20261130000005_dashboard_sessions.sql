-- Dashboard sessions (issue 14): the HttpOnly cookie holds a random secret; only its
-- sha256 is stored. An org session ends with the org token it was opened with (revoked
-- or deleted); an operator session with a change of ADMIN_TOKEN: `admin_binding` is
-- sha256 over the session's secret and ADMIN_TOKEN, so it proves both and, without the
-- secret (only the cookie has it), gives nothing to guess ADMIN_TOKEN against.
CREATE TABLE dashboard_sessions (
    secret_sha256     bytea PRIMARY KEY CHECK (length(secret_sha256) = 32),
    org_id            uuid REFERENCES organizations(id) ON DELETE CASCADE,
    org_token_id      uuid REFERENCES org_tokens(id) ON DELETE CASCADE,
    admin_binding     bytea CHECK (length(admin_binding) = 32),
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL,
    -- Exactly one kind: an org's (org and token) or the operator's (binding).
    CHECK ((org_id IS NOT NULL AND org_token_id IS NOT NULL AND admin_binding IS NULL)
        OR (org_id IS NULL AND org_token_id IS NULL AND admin_binding IS NOT NULL))
);
CREATE INDEX dashboard_sessions_expires_idx ON dashboard_sessions (expires_at);
