//! The A2A relay's routes: send (A9), look a delivery up by `queue_id` (A10), read a
//! workspace's activity (A11). Sending validates and normalizes the JSON-RPC body (J5a),
//! then in ONE transaction either drops it in a poll-mode workspace's inbox or writes
//! the queue row and its `a2a_dispatch` job; the worker delivers it (J6).

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use molecule_domain::a2a::AgentVersion;
use molecule_domain::a2a::normalize::{self, Normalized, RpcError, check_idempotency_key, render_request};
use molecule_domain::a2a::queue::{self, Inserted, NewMessage, QueueStatus};
use molecule_domain::activity::{self, NewActivity, Page};
use molecule_domain::{OrgId, WorkspaceId};
use molecule_jobs::{JobKind, NewJob, enqueue};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiQuery, parse_workspace_id};
use crate::routes::workspaces::DeliveryMode;

/// A JSON-RPC error answered to an A2A caller (HTTP 400): the request was not queued.
#[derive(Serialize, ToSchema)]
pub struct RpcErrorBody {
    /// Always "2.0".
    pub jsonrpc: String,
    /// The request's id, or null when it could not be read.
    #[schema(value_type = Option<Object>)]
    pub id: serde_json::Value,
    pub error: RpcErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct RpcErrorDetail {
    /// -32700 parse error, -32600 invalid request, -32601 method not relayed, -32602 invalid params.
    pub code: i64,
    pub message: String,
    /// `{"field": "params.message.parts"}`: the field at fault.
    #[schema(value_type = Option<Object>)]
    pub data: Option<serde_json::Value>,
}

/// A9's 400: a JSON-RPC error about the body, or the API's error shape about the path
/// or a header.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // documents the 400 (the two shapes are built where they are answered)
pub enum SendRejected {
    Rpc(RpcErrorBody),
    Api(ErrorBody),
}

/// A9 answer for a push-mode target.
#[derive(Serialize, ToSchema)]
pub struct Queued {
    /// Look the delivery up with `GET /workspaces/{id}/a2a/queue/{queue_id}`.
    pub queue_id: Uuid,
    /// The `a2a_dispatch` job delivering it.
    pub job_id: Option<String>,
    pub status: QueueStatus,
    /// True when this idempotency key was seen before: nothing new was queued.
    pub duplicate: bool,
}

/// A9 answer for a poll-mode target: the message is in its activity inbox.
#[derive(Serialize, ToSchema)]
pub struct Inboxed {
    /// Always "queued".
    pub status: String,
    /// Always "poll".
    pub delivery_mode: DeliveryMode,
    /// The method as sent.
    pub method: String,
    /// The inbox row (`GET /workspaces/{id}/activity?since_id=…` reads after it).
    pub activity_id: i64,
    /// True when this idempotency key was seen before: nothing new was added.
    pub duplicate: bool,
}

fn rpc_error(e: &RpcError, id: &serde_json::Value) -> Response {
    (StatusCode::BAD_REQUEST, Json(e.to_response(id))).into_response()
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        })
        .unwrap_or(false)
}

/// Who sends: the bearer's workspace, or for an org token the workspace named by
/// `X-Workspace-ID` (none: the canvas). A header that disagrees with a workspace bearer
/// is refused.
async fn caller_of(st: &AppState, p: &Principal, headers: &HeaderMap) -> ApiResult<Option<WorkspaceId>> {
    let named = match headers.get("x-workspace-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<WorkspaceId>().ok())
                .ok_or_else(|| ApiError::bad("invalid_header", "X-Workspace-ID must be a workspace id (a UUID)"))?,
        ),
    };
    match (p.workspace, named) {
        (Some(own), None) => Ok(Some(own)),
        (Some(own), Some(h)) if h == own => Ok(Some(own)),
        (Some(_), Some(_)) => {
            Err(ApiError::Forbidden("X-Workspace-ID names another workspace than the one the bearer token belongs to".into()))
        }
        (None, None) => Ok(None),
        (None, Some(h)) => {
            let known: Option<i32> = sqlx::query_scalar("SELECT 1 FROM workspaces WHERE id = $1 AND org_id = $2 AND status <> 'removed'")
                .bind(h.0)
                .bind(p.org.0)
                .fetch_optional(&st.db)
                .await?;
            known.map(|_| Some(h)).ok_or_else(|| ApiError::bad("invalid_header", "X-Workspace-ID is not a workspace of your organization"))
        }
    }
}

