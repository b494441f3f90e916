//! J3 restart: stop, then provision again on the same backend, one restart at a time per
//! workspace. New secrets are minted (the old token stops working); the workspace is
//! `provisioning` until its agent registers again.

use molecule_domain::{WorkspaceId, WorkspaceStatus};
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::{JobContext, JobError};
use serde_json::json;

use crate::provision::{db_err, load};
use crate::Deps;

pub async fn run(d: &Deps, ctx: &JobContext, ws: WorkspaceId) -> HandlerResult {
    // Session-level advisory lock, held on one connection for the whole restart.
    let mut lock = d.db.acquire().await.map_err(db_err)?;
    let key = format!("molecule.restart.{ws}");
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
        .bind(&key)
        .fetch_one(&mut *lock)
        .await
        .map_err(db_err)?;
    if !got {
        return Err(JobError::Retryable("another restart of this workspace is running".into()));
    }
    let res = restart(d, ctx, ws).await;
    let _ = sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))").bind(&key).execute(&mut *lock).await;
    res
}

async fn restart(d: &Deps, ctx: &JobContext, ws: WorkspaceId) -> HandlerResult {
    let Some(row) = load(d, ws).await? else {
        return Ok(json!({ "skipped": "workspace does not exist" }));
    };
    if matches!(row.status, WorkspaceStatus::Removed) {
        return Ok(json!({ "skipped": "workspace is removed" }));
    }
    tracing::info!(event = "restart.pre_stop", workspace_id = %ws, org_id = %row.org, job_id = %ctx.id);
    d.backend.stop(ws).await.map_err(|e| match e {
        molecule_backends::BackendError::NoBackend => JobError::NoBackend,
        other => JobError::Retryable(other.to_string()),
    })?;
    sqlx::query("UPDATE workspaces SET status = 'provisioning', updated_at = now() WHERE id = $1 AND status <> 'removed'")
        .bind(ws.0)
        .execute(&d.db)
        .await
        .map_err(db_err)?;
    let row = match load(d, ws).await? {
        Some(r) if r.status == WorkspaceStatus::Provisioning => r,
        _ => return Ok(json!({ "skipped": "workspace removed during restart" })),
    };
    crate::provision::start(d, ctx, ws, &row).await
}
