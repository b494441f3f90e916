//! J1 provision: mint both secrets (the one shared function), resolve the image, start
//! the instance. The workspace stays `provisioning` until its agent registers (A12).
//! Out of attempts (or a definite failure) → `failed` with a canned message and a
//! `WORKSPACE_PROVISION_FAILED` event that carry no internal detail, and a rescue capture.

use molecule_backends::{BackendError, StartSpec, image};
use molecule_domain::tokens::mint_workspace_secrets;
use molecule_domain::{OrgId, WorkspaceId, WorkspaceStatus};
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::{JobContext, JobError};
use serde_json::json;
use uuid::Uuid;

use crate::Deps;

/// Why a start failed, in words a tenant may read: no image reference, registry, host or
/// engine text (J1). The detail goes to the server log and the job's `last_error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartFailure {
    ImageMissing,
    EngineUnavailable,
    EngineRefused,
    NoBackend,
}

impl StartFailure {
    pub fn of(e: &BackendError) -> Self {
        match e {
            BackendError::ImageNotFound(_) => Self::ImageMissing,
            BackendError::EngineUnavailable(_) => Self::EngineUnavailable,
            BackendError::Engine { .. } | BackendError::Unsupported(_) => Self::EngineRefused,
            BackendError::NoBackend => Self::NoBackend,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Self::ImageMissing => "image_missing",
            Self::EngineUnavailable => "engine_unavailable",
            Self::EngineRefused => "engine_refused",
            Self::NoBackend => "no_backend",
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Self::ImageMissing => "its runtime image is not available on this platform",
            Self::EngineUnavailable => "the platform's workspace backend (container engine or cloud API) did not answer",
            Self::EngineRefused => "the platform's workspace backend (container engine or cloud API) refused to start it",
            Self::NoBackend => "this platform has no workspace backend configured",
        }
    }

    /// `last_sample_error` once provisioning has given up.
    pub fn final_message(self) -> String {
        format!(
            "The workspace could not be started: {}. Its diagnostics were kept for support; retry or contact your operator.",
            self.reason()
        )
    }

