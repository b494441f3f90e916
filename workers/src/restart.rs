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
    match one_at_a_time(&d.db, ws, restart(d, ctx, ws)).await? {
        Some(res) => res,
        None => Err(JobError::Retryable("another restart of this workspace is running".into())),
    }
}

/// Runs `work` holding the workspace's restart lock, or answers None when another
/// restart holds it. The lock is transaction-scoped, on a transaction kept open for the
/// duration: it ends with the transaction whatever happens — return, error, panic or an
/// aborted task (the connection rolls back before it is reused) — so it cannot leak the
/// way a session lock on a pooled connection did.
pub async fn one_at_a_time<T>(db: &sqlx::PgPool, ws: WorkspaceId, work: impl std::future::Future<Output = T>) -> Result<Option<T>, JobError> {
    let mut tx = db.begin().await.map_err(db_err)?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("molecule.restart.{ws}"))
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err)?;
    if !got {
        return Ok(None);
    }
    let out = work.await;
    let _ = tx.rollback().await;
    Ok(Some(out))
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
