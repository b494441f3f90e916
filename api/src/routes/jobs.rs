//! Job status (A13) and control (A14), scoped to the caller's organization.

use axum::Json;
use axum::extract::{Path, State};
use molecule_jobs::status::{self, JobView, ListFilter, Transition};
use molecule_jobs::{JobKind, JobStatus};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiQuery, parse_job_id, parse_workspace_id};
use crate::routes::workspaces::page_limit;

fn visible(p: &Principal, v: &JobView) -> bool {
    match p.workspace {
        None => true,
        Some(own) => v.workspace_id == Some(own.0),
    }
}

/// A job as an operator sees it: with its failure's detail.
#[derive(Serialize, ToSchema)]
pub struct AdminJobView {
    #[serde(flatten)]
    pub job: JobView,
    /// The last failure's detail (engine or SDK text, image references, hosts, worker
    /// ids): never in a tenant's view.
    pub last_error_detail: Option<String>,
}

/// A job of any organization, with its failure's detail (`ADMIN_TOKEN`).
#[utoipa::path(get, path = "/admin/jobs/{id}", tag = "jobs", security(("admin" = [])),
    params(("id" = String, Path, description = "job id (ULID)", pattern = "^[0-9A-HJKMNP-TV-Z]{26}$")),
    responses(
        (status = 200, body = AdminJobView),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn admin_get(State(st): State<AppState>, _admin: crate::auth::Admin, Path(id): Path<String>) -> ApiResult<Json<AdminJobView>> {
    let id = parse_job_id(&id)?;
    let job = status::get(&st.db, &id).await?.ok_or(ApiError::NotFound("job"))?;
    let last_error_detail = status::error_detail(&st.db, &id).await?;
    Ok(Json(AdminJobView { job, last_error_detail }))
}

/// A13: a job by id.
#[utoipa::path(get, path = "/jobs/{id}", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "job id (ULID)", pattern = "^[0-9A-HJKMNP-TV-Z]{26}$")),
    responses(
        (status = 200, body = JobView),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn get(State(st): State<AppState>, p: Principal, Path(id): Path<String>) -> ApiResult<Json<JobView>> {
    let id = parse_job_id(&id)?;
    match status::get_for_org(&st.db, &id, p.org).await? {
        Some(v) if visible(&p, &v) => Ok(Json(v)),
        _ => Err(ApiError::NotFound("job")),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobsQuery {
    /// Only this workspace's jobs.
    #[param(value_type = Option<uuid::Uuid>)]
    pub workspace_id: Option<String>,
    /// pending, scheduled, running, retrying, succeeded, failed, dead, expired, cancelled or interrupted.
    #[param(value_type = Option<JobStatus>)]
    pub status: Option<String>,
    /// provision, stop, restart, rescue_capture, exec, a2a_dispatch, sweep or console.
    pub kind: Option<String>,
    /// 1–200, default 50.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^[0-9A-HJKMNP-TV-Z]{26}$")]
    pub cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct JobPage {
    /// Without results (an exec's can hold 2 MiB): a succeeded job's `result_url` says
    /// where its result is.
    pub items: Vec<JobView>,
    pub next_cursor: Option<String>,
}

/// A13: the organization's jobs, newest first, filtered.
#[utoipa::path(get, path = "/jobs", tag = "jobs", security(("bearer" = [])), params(JobsQuery),
    responses(
        (status = 200, body = JobPage),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn list(State(st): State<AppState>, p: Principal, ApiQuery(q): ApiQuery<JobsQuery>) -> ApiResult<Json<JobPage>> {
    let limit = page_limit(q.limit)?;
    let mut workspace = q.workspace_id.as_deref().map(parse_workspace_id).transpose()?.map(|w| w.0);
    if let Some(own) = p.workspace {
        if workspace.is_some_and(|w| w != own.0) {
            return Ok(Json(JobPage { items: vec![], next_cursor: None }));
        }
        workspace = Some(own.0);
    }
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            ApiError::bad(
                "invalid_query",
                "status must be one of pending, scheduled, running, retrying, succeeded, failed, dead, expired, cancelled, interrupted",
            )
        })?),
    };
    if let Some(k) = q.kind.as_deref() {
        if JobKind::from_queue(k).is_none() {
            return Err(ApiError::bad(
                "invalid_query",
                "kind must be one of provision, stop, restart, rescue_capture, exec, a2a_dispatch, sweep, console",
            ));
        }
    }
    let before = q
        .cursor
        .as_deref()
        .map(|c| parse_job_id(c).map_err(|_| ApiError::bad("invalid_cursor", "cursor is not one this API returned")))
        .transpose()?;
    let filter =
        ListFilter { scope: molecule_jobs::status::JobScope::Org(p.org), workspace, kind: q.kind, status, before, limit: limit + 1 };
    let mut items = status::list(&st.db, &filter).await?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|j| j.id.clone())
    } else {
        None
    };
    Ok(Json(JobPage { items, next_cursor }))
}

async fn transition(st: &AppState, p: &Principal, id: &str, cancel: bool) -> ApiResult<Json<JobView>> {
    let id = parse_job_id(id)?;
    let org = p.require_org()?;
    let t = if cancel { status::cancel_for_org(&st.db, &id, org).await? } else { status::retry_for_org(&st.db, &id, org).await? };
    match t {
        Transition::Done => status::get_for_org(&st.db, &id, org).await?.map(Json).ok_or(ApiError::NotFound("job")),
        Transition::NotFound => Err(ApiError::NotFound("job")),
        Transition::Conflict(s) => Err(ApiError::Conflict {
            code: "invalid_state",
            detail: if cancel {
                format!("the job is {}; only pending, scheduled or retrying jobs can be cancelled", s.as_str())
            } else {
                format!("the job is {}; only retrying, failed, dead, cancelled or interrupted jobs can be retried", s.as_str())
            },
        }),
    }
}

/// A14: cancel a waiting job (pending, scheduled, or retrying: awaiting its retry).
#[utoipa::path(post, path = "/jobs/{id}/cancel", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "job id (ULID)", pattern = "^[0-9A-HJKMNP-TV-Z]{26}$")),
    responses(
        (status = 200, body = JobView),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn cancel(State(st): State<AppState>, p: Principal, Path(id): Path<String>) -> ApiResult<Json<JobView>> {
    transition(&st, &p, &id, true).await
}

/// A14: run a retrying, failed, dead, cancelled or interrupted job again now.
#[utoipa::path(post, path = "/jobs/{id}/retry", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "job id (ULID)", pattern = "^[0-9A-HJKMNP-TV-Z]{26}$")),
    responses(
        (status = 200, body = JobView),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn retry(State(st): State<AppState>, p: Principal, Path(id): Path<String>) -> ApiResult<Json<JobView>> {
    transition(&st, &p, &id, false).await
}