/// The idempotency key from the params or the `Idempotency-Key` header (both: they must agree).
fn idempotency_key(n: &Normalized, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let header = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .map(check_idempotency_key)
                .and_then(Result::ok)
                .ok_or_else(|| ApiError::bad("invalid_header", "Idempotency-Key must be 1 to 200 printable characters"))?,
        ),
    };
    match (&n.idempotency_key, header) {
        (Some(p), Some(h)) if *p != h => {
            Err(ApiError::bad("invalid_idempotency_key", "params.idempotency_key and the Idempotency-Key header differ; send one of them"))
        }
        (Some(p), _) => Ok(Some(p.clone())),
        (None, h) => Ok(h),
    }
}

#[derive(sqlx::FromRow)]
struct Target {
    delivery_mode: DeliveryMode,
    a2a_version: Option<AgentVersion>,
}

/// A9: send an A2A JSON-RPC message to a workspace's agent.
///
/// The body may be v0.2 (`params.message.content`), v0.3 (`message/send`) or v1.0
/// (`SendMessage`); it is normalized (J5a) and delivered in the generation the agent
/// speaks. `params.expires_in_seconds` sets a TTL (absent or 0: none);
/// `params.idempotency_key` or `Idempotency-Key` makes a repeat return the first
/// `queue_id` (per caller and target) and deliver once. The caller is the bearer's
/// workspace (an org token may name one in `X-Workspace-ID`). Bodies up to 4 MiB.
#[utoipa::path(post, path = "/workspaces/{id}/a2a", tag = "a2a", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "the target workspace"),
           ("X-Workspace-ID" = Option<Uuid>, Header, description = "the sending workspace (must match a workspace bearer)"),
           ("Idempotency-Key" = Option<String>, Header, description = "repeat-safe key (1–200 characters)")),
    request_body(content = Object, description = "a JSON-RPC 2.0 request: message/send, message/stream, SendMessage, SendStreamingMessage, tasks/get, tasks/cancel, GetTask or CancelTask", content_type = "application/json"),
    responses(
        (status = 200, description = "poll-mode target: in its inbox", body = Inboxed),
        (status = 202, description = "push-mode target: queued for delivery", body = Queued),
        (status = 400, description = "a JSON-RPC error naming the field at fault, or a bad id or header", body = SendRejected),
        (status = 401, body = ErrorBody),
        (status = 403, description = "X-Workspace-ID disagrees with the bearer", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn send(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let target = parse_workspace_id(&id)?;
    if !is_json(&headers) {
        return Err(ApiError::UnsupportedMediaType("send the JSON-RPC request with Content-Type: application/json".into()));
    }
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE { ApiError::PayloadTooLarge } else { ApiError::bad("invalid_body", r.body_text()) }
    })?;
    let n = match normalize::normalize(&body) {
        Ok(n) => n,
        Err(e) => return Ok(rpc_error(&e, &normalize::request_id(&body))),
    };
    let key = idempotency_key(&n, &headers)?;
    let caller = caller_of(&st, &p, &headers).await?;

    let mut tx = st.db.begin().await?;
    let t: Option<Target> =
        sqlx::query_as("SELECT delivery_mode, a2a_version FROM workspaces WHERE id = $1 AND org_id = $2 AND status <> 'removed'")
            .bind(target.0)
            .bind(p.org.0)
            .fetch_optional(&mut *tx)
            .await?;
    let t = t.ok_or(ApiError::NotFound("workspace"))?;
    // Sender and target are in use (S5 hibernates only idle workspaces).
    let active: Vec<WorkspaceId> = std::iter::once(target).chain(caller).collect();
    st.activity.mark_active(&mut tx, &active).await?;

    if t.delivery_mode == DeliveryMode::Poll {
        // The inbox holds the request as the agent will read it: in its generation.
        let version = t.a2a_version.unwrap_or(AgentVersion::V03);
        let request = render_request(&n.id, n.operation, &n.params, version);
        let recorded = activity::record(
            &mut tx,
            &NewActivity {
                org: p.org,
                workspace: target,
                kind: activity::A2A_RECEIVE,
                source_id: caller.map(|c| c.to_string()),
                method: Some(n.operation.method(version)),
                request_body: Some(&request),
                response_body: None,
                status: Some("queued"),
                queue_id: None,
                idempotency_key: key.as_deref(),
                expires_at: n.expires_in_seconds.map(|s| Utc::now() + chrono::Duration::seconds(s)),
            },
        )
        .await?;
        tx.commit().await?;
        tracing::info!(event = "a2a.inboxed", workspace_id = %target, org_id = %p.org, activity_id = recorded.id,
            duplicate = recorded.duplicate, method = n.method);
        let body = Inboxed {
            status: "queued".into(),
            delivery_mode: DeliveryMode::Poll,
            method: n.method,
            activity_id: recorded.id,
            duplicate: recorded.duplicate,
        };
        return Ok((StatusCode::OK, Json(body)).into_response());
    }

    let expires_at = n.expires_in_seconds.map(|s| Utc::now() + chrono::Duration::seconds(s));
    let canonical = render_request(&n.id, n.operation, &n.params, AgentVersion::V03);
    let inserted = queue::insert(
        &mut tx,
        &NewMessage {
            org: p.org,
            workspace: target,
            caller,
            method: &n.method,
            body: &canonical,
            idempotency_key: key.as_deref(),
            expires_at,
            caller_generation: n.generation,
        },
    )
    .await?;
    let queued = match inserted {
        Inserted::New(queue_id) => {
            let mut job = NewJob::new(JobKind::A2aDispatch, &serde_json::json!({ "queue_id": queue_id }))
                .org(p.org)
                .workspace(target)
                .announce_after_commit();
            if let Some(at) = expires_at {
                job = job.expires_at(at);
            }
            let job_id = enqueue(&mut tx, &job).await?.to_string();
            queue::set_job(&mut tx, queue_id, &job_id).await?;
            Queued { queue_id, job_id: Some(job_id), status: QueueStatus::Queued, duplicate: false }
        }
        Inserted::Existing(queue_id) => {
            let row = queue::load_in(&mut tx, queue_id).await?.ok_or(ApiError::Internal)?;
            Queued { queue_id, job_id: row.job_id, status: row.status, duplicate: true }
        }
    };
    tx.commit().await?;
    if !queued.duplicate {
        st.announcer.announce(JobKind::A2aDispatch.queue());
    }
    tracing::info!(event = "a2a.queued", workspace_id = %target, org_id = %p.org, queue_id = %queued.queue_id,
        duplicate = queued.duplicate, method = n.method, generation = n.generation.as_str());
    Ok((StatusCode::ACCEPTED, Json(queued)).into_response())
}

