//! Lifecycle events (`structure_events`) a client can read back: one writer for every
//! crate that records them (API routes, job handlers, verdicts).

use sqlx::PgConnection;
use uuid::Uuid;

use crate::OrgId;

pub async fn record(
    conn: &mut PgConnection,
    org: OrgId,
    workspace: Uuid,
    event_type: &str,
    payload: serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO structure_events (org_id, workspace_id, event_type, payload) VALUES ($1, $2, $3, $4)")
        .bind(org.0)
        .bind(workspace)
        .bind(event_type)
        .bind(payload)
        .execute(conn)
        .await?;
    Ok(())
}
