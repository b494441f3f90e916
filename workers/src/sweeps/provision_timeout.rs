//! S1 provision timeout: a workspace `provisioning` for longer than the timeout (its agent
//! never registered, or its start never succeeded) → `failed`, with a canned sentence
//! saying so, a `WORKSPACE_PROVISION_FAILED` event and a rescue capture
//! (`provision_timeout`) — through `jobs::verdicts`, which re-checks the predicate in its
//! UPDATE, so a row that went online meanwhile is never failed and never rescued.

use molecule_domain::WorkspaceId;
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::{verdicts, JobContext, JobError};
use sqlx::PgPool;
use std::time::Duration;

use super::SweepArgs;

pub const NAME: &str = "provision_timeout";

/// SPEC §5: MOLECULE_PROVISION_TIMEOUT_SECS defaults to 600.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Most workspaces one sweep fails; the next tick takes the rest.
pub const BATCH: i64 = 100;

/// What the workspace says once it timed out (no internal detail).
pub fn message(timeout: Duration) -> String {
    format!(
        "The workspace's agent did not register within {} s of its start. Its diagnostics were kept for support; \
         retry or contact your operator.",
        timeout.as_secs()
    )
}

/// Fails the workspaces provisioning for longer than `timeout`: the ids that flipped.
pub async fn sweep(db: &PgPool, timeout: Duration, batch: i64) -> Result<Vec<WorkspaceId>, sqlx::Error> {
    let candidates: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT id FROM workspaces WHERE status = 'provisioning' \
           AND status_changed_at <= now() - make_interval(secs => $1) \
         ORDER BY status_changed_at LIMIT $2",
    )
    .bind(timeout.as_secs_f64())
    .bind(batch)
    .fetch_all(db)
    .await?;
    let text = message(timeout);
    let mut flipped = Vec::new();
    for id in candidates {
        let ws = WorkspaceId(id);
        let mut tx = db.begin().await?;
        if let Some((org, rescue_job)) = verdicts::provision_timed_out(&mut tx, ws, timeout, &text).await? {
            tx.commit().await?;
            tracing::info!(event = "sweep.provision_timeout", workspace_id = %ws, org_id = %org, rescue_job = %rescue_job,
                "provisioning timed out");
            flipped.push(ws);
        }
    }
    Ok(flipped)
}

pub async fn run(ctx: &JobContext, args: &SweepArgs) -> HandlerResult {
    let timeout = args.timeout_s.map(Duration::from_secs).unwrap_or(DEFAULT_TIMEOUT);
    let failed = sweep(&ctx.db, timeout, BATCH).await.map_err(|e| JobError::Retryable(format!("database: {e}")))?;
    Ok(serde_json::json!({ "failed_workspaces": failed.iter().map(|w| w.to_string()).collect::<Vec<_>>() }))
}
