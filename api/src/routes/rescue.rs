//! Boot failures: the bootstrap-failed verdict (A7, admin) and the rescue bundle read (A6).

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use molecule_domain::WorkspaceStatus;
use molecule_domain::text::{head, tail};
use molecule_jobs::verdicts;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::AppState;
use crate::auth::{Admin, Principal};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, parse_workspace_id};

/// The log tail kept in `last_sample_error` (the end of the log: where boots die).
pub const LOG_TAIL_BYTES: usize = 4096;
/// Rescue sections are served verbatim up to this size each…
pub const SECTION_MAX_BYTES: usize = 64 * 1024;
/// …and at most this many.
pub const MAX_SECTIONS: usize = 16;

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct BootstrapFailed {
    /// What the watcher saw, e.g. "agent never registered".
    #[serde(default)]
    pub error: Option<String>,
    /// The end of the boot log; only its last 4 KiB are kept, redacted.
    #[serde(default)]
    pub log_tail: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Verdict {
    /// True when this call moved the workspace from provisioning to failed.
    pub flipped: bool,
    pub status: WorkspaceStatus,
    /// The rescue_capture job, when the row flipped.
    pub job_id: Option<String>,
}

/// A7: the control plane's boot-failure verdict. Flips `provisioning → failed` only (any
/// other status: a 200 no-op), stores the error and a bounded, redacted log tail, records
/// `WORKSPACE_PROVISION_FAILED`, and enqueues `rescue_capture` only when the row flipped.
#[utoipa::path(post, path = "/admin/workspaces/{id}/bootstrap-failed", tag = "operations", security(("admin" = [])),
    params(("id" = uuid::Uuid, Path, description = "workspace id")), request_body = BootstrapFailed,
    responses(
        (status = 200, body = Verdict),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn bootstrap_failed(
    State(st): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<BootstrapFailed>,
) -> ApiResult<Json<Verdict>> {
    let id = parse_workspace_id(&id)?;
    // Redacted whole, then cut: a secret the cut would halve no longer looks like one.
    let redactor = molecule_domain::redact::global();
    let error = redactor.redact(body.error.as_deref().unwrap_or("bootstrap failed"));
    let mut sample = head(&error, 1024).to_string();
    if let Some(log) = body.log_tail.as_deref().filter(|l| !l.is_empty()) {
        sample.push_str("\n--- log tail ---\n");
        sample.push_str(tail(&redactor.redact(log), LOG_TAIL_BYTES));
    }
    let mut tx = st.db.begin().await?;
    let flipped = verdicts::boot_failed(&mut tx, id, verdicts::Trigger::BootstrapFailed, &sample).await?;
    let Some((org, job_id)) = flipped else {
        let status: Option<WorkspaceStatus> =
            sqlx::query_scalar("SELECT status FROM workspaces WHERE id = $1").bind(id.0).fetch_optional(&mut *tx).await?;
        let status = status.ok_or(ApiError::NotFound("workspace"))?;
        return Ok(Json(Verdict { flipped: false, status, job_id: None }));
    };
    tx.commit().await?;
    tracing::info!(event = "workspace.bootstrap_failed", workspace_id = %id, org_id = %org, job_id = %job_id);
    Ok(Json(Verdict { flipped: true, status: WorkspaceStatus::Failed, job_id: Some(job_id.to_string()) }))
}

#[derive(Serialize, ToSchema)]
pub struct RescueBundle {
    pub id: Uuid,
    pub workspace_id: Uuid,
    /// provision_timeout or bootstrap_failed.
    pub trigger: String,
    pub captured_at: DateTime<Utc>,
    /// Section name → text, already redacted at capture; each at most 64 KiB.
    pub sections: std::collections::BTreeMap<String, String>,
}

/// A6: the latest rescue bundle of a workspace of the caller's organization.
#[utoipa::path(get, path = "/workspaces/{id}/rescue", tag = "workspaces", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path, description = "workspace id")),
    responses(
        (status = 200, body = RescueBundle),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "no such workspace, or no bundle", body = ErrorBody),
        (status = 503, description = "platform misconfigured or store fault", body = ErrorBody),
    ))]
pub async fn latest(State(st): State<AppState>, p: Principal, Path(id): Path<String>) -> ApiResult<Json<RescueBundle>> {
    let id = parse_workspace_id(&id)?;
    if !p.may_see(id) {
        return Err(ApiError::NotFound("rescue bundle"));
    }
    // Strict org equality (seed 000: an empty org once disabled this filter).
    let row: Option<(Uuid, String, DateTime<Utc>, serde_json::Value)> = sqlx::query_as(
        "SELECT id, trigger, captured_at, sections FROM rescue_bundles \
         WHERE workspace_id = $1 AND org_id = $2 ORDER BY captured_at DESC, id DESC LIMIT 1",
    )
    .bind(id.0)
    .bind(p.org.0)
    .fetch_optional(&st.db)
    .await?;
    let (bundle_id, trigger, captured_at, sections) = row.ok_or(ApiError::NotFound("rescue bundle"))?;
    let sections = sections
        .as_object()
        .map(|m| {
            m.iter()
                .take(MAX_SECTIONS)
                .map(|(k, v)| (k.clone(), head(v.as_str().unwrap_or_default(), SECTION_MAX_BYTES).to_string()))
                .collect()
        })
        .unwrap_or_default();
    Ok(Json(RescueBundle { id: bundle_id, workspace_id: id.0, trigger, captured_at, sections }))
}
