//! The console cache (A8, table `workspace_consoles`): the latest serial console output
//! of a workspace's instance, written by the `console` job (decoded, redacted, bounded),
//! read by `GET /workspaces/{id}/console`.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use crate::{OrgId, WorkspaceId};

/// Most bytes of console output kept: the end, where a failed boot says why.
pub const MAX_BYTES: usize = 64 * 1024;

/// A copy younger than this is served as is; an older one is refreshed.
pub const FRESH_FOR: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Console {
    pub instance_id: String,
    pub output: String,
    pub truncated: bool,
    pub fetched_at: DateTime<Utc>,
}

/// Bounds and redacts raw console bytes: redacted first, then the tail kept (X4: a
/// secret is never cut into a piece the redactor would not recognise).
pub fn prepare(raw: &[u8]) -> (String, bool) {
    let text = String::from_utf8_lossy(raw).replace('\0', "\u{FFFD}");
    let redacted = crate::redact::global().redact(&text);
    let kept = crate::text::tail(&redacted, MAX_BYTES);
    (kept.to_string(), kept.len() < redacted.len())
}

pub async fn store(db: impl PgExecutor<'_>, ws: WorkspaceId, instance_id: &str, output: &str, truncated: bool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO workspace_consoles (workspace_id, instance_id, output, truncated, fetched_at) \
         VALUES ($1, $2, $3, $4, now()) \
         ON CONFLICT (workspace_id) DO UPDATE SET instance_id = $2, output = $3, truncated = $4, fetched_at = now()",
    )
    .bind(ws.0)
    .bind(instance_id)
    .bind(output)
    .bind(truncated)
    .execute(db)
    .await?;
    Ok(())
}

/// The cached copy of the workspace's current instance (a copy of an earlier instance is
/// not its console), within the organization.
pub async fn latest(db: impl PgExecutor<'_>, ws: WorkspaceId, org: OrgId) -> Result<Option<Console>, sqlx::Error> {
    sqlx::query_as(
        "SELECT c.instance_id, c.output, c.truncated, c.fetched_at FROM workspace_consoles c \
         JOIN workspaces w ON w.id = c.workspace_id AND w.instance_id = c.instance_id \
         WHERE c.workspace_id = $1 AND w.org_id = $2",
    )
    .bind(ws.0)
    .bind(org.0)
    .fetch_optional(db)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_text_is_redacted_then_bounded_to_its_end() {
        let mut raw = b"boot: AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n".to_vec();
        raw.extend(std::iter::repeat_n(b'.', MAX_BYTES));
        raw.extend_from_slice(b"\ncloud-init: FAILED token=sk-live-abcdefghijklmnopqrstuvwx\n");
        let (out, truncated) = prepare(&raw);
        assert!(truncated);
        assert!(out.len() <= MAX_BYTES);
        assert!(out.ends_with('\n') && out.contains("cloud-init: FAILED"), "the end is kept");
        assert!(!out.contains("sk-live-abcdefghijklmnopqrstuvwx"), "{}", &out[out.len() - 80..]);
        let (short, cut) = prepare(b"ok\0done");
        assert_eq!((short.as_str(), cut), ("ok\u{FFFD}done", false));
    }
}
