//! J2 stop (reason delete | restart | hibernate). The config volume is removed only after
//! a successful stop of a deleted workspace (a failed stop leaves it for the orphan
//! sweeper; hibernation and restart keep it).

use molecule_domain::WorkspaceId;
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::{JobContext, JobError};
use serde_json::json;

use crate::provision::db_err;
use crate::Deps;

pub async fn run(d: &Deps, ctx: &JobContext, ws: WorkspaceId, reason: Option<&str>) -> HandlerResult {
    let reason = reason.unwrap_or("delete");
    if !matches!(reason, "delete" | "restart" | "hibernate") {
        return Err(JobError::Permanent(format!("unknown stop reason {reason:?}")));
    }
    d.backend.stop(ws).await.map_err(|e| match e {
        molecule_backends::BackendError::NoBackend => JobError::NoBackend,
        other => JobError::Retryable(other.to_string()),
    })?;
    let mut volume_removed = false;
    if reason == "delete" {
        d.backend.remove_volume(ws).await.map_err(|e| JobError::Retryable(e.to_string()))?;
        volume_removed = true;
    }
    let status = if reason == "hibernate" { "hibernated" } else { "removed" };
    if reason != "restart" {
        sqlx::query("UPDATE workspaces SET status = $2::workspace_status, updated_at = now() WHERE id = $1")
            .bind(ws.0)
            .bind(status)
            .execute(&d.db)
            .await
            .map_err(db_err)?;
    }
    tracing::info!(event = "stop.done", workspace_id = %ws, job_id = %ctx.id, reason, volume_removed);
    Ok(json!({ "stopped": true, "volume_removed": volume_removed }))
}