/// A10 answer.
#[derive(Serialize, ToSchema)]
pub struct Delivery {
    pub queue_id: Uuid,
    /// The target workspace.
    pub workspace_id: Uuid,
    /// The sending workspace (null: an org token).
    pub caller_id: Option<Uuid>,
    pub method: String,
    /// queued, dispatched (in flight), completed, failed or expired.
    pub status: QueueStatus,
    pub attempts: i32,
    pub last_error: Option<String>,
    /// The agent's HTTP status, when it answered.
    pub response_status: Option<i32>,
    /// The agent was found dead behind a 5xx: a restart is queued; send again after `retry_after`.
    pub restarting: bool,
    /// Seconds to wait before sending again (with `restarting`).
    pub retry_after: Option<i32>,
    /// The generation the agent was sent (0.3 or 1.0).
    pub agent_version: Option<AgentVersion>,
    /// The agent's JSON-RPC reply, rendered in the generation the caller wrote (v0.2
    /// callers read v0.3).
    #[schema(value_type = Option<Object>)]
    pub response: Option<serde_json::Value>,
    pub job_id: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub dispatched_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// A10: a delivery by `queue_id`. Visible to the sending workspace, the target workspace
/// and org tokens of its organization; to anyone else it does not exist (404, the same as
/// an unknown id: no existence leak).
#[utoipa::path(get, path = "/workspaces/{id}/a2a/queue/{queue_id}", tag = "a2a", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "the target (or sending) workspace"), ("queue_id" = Uuid, Path)),
    responses(
        (status = 200, body = Delivery),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn lookup(State(st): State<AppState>, p: Principal, Path((id, queue_id)): Path<(String, String)>) -> ApiResult<Json<Delivery>> {
    let ws = parse_workspace_id(&id)?;
    let queue_id: Uuid = queue_id.parse().map_err(|_| ApiError::bad("invalid_id", "queue ids are UUIDs"))?;
    let row = queue::get_for(&st.db, p.org, ws, queue_id).await?.ok_or(ApiError::NotFound("queue entry"))?;
    let allowed = match p.workspace {
        None => true,
        Some(own) => row.workspace_id == own.0 || row.caller_id == Some(own.0),
    };
    if !allowed {
        return Err(ApiError::NotFound("queue entry"));
    }
    Ok(Json(Delivery {
        queue_id: row.queue_id,
        workspace_id: row.workspace_id,
        caller_id: row.caller_id,
        method: row.method,
        status: row.status,
        attempts: row.attempts,
        last_error: row.last_error,
        response_status: row.response_status,
        restarting: row.restarting,
        retry_after: row.retry_after_secs,
        agent_version: row.agent_version,
        response: row.response_body,
        job_id: row.job_id,
        expires_at: row.expires_at,
        created_at: row.created_at,
        updated_at: row.updated_at,
        dispatched_at: row.dispatched_at,
        completed_at: row.completed_at,
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ActivityQuery {
    /// Only rows of this type: `a2a_receive` (a poll-mode inbox message) or `a2a_dispatch`
    /// (a push delivery's record).
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub kind: Option<String>,
    /// Only rows sent by this workspace id.
    pub source: Option<String>,
    /// 1–1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    /// Only rows of the last N seconds (positive; more than 30 days counts as 30 days).
    #[param(minimum = 1)]
    pub since_secs: Option<i64>,
    /// Rows strictly after this one, oldest first (0: from the first row). A cursor that is
    /// not one of this workspace's rows answers 410.
    #[param(minimum = 0)]
    pub since_id: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct ActivityPage {
    pub items: Vec<activity::Activity>,
    /// The id of the last item (pass it as `since_id` to read on); null when empty.
    pub last_id: Option<i64>,
}

const MAX_SINCE_SECS: i64 = 30 * 24 * 3600;

/// A11: a workspace's activity — its poll-mode inbox (`a2a_receive`) and the record of
/// push deliveries (`a2a_dispatch`). Without `since_id`, newest first; with it, the rows
/// strictly after it, in the order they were written (a reader that keeps the last id it
/// saw never misses or repeats a row).
#[utoipa::path(get, path = "/workspaces/{id}/activity", tag = "a2a", security(("bearer" = [])),
    params(("id" = Uuid, Path), ActivityQuery),
    responses(
        (status = 200, body = ActivityPage),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 410, description = "since_id is not one of this workspace's rows (unknown, pruned or another workspace's)", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn activity(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<ActivityQuery>,
) -> ApiResult<Json<ActivityPage>> {
    let ws = parse_workspace_id(&id)?;
    if !p.may_see(ws) {
        return Err(ApiError::NotFound("workspace"));
    }
    let limit = match q.limit {
        None => 100,
        Some(n) if (1..=1000).contains(&n) => n,
        Some(_) => return Err(ApiError::bad("invalid_query", "limit must be between 1 and 1000")),
    };
    let since_secs = match q.since_secs {
        None => None,
        Some(s) if s > 0 => Some(s.min(MAX_SINCE_SECS)),
        Some(_) => return Err(ApiError::bad("invalid_query", "since_secs must be a positive number of seconds")),
    };
    let since_id = match q.since_id {
        None => None,
        Some(n) if n >= 0 => Some(n),
        Some(_) => return Err(ApiError::bad("invalid_query", "since_id must be an activity id (0: from the first row)")),
    };
    workspace_exists(&st, p.org, ws).await?;
    let filter = activity::Filter { kind: q.kind, source: q.source, limit, since_secs, since_id };
    match activity::list(&st.db, p.org, ws, &filter).await? {
        Page::Rows(items) => Ok(Json(ActivityPage { last_id: items.last().map(|a| a.id), items })),
        Page::CursorGone => {
            Err(ApiError::Gone("since_id is not a row of this workspace's activity (unknown or pruned); start again without it"))
        }
    }
}

async fn workspace_exists(st: &AppState, org: OrgId, ws: WorkspaceId) -> ApiResult<()> {
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM workspaces WHERE id = $1 AND org_id = $2 AND status <> 'removed'")
        .bind(ws.0)
        .bind(org.0)
        .fetch_optional(&st.db)
        .await?;
    found.map(|_| ()).ok_or(ApiError::NotFound("workspace"))
}
