//! A5: run a one-shot command in a workspace (X3): argv only, tier ≥ 3, timeout default
//! 30 s and at most 120 s. The API validates and enqueues; the exec pool runs it.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use molecule_domain::WorkspaceStatus;
use molecule_jobs::{enqueue, JobKind, NewJob};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{parse_workspace_id, ApiJson};
use crate::AppState;

pub const DEFAULT_TIMEOUT_S: u64 = 30;
pub const MAX_TIMEOUT_S: u64 = 120;
/// Host exec is for host-control tiers (T3/T4) only (seed 001).
pub const MIN_EXEC_TIER: i16 = 3;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// The command as a list of arguments: no shell is added. A bare string `cmd` is refused.
    #[schema(min_items = 1)]
    pub argv: Vec<String>,
    /// Seconds, default 30, clamped to 120.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub timeout_s: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct ExecQueued {
    pub job_id: String,
    /// The timeout the command runs with, after clamping.
    pub timeout_s: u64,
}

/// A5: queue a command; `GET /jobs/{job_id}` carries `{outcome, exit_code, stdout, stderr, truncated}`.
#[utoipa::path(post, path = "/workspaces/{id}/exec", tag = "workspaces", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path, description = "workspace id")), request_body = ExecBody,
    responses(
        (status = 202, body = ExecQueued),
        (status = 400, description = "bad argv or timeout", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "tier below 3, or not an org token", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "the workspace is not running", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn exec(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ExecBody>,
) -> ApiResult<(StatusCode, Json<ExecQueued>)> {
    let id = parse_workspace_id(&id)?;
    let org = p.require_org()?;
    if body.argv.is_empty() || body.argv[0].is_empty() {
        return Err(ApiError::bad("invalid_argv", "argv must name a program: a non-empty list of strings"));
    }
    if body.argv.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::bad("invalid_argv", "arguments must not contain NUL bytes"));
    }
    let timeout_s = match body.timeout_s {
        None => DEFAULT_TIMEOUT_S,
        Some(0) => return Err(ApiError::bad("invalid_timeout", "timeout_s must be at least 1")),
        Some(t) => t.min(MAX_TIMEOUT_S),
    };
    let mut tx = st.db.begin().await?;
    let row: Option<(i16, WorkspaceStatus)> =
        sqlx::query_as("SELECT tier, status FROM workspaces WHERE id = $1 AND org_id = $2")
            .bind(id.0)
            .bind(org.0)
            .fetch_optional(&mut *tx)
            .await?;
    let (tier, status) = row.ok_or(ApiError::NotFound("workspace"))?;
    if status == WorkspaceStatus::Removed {
        return Err(ApiError::NotFound("workspace"));
    }
    if tier < MIN_EXEC_TIER {
        return Err(ApiError::Forbidden(format!("exec needs a tier 3 or 4 workspace; this one is tier {tier}")));
    }
    if !matches!(status, WorkspaceStatus::Online | WorkspaceStatus::Degraded) {
        return Err(ApiError::Conflict {
            code: "workspace_not_running",
            detail: format!("the workspace is {}; exec needs it online", status.as_str()),
        });
    }
    let payload = serde_json::json!({
        "workspace_id": id, "argv": body.argv, "timeout_s": timeout_s, "actor": format!("org:{org}"),
    });
    // A command nobody ran within 5 minutes is stale: it expires instead of surprising anyone.
    let job = NewJob::new(JobKind::Exec, &payload)
        .org(org)
        .workspace(id)
        .expires_at(Utc::now() + chrono::Duration::minutes(5));
    let job_id = enqueue(&mut tx, &job).await?.to_string();
    tx.commit().await?;
    Ok((StatusCode::ACCEPTED, Json(ExecQueued { job_id, timeout_s })))
}
