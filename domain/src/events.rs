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

/// An event to record with others in one statement ([`record_many`]).
pub struct NewEvent {
    pub org: OrgId,
    pub workspace: Uuid,
    pub event_type: &'static str,
    pub payload: serde_json::Value,
}

/// Records `events` in one statement, in order.
pub async fn record_many(conn: &mut PgConnection, events: &[NewEvent]) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO structure_events (org_id, workspace_id, event_type, payload) \
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[])",
    )
    .bind(events.iter().map(|e| e.org.0).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.workspace).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.event_type).collect::<Vec<_>>())
    .bind(events.iter().map(|e| &e.payload).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// S7: events older than `older_than`, in batches; returns how many.
pub async fn prune(db: &sqlx::PgPool, older_than: std::time::Duration, batch: i64) -> Result<u64, sqlx::Error> {
    crate::db::delete_in_batches(
        db,
        "DELETE FROM structure_events WHERE id IN \
         (SELECT id FROM structure_events WHERE created_at < now() - make_interval(secs => $1) ORDER BY created_at LIMIT $2)",
        older_than,
        batch,
    )
    .await
}