    /// `last_sample_error` while attempts remain.
    pub fn retry_message(self, attempt: i32, max_attempts: i32) -> String {
        format!("Starting the workspace failed: {} (attempt {attempt} of {max_attempts}); retrying.", self.reason())
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct Row {
    #[sqlx(rename = "org_id", try_from = "Uuid")]
    pub org: OrgId,
    #[sqlx(rename = "parent_id")]
    pub parent: Option<Uuid>,
    pub runtime: String,
    pub tier: i16,
    pub status: WorkspaceStatus,
    /// A start has been recorded (a container name or an instance id).
    pub started: bool,
}

pub(crate) async fn load(d: &Deps, ws: WorkspaceId) -> Result<Option<Row>, JobError> {
    sqlx::query_as(
        "SELECT org_id, parent_id, runtime, tier, status, \
         (container_name IS NOT NULL OR instance_id IS NOT NULL) AS started FROM workspaces WHERE id = $1",
    )
    .bind(ws.0)
    .fetch_optional(&d.db)
    .await
    .map_err(db_err)
}

pub(crate) fn db_err(e: sqlx::Error) -> JobError {
    JobError::retryable("database", e.to_string())
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
    // Launches take turns with restarts (the workspace's restart lock, J3) on every
    // backend: a restart accepted while the workspace is still provisioning must not
    // interleave with this launch. On EC2 it would launch a second instance; on Docker it
    // would mint new secrets (revoking ours) and then have its container replaced by ours,
    // or removed between our create and start — either way a revoked token or a failed
    // workspace. `provision` re-reads the row under the lock, so a launch that waited for a
    // restart finds the instance started and leaves it be. The image is pulled inside the
    // lock, by its holder (a moving tag is re-pulled at each start anyway): a job that
    // finds the lock held snoozes and pulls nothing.
    match crate::restart::one_at_a_time(&d.db, ws, provision(d, ctx, ws)).await? {
        Some(r) => r,
        None => Err(crate::restart::wait_turn(d, ctx, "a restart of this workspace is running").await),
    }
}

/// Starts the workspace once: never again when a start is recorded (a restart did it, or
/// this job is a repeat of one whose start landed).
async fn provision(d: &Deps, ctx: &JobContext, ws: WorkspaceId) -> HandlerResult {
    let Some(row) = load(d, ws).await? else {
        return Ok(json!({ "skipped": "workspace does not exist" }));
    };
    if row.status != WorkspaceStatus::Provisioning {
        // At-least-once delivery: a repeat after success, or a workspace removed meanwhile.
        return Ok(json!({ "skipped": format!("workspace is {}", row.status.as_str()) }));
    }
    if row.started {
        return Ok(json!({ "skipped": "already started; its agent has yet to register" }));
    }
    start(d, ctx, ws, &row).await
}

/// Mints the secrets and starts the instance (shared by provision and restart).
pub(crate) async fn start(d: &Deps, ctx: &JobContext, ws: WorkspaceId, row: &Row) -> HandlerResult {
    tracing::info!(event = "provision.start", workspace_id = %ws, org_id = %row.org, job_id = %ctx.id);
    let image = resolve_image(d, &row.runtime).await?;
    let agent = match d.backend.assign_agent_endpoint(ws) {
        Ok(a) => a,
        Err(e) => return failed(d, ctx, ws, row.org, e).await,
    };
    // The secrets and the agent's assigned URL land together, before the agent can exist
    // — and only while the workspace is still being provisioned: a delete that came
    // meanwhile revoked its tokens, and none may be minted after it (the row lock orders
    // the two).
    let mut tx = d.db.begin().await.map_err(db_err)?;
    let status: Option<WorkspaceStatus> = sqlx::query_scalar("SELECT status FROM workspaces WHERE id = $1 FOR UPDATE")
        .bind(ws.0)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
    if status != Some(WorkspaceStatus::Provisioning) {
        return Ok(json!({ "skipped": format!("workspace is {}", status.map(|s| s.as_str()).unwrap_or("gone")) }));
    }
    let secrets = mint_workspace_secrets(&mut tx, ws).await.map_err(db_err)?;
    sqlx::query("UPDATE workspaces SET assigned_url = $2 WHERE id = $1")
        .bind(ws.0)
        .bind(agent.as_ref().map(|a| a.url.as_str()))
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    let spec = StartSpec::new(ws, row.org, row.parent.map(WorkspaceId), row.runtime.clone(), image, d.platform_url.clone(), secrets)
        .with_tier(row.tier)
        .with_agent(agent);
    match d.backend.start(&spec).await {
        Ok(started) => {
            let mut tx = d.db.begin().await.map_err(db_err)?;
            // A hint from an earlier failed attempt no longer applies (unless the agent was
            // quicker than this write and the row already moved on).
            // The instance id is what stop, exec and the console go by (seed 002: never the
            // workspace id); an address known only from the launch becomes the trusted URL.
            let status: Option<WorkspaceStatus> = sqlx::query_scalar(
                "UPDATE workspaces SET container_name = $2, runtime_image_digest = $3, instance_id = $4, \
                 assigned_url = COALESCE($5, assigned_url), \
                 last_sample_error = CASE WHEN status = 'provisioning' THEN NULL ELSE last_sample_error END, \
                 updated_at = now() WHERE id = $1 RETURNING status",
            )
            .bind(ws.0)
            .bind(&started.container_name)
            .bind(&started.image_digest)
            .bind(&started.instance_id)
            .bind(&started.agent_url)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?;
            if matches!(status, Some(WorkspaceStatus::Removed) | None) {
                // Deleted while it launched: the delete's stop may have found nothing to
                // stop yet. The id is recorded now; stop what was just started. A retry
                // would find the row removed and do nothing: a failure here is left to
                // the orphan sweep (S2 reaps a removed row's instances), not retried.
                tx.commit().await.map_err(db_err)?;
                tracing::info!(event = "provision.removed_meanwhile", workspace_id = %ws, job_id = %ctx.id);
                return Ok(match d.backend.stop(ws).await {
                    Ok(()) => json!({ "skipped": "workspace removed while it started; its instance is stopped" }),
                    Err(e) => {
                        tracing::warn!(workspace_id = %ws, job_id = %ctx.id, error = %e, "stopping the instance of a removed workspace failed; the orphan sweep will");
                        json!({ "skipped": "workspace removed while it started; its instance is left to the orphan sweep" })
                    }
                });
            }
            molecule_domain::events::record(
                &mut tx,
                row.org,
                ws.0,
                "WORKSPACE_STARTED",
                json!({ "job_id": ctx.id.as_str(), "next": "its agent registers" }),
            )
            .await
            .map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
            Ok(json!({ "container": started.container_name, "instance_id": started.instance_id }))
        }
        Err(e) => failed(d, ctx, ws, row.org, e).await,
    }
}

/// A start that failed: says why on the workspace (a canned sentence and an event), then
/// retries, or gives up on the last attempt or a definite answer.
async fn failed(d: &Deps, ctx: &JobContext, ws: WorkspaceId, org: OrgId, e: BackendError) -> HandlerResult {
    let last = !e.is_retryable() || ctx.attempt >= ctx.max_attempts;
    let why = StartFailure::of(&e);
    tracing::warn!(workspace_id = %ws, job_id = %ctx.id, attempt = ctx.attempt, error = %e, final_attempt = last, "provision failed");
    if last {
        mark_failed(d, ctx, ws, org, why).await?;
    } else {
        note_retry(d, ctx, ws, org, why).await?;
    }
    // The job core tells out of attempts (`dead`) from a fault none fixes (`failed`, A13).
    Err(if e.is_retryable() { JobError::retryable(why.code(), e.to_string()) } else { permanent(e) })
}

fn permanent(e: BackendError) -> JobError {
    match e {
        BackendError::NoBackend => JobError::NoBackend,
        other => JobError::permanent(StartFailure::of(&other).code(), other.to_string()),
    }
}

/// While attempts remain: the workspace says what went wrong and that it is retrying.
async fn note_retry(d: &Deps, ctx: &JobContext, ws: WorkspaceId, org: OrgId, why: StartFailure) -> Result<(), JobError> {
    let mut tx = d.db.begin().await.map_err(db_err)?;
    let noted = sqlx::query("UPDATE workspaces SET last_sample_error = $2, updated_at = now() WHERE id = $1 AND status = 'provisioning'")
        .bind(ws.0)
        .bind(why.retry_message(ctx.attempt, ctx.max_attempts))
        .execute(&mut *tx)
        .await
        .map_err(db_err)?
        .rows_affected();
    if noted == 1 {
        molecule_domain::events::record(
            &mut tx,
            org,
            ws.0,
            "WORKSPACE_PROVISION_RETRYING",
            json!({ "job_id": ctx.id.as_str(), "attempt": ctx.attempt, "reason": why.code() }),
        )
        .await
        .map_err(db_err)?;
    }
    tx.commit().await.map_err(db_err)?;
    Ok(())
}

/// `provisioning → failed` (only that transition), with the canned message, an event and
/// a rescue capture (J1), all in one transaction and only when the row flipped.
pub(crate) async fn mark_failed(d: &Deps, ctx: &JobContext, ws: WorkspaceId, org: OrgId, why: StartFailure) -> Result<(), JobError> {
    let mut tx = d.db.begin().await.map_err(db_err)?;
    let flipped = sqlx::query(
        "UPDATE workspaces SET status = 'failed', last_sample_error = $2, updated_at = now() \
         WHERE id = $1 AND status = 'provisioning'",
    )
    .bind(ws.0)
    .bind(why.final_message())
    .execute(&mut *tx)
    .await
    .map_err(db_err)?
    .rows_affected();
    if flipped == 1 {
        // Trigger bootstrap_failed, not provision_timeout: J4 allows only these two, and
        // this is a definite failure to start the instance (the backend refused, or the
        // attempts ran out), not S1's verdict that a started agent never registered in time.
        let rescue = molecule_jobs::verdicts::queue_rescue(&mut tx, org, ws, molecule_jobs::verdicts::Trigger::BootstrapFailed)
            .await
            .map_err(db_err)?;
        molecule_domain::events::record(
            &mut tx,
            org,
            ws.0,
            "WORKSPACE_PROVISION_FAILED",
            json!({ "job_id": ctx.id.as_str(), "reason": why.code(), "rescue_job_id": rescue.as_str() }),
        )
        .await
        .map_err(db_err)?;
    }
    tx.commit().await.map_err(db_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// J1: a runtime's image is the registry's template image, a recorded digest pin
    /// replaces its tag (`<repository>@sha256:<digest>`), and WORKSPACE_IMAGE_LOCAL_OVERRIDE
    /// ignores the pin.
    #[tokio::test]
    async fn a_recorded_pin_wins_unless_the_local_override_is_on() {
        let (db, _) = molecule_domain::testing::fresh_db().await;
        let mut d = Deps::minimal(db.clone(), std::sync::Arc::new(molecule_backends::NoBackend)).unwrap();
        d.registry = "registry.example:5000/molecule".into();
        let tagged = "registry.example:5000/molecule/workspace-template-hermes:latest";
        assert_eq!(resolve_image(&d, "hermes").await.unwrap(), tagged);
        let digest = "ab".repeat(32);
        sqlx::query("INSERT INTO runtime_image_pins (runtime, sha256, pinned_by) VALUES ('hermes', $1, 'test')")
            .bind(&digest)
            .execute(&db)
            .await
            .unwrap();
        assert_eq!(
            resolve_image(&d, "hermes").await.unwrap(),
            format!("registry.example:5000/molecule/workspace-template-hermes@sha256:{digest}")
        );
        assert_eq!(resolve_image(&d, "langgraph").await.unwrap(), "registry.example:5000/molecule/workspace-template-langgraph:latest");
        d.image_local_override = true;
        assert_eq!(resolve_image(&d, "hermes").await.unwrap(), tagged);
    }
}
