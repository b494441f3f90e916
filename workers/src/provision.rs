//! J1 provision: mint both secrets (the one shared function), resolve the image, start
//! the instance. The workspace stays `provisioning` until its agent registers (A12).
//! Out of attempts (or a definite failure) → `failed` with a canned message and a
//! `WORKSPACE_PROVISION_FAILED` event that carry no internal detail.

use molecule_backends::{image, BackendError, StartSpec};
use molecule_domain::tokens::mint_workspace_secrets;
use molecule_domain::{OrgId, WorkspaceId, WorkspaceStatus};
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::{JobContext, JobError};
use serde_json::json;
use uuid::Uuid;

use crate::Deps;

/// What a user sees of a failed provision: nothing about images, hosts or engines.
pub const CANNED_FAILURE: &str =
    "The workspace could not be started. Its diagnostics were kept for support; retry or contact your operator.";

pub(crate) struct Row {
    pub org: OrgId,
    pub parent: Option<WorkspaceId>,
    pub runtime: String,
    pub status: WorkspaceStatus,
}

pub(crate) async fn load(d: &Deps, ws: WorkspaceId) -> Result<Option<Row>, JobError> {
    let row: Option<(Uuid, Option<Uuid>, String, WorkspaceStatus)> =
        sqlx::query_as("SELECT org_id, parent_id, runtime, status FROM workspaces WHERE id = $1")
            .bind(ws.0)
            .fetch_optional(&d.db)
            .await
            .map_err(db_err)?;
    Ok(row.map(|(org, parent, runtime, status)| Row { org: OrgId(org), parent: parent.map(WorkspaceId), runtime, status }))
}

pub(crate) fn db_err(e: sqlx::Error) -> JobError {
    JobError::Retryable(format!("database: {e}"))
}

/// The runtime's image: a recorded digest pin wins unless WORKSPACE_IMAGE_LOCAL_OVERRIDE=1.
pub async fn resolve_image(d: &Deps, runtime: &str) -> Result<String, JobError> {
    let base = image::runtime_image(&d.registry, runtime);
    if d.image_local_override {
        return Ok(base);
    }
    let pin: Option<String> = sqlx::query_scalar("SELECT sha256 FROM runtime_image_pins WHERE runtime = $1")
        .bind(runtime)
        .fetch_optional(&d.db)
        .await
        .map_err(db_err)?;
    Ok(match pin {
        Some(digest) => image::pinned(&base, &digest),
        None => base,
    })
}

pub async fn run(d: &Deps, ctx: &JobContext, ws: WorkspaceId) -> HandlerResult {
    let Some(row) = load(d, ws).await? else {
        return Ok(json!({ "skipped": "workspace does not exist" }));
    };
    if row.status != WorkspaceStatus::Provisioning {
        // At-least-once delivery: a repeat after success, or a workspace removed meanwhile.
        return Ok(json!({ "skipped": format!("workspace is {}", row.status.as_str()) }));
    }
    start(d, ctx, ws, &row).await
}

/// Mints the secrets and starts the instance (shared by provision and restart).
pub(crate) async fn start(d: &Deps, ctx: &JobContext, ws: WorkspaceId, row: &Row) -> HandlerResult {
    tracing::info!(event = "provision.start", workspace_id = %ws, org_id = %row.org, job_id = %ctx.id);
    let image = resolve_image(d, &row.runtime).await?;
    let mut tx = d.db.begin().await.map_err(db_err)?;
    let secrets = mint_workspace_secrets(&mut tx, ws).await.map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    let spec = StartSpec::new(ws, row.org, row.parent, row.runtime.clone(), image, d.platform_url.clone(), secrets);
    match d.backend.start(&spec).await {
        Ok(started) => {
            sqlx::query(
                "UPDATE workspaces SET container_name = $2, runtime_image_digest = $3, updated_at = now() WHERE id = $1",
            )
            .bind(ws.0)
            .bind(&started.container_name)
            .bind(&started.image_digest)
            .execute(&d.db)
            .await
            .map_err(db_err)?;
            Ok(json!({ "container": started.container_name }))
        }
        Err(e) => {
            let last = !e.is_retryable() || ctx.attempt >= ctx.max_attempts;
            tracing::warn!(workspace_id = %ws, job_id = %ctx.id, attempt = ctx.attempt, error = %e, final_attempt = last, "provision failed");
            if last {
                mark_failed(d, ctx, ws, row.org).await?;
                Err(permanent(e))
            } else {
                Err(JobError::Retryable(e.to_string()))
            }
        }
    }
}

fn permanent(e: BackendError) -> JobError {
    match e {
        BackendError::NoBackend => JobError::NoBackend,
        other => JobError::Permanent(other.to_string()),
    }
}

/// `provisioning → failed` (only that transition), with the canned message and an event.
pub(crate) async fn mark_failed(d: &Deps, ctx: &JobContext, ws: WorkspaceId, org: OrgId) -> Result<(), JobError> {
    let mut tx = d.db.begin().await.map_err(db_err)?;
    let flipped = sqlx::query(
        "UPDATE workspaces SET status = 'failed', last_sample_error = $2, updated_at = now() \
         WHERE id = $1 AND status = 'provisioning'",
    )
    .bind(ws.0)
    .bind(CANNED_FAILURE)
    .execute(&mut *tx)
    .await
    .map_err(db_err)?
    .rows_affected();
    if flipped == 1 {
        molecule_domain::events::record(&mut tx, org, ws.0, "WORKSPACE_PROVISION_FAILED", json!({ "job_id": ctx.id.as_str() }))
            .await
            .map_err(db_err)?;
    }
    tx.commit().await.map_err(db_err)?;
    Ok(())
}
