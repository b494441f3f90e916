-- Issue 8: a first workspace that comes online, and says why when it does not.
--
-- assigned_url: the URL the platform itself gave a workspace's agent when it started the
-- container on its own engine (host networking: a loopback port). An agent that registers
-- with its workspace's token and exactly this URL is trusted without the X5 address check;
-- every other URL still goes through it.
ALTER TABLE workspaces ADD COLUMN IF NOT EXISTS assigned_url text;

-- status_changed_at: when the row entered its current status, whoever wrote it (a trigger,
-- so no writer can forget). S1 measures "provisioning for too long" from here: a restarted
-- workspace is provisioning anew, not since its creation.
ALTER TABLE workspaces ADD COLUMN IF NOT EXISTS status_changed_at timestamptz NOT NULL DEFAULT now();

CREATE OR REPLACE FUNCTION molecule_workspace_status_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        NEW.status_changed_at := now();
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS workspaces_status_changed ON workspaces;
CREATE TRIGGER workspaces_status_changed BEFORE UPDATE OF status ON workspaces
    FOR EACH ROW EXECUTE FUNCTION molecule_workspace_status_changed();

CREATE INDEX IF NOT EXISTS workspaces_provisioning_idx ON workspaces (status_changed_at) WHERE status = 'provisioning';
