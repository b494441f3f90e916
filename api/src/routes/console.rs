//! A8: the serial console of a workspace's EC2 instance. The API never calls EC2: it
//! serves the cached copy (written by the `console` job: decoded, redacted, the last
//! 64 KiB) while it is fresh, and otherwise enqueues one refresh per workspace and
//! half-minute, answering 202 with whatever copy it has.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use molecule_domain::console;
use molecule_jobs::JobKind;
use molecule_jobs::enqueue::{NewJob, enqueue};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::parse_workspace_id;

#[derive(Serialize, ToSchema)]
pub struct ConsoleOutput {
    pub workspace_id: Uuid,
    /// The EC2 instance the output is from.
    pub instance_id: String,
    /// Decoded and redacted; its last 64 KiB. Null until the first fetch completes.
    pub output: Option<String>,
    /// True when earlier output was dropped to keep the last 64 KiB.
    pub truncated: bool,
    pub fetched_at: Option<DateTime<Utc>>,
    /// Set (with status 202) when a fresh copy is being fetched: follow `GET /jobs/{id}`,
    /// then read this route again.
    pub refresh_job_id: Option<String>,
}

#[utoipa::path(get, path = "/workspaces/{id}/console", tag = "workspaces", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path, description = "workspace id")),
    responses(
        (status = 200, description = "a copy fetched within the last 30 s", body = ConsoleOutput),
        (status = 202, description = "a refresh is queued; the body has the last copy, if any", body = ConsoleOutput),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "no instance yet", body = ErrorBody),
        (status = 501, description = "no console for this backend (Docker workspaces)", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn console(State(st): State<AppState>, p: Principal, Path(id): Path<String>) -> ApiResult<(StatusCode, Json<ConsoleOutput>)> {
    let id = parse_workspace_id(&id)?;
    if !p.may_see(id) {
        return Err(ApiError::NotFound("workspace"));
    }
    let row: Option<(Option<String>, Option<String>)> =
        sqlx::query_as("SELECT instance_id, container_name FROM workspaces WHERE id = $1 AND org_id = $2")
            .bind(id.0)
            .bind(p.org.0)
            .fetch_optional(&st.db)
            .await?;
    let instance_id = match row.ok_or(ApiError::NotFound("workspace"))? {
        (Some(instance), _) => instance,
        // Started, and no instance id: a Docker container.
        (None, Some(_)) => {
            return Err(ApiError::NotImplemented(
                "console output exists for EC2 workspaces only; this one runs on Docker — its agent logs are in its rescue bundle".into(),
            ));
        }
        (None, None) => {
            return Err(ApiError::Conflict {
                code: "no_instance_yet",
                detail: "the workspace has no instance yet (still provisioning, or its launch failed); try again once it has one".into(),
            });
        }
    };
    let cached = console::latest(&st.db, id, p.org).await?;
    let fresh =
        cached.as_ref().is_some_and(|c| Utc::now().signed_duration_since(c.fetched_at).to_std().is_ok_and(|age| age < console::FRESH_FOR));
    let refresh_job_id = if fresh {
        None
    } else {
        // One refresh per workspace, instance and half-minute, however many readers ask.
        let bucket = Utc::now().timestamp() / console::FRESH_FOR.as_secs() as i64;
        let job = NewJob::new(JobKind::Console, &serde_json::json!({ "workspace_id": id.0 }))
            .org(p.org)
            .workspace(id)
            .idempotency_key(format!("{}:{instance_id}:{bucket}", id.0));
        let mut conn = st.db.acquire().await?;
        Some(enqueue(&mut conn, &job).await?.to_string())
    };
    let body = ConsoleOutput {
        workspace_id: id.0,
        instance_id,
        output: cached.as_ref().map(|c| c.output.clone()),
        truncated: cached.as_ref().is_some_and(|c| c.truncated),
        fetched_at: cached.as_ref().map(|c| c.fetched_at),
        refresh_job_id,
    };
    Ok((if fresh { StatusCode::OK } else { StatusCode::ACCEPTED }, Json(body)))
}
