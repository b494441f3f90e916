//! Workspaces (A1–A4) and their lifecycle events. Each mutating route validates, then
//! writes the domain rows and pushes its jobs in ONE transaction.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use molecule_domain::{OrgId, WorkspaceId, WorkspaceStatus, events, runtimes};
use molecule_jobs::{Announcer, JobKind, NewJob, enqueue, enqueue_many};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::AppState;
use crate::auth::Principal;
use crate::batch::{self, Batcher};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, ApiQuery, parse_workspace_id};

#[derive(Serialize, ToSchema, sqlx::FromRow)]
pub struct Workspace {
    pub id: Uuid,
    pub org_id: Uuid,
    pub parent_id: Option<Uuid>,
    pub name: String,
    pub runtime: String,
    pub tier: i16,
    pub status: WorkspaceStatus,
    pub delivery_mode: DeliveryMode,
    pub url: Option<String>,
    /// The backend's id of the workspace's instance: EC2's `i-…` (none on Docker).
    pub instance_id: Option<String>,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub last_sample_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[sqlx(type_name = "delivery_mode", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    Push,
    Poll,
}

impl DeliveryMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryMode::Push => "push",
            DeliveryMode::Poll => "poll",
        }
    }
}

macro_rules! ws_cols {
    () => {
        "id, org_id, parent_id, name, runtime, tier, status, delivery_mode, url, instance_id, \
         last_heartbeat_at, last_sample_error, created_at, updated_at"
    };
}

macro_rules! ws_select {
    ($rest:literal) => {
        concat!("SELECT ", ws_cols!(), " FROM workspaces w ", $rest)
    };
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWorkspace {
    /// 1–200 characters, no control characters.
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    /// One of the known runtimes (`echo`, `external`, `claude-code`, …).
    pub runtime: String,
    /// 1–4 (default 2). Tier 3 and up may run commands on the host (exec).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 4)]
    pub tier: Option<i16>,
    /// Default `push`; `poll` for `external` runtimes.
    #[serde(default)]
    pub delivery_mode: Option<DeliveryMode>,
    /// A workspace of the same organization.
    #[serde(default)]
    pub parent_id: Option<Uuid>,
}

#[derive(Serialize, ToSchema)]
pub struct Created {
    pub workspace: Workspace,
    /// The provision job; null for `external` workspaces (their agent registers itself).
    pub job_id: Option<String>,
}

fn validate(body: &CreateWorkspace) -> ApiResult<(String, i16)> {
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::bad("invalid_name", "name must be 1 to 200 characters"));
    }
    if name.chars().any(char::is_control) {
        return Err(ApiError::bad("invalid_name", "name must not contain control characters"));
    }
    if !runtimes::is_known(&body.runtime) {
        return Err(ApiError::bad("invalid_runtime", format!("unknown runtime; known runtimes: {}", runtimes::KNOWN.join(", "))));
    }
    let tier = body.tier.unwrap_or(2);
    if !(1..=4).contains(&tier) {
        return Err(ApiError::bad("invalid_tier", "tier must be 1, 2, 3 or 4"));
    }
    Ok((name.to_string(), tier))
}

pub(crate) use molecule_domain::events::record as record_event;

/// A1: create a workspace; the row and its provision job commit together.
#[utoipa::path(post, path = "/workspaces", request_body = CreateWorkspace, tag = "workspaces",
    security(("bearer" = [])),
    responses(
        (status = 202, description = "created; provisioning is queued", body = Created),
        (status = 400, description = "invalid body", body = ErrorBody),
        (status = 401, description = "no or invalid token", body = ErrorBody),
        (status = 403, description = "a workspace token cannot create workspaces", body = ErrorBody),
        (status = 413, description = "body too large", body = ErrorBody),
        (status = 415, description = "body is not JSON", body = ErrorBody),
        (status = 503, description = "database unavailable, platform misconfigured, or busy (a lock wait timed out; retry)", body = ErrorBody),
    ))]
pub async fn create(
    State(st): State<AppState>,
    p: Principal,
    ApiJson(body): ApiJson<CreateWorkspace>,
) -> ApiResult<(StatusCode, Json<Created>)> {
    let org = p.require_org()?;
    let (name, tier) = validate(&body)?;
    let external = body.runtime == runtimes::EXTERNAL;
    let delivery = body.delivery_mode.unwrap_or(if external { DeliveryMode::Poll } else { DeliveryMode::Push });
    let status = if external { WorkspaceStatus::AwaitingAgent } else { WorkspaceStatus::Provisioning };

    let created = st
        .creates
        .submit(CreateRequest { id: Uuid::new_v4(), org, parent: body.parent_id, name, runtime: body.runtime, tier, status, delivery })
        .await
        .ok_or(ApiError::Internal)??;
    let (ws, job_id) = (created.workspace, created.job_id);
    tracing::info!(event = "workspace.created", workspace_id = %ws.id, org_id = %org, job_id = ?job_id);
    Ok((StatusCode::ACCEPTED, Json(Created { workspace: ws, job_id })))
}

/// A workspace the route has validated; the batch checks its parent and writes it.
pub struct CreateRequest {
    /// Chosen by the route, so each request finds its row whatever order RETURNING gives.
    id: Uuid,
    org: OrgId,
    parent: Option<Uuid>,
    name: String,
    runtime: String,
    tier: i16,
    status: WorkspaceStatus,
    delivery: DeliveryMode,
}

pub type CreateBatcher = Batcher<CreateRequest, ApiResult<Created>>;

/// The lanes creating workspaces (crate::batch): one transaction a batch.
pub fn create_batcher(db: PgPool, announcer: Announcer, lock_wait: std::time::Duration) -> CreateBatcher {
    Batcher::start(batch::lanes(), batch::MAX, move |reqs: Vec<CreateRequest>| {
        let (db, announcer) = (db.clone(), announcer.clone());
        async move {
            let out = batch::each_alone_if_refused(reqs, |r| Box::pin(create_all(db.clone(), lock_wait, r))).await;
            if out.iter().any(|c| c.as_ref().is_ok_and(|c| c.job_id.is_some())) {
                announcer.announce(JobKind::Provision.queue());
            }
            out
        }
    })
}

/// A1 for a batch: each workspace row, its provision job (unless external) and its
/// WORKSPACE_CREATED event commit together — here with the rest of the batch.
async fn create_all(db: PgPool, lock_wait: std::time::Duration, reqs: &[CreateRequest]) -> Result<Vec<ApiResult<Created>>, sqlx::Error> {
    let mut tx = batch::begin(&db, lock_wait).await?;
    let parents: Vec<Uuid> = reqs.iter().filter_map(|r| r.parent).collect();
    let live_parents: HashSet<(Uuid, Uuid)> = match parents.is_empty() {
        true => HashSet::new(),
        // KEY SHARE, the lock the child's foreign key takes anyway, taken here so a parent
        // whose delete is in flight is waited for and then re-read as `removed` (READ
        // COMMITTED re-checks the predicate on the row a wait ends at); a plain read let
        // the child in under a parent the delete had already answered for.
        false => sqlx::query_as("SELECT id, org_id FROM workspaces WHERE id = ANY($1) AND status <> 'removed' ORDER BY id FOR KEY SHARE")
            .bind(&parents)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect(),
    };
    let verdicts: Vec<ApiResult<()>> = reqs
        .iter()
        .map(|r| match r.parent {
            Some(p) if !live_parents.contains(&(p, r.org.0)) => {
                Err(ApiError::bad("invalid_parent", "parent_id is not a workspace of your organization"))
            }
            _ => Ok(()),
        })
        .collect();
    let accepted: Vec<&CreateRequest> = reqs.iter().zip(&verdicts).filter(|(_, v)| v.is_ok()).map(|(r, _)| r).collect();
    let rows: Vec<Workspace> = sqlx::query_as(concat!(
        "INSERT INTO workspaces (id, org_id, parent_id, name, runtime, tier, status, delivery_mode) \
         SELECT id, org_id, parent_id, name, runtime, tier, status::workspace_status, delivery_mode::delivery_mode \
         FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::int2[], $7::text[], $8::text[]) \
              AS t(id, org_id, parent_id, name, runtime, tier, status, delivery_mode) \
         RETURNING ",
        ws_cols!()
    ))
    .bind(accepted.iter().map(|r| r.id).collect::<Vec<_>>())
    .bind(accepted.iter().map(|r| r.org.0).collect::<Vec<_>>())
    .bind(accepted.iter().map(|r| r.parent).collect::<Vec<_>>())
    .bind(accepted.iter().map(|r| r.name.as_str()).collect::<Vec<_>>())
    .bind(accepted.iter().map(|r| r.runtime.as_str()).collect::<Vec<_>>())
    .bind(accepted.iter().map(|r| r.tier).collect::<Vec<_>>())
    .bind(accepted.iter().map(|r| r.status.as_str()).collect::<Vec<_>>())
    .bind(accepted.iter().map(|r| r.delivery.as_str()).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await?;
    let mut rows: HashMap<Uuid, Workspace> = rows.into_iter().map(|w| (w.id, w)).collect();
    let provisioned: Vec<(Uuid, OrgId)> = accepted.iter().filter(|r| r.runtime != runtimes::EXTERNAL).map(|r| (r.id, r.org)).collect();
    let jobs: Vec<NewJob> = provisioned
        .iter()
        .map(|&(id, org)| {
            NewJob::new(JobKind::Provision, &serde_json::json!({ "workspace_id": id }))
                .org(org)
                .workspace(WorkspaceId(id))
                .announce_after_commit()
        })
        .collect();
    let job_ids: HashMap<Uuid, String> = match jobs.is_empty() {
        true => HashMap::new(),
        false => provisioned.iter().map(|p| p.0).zip(enqueue_many(&mut tx, &jobs).await?.into_iter().map(|j| j.to_string())).collect(),
    };
    let events: Vec<events::NewEvent> = accepted
        .iter()
        .map(|r| events::NewEvent {
            org: r.org,
            workspace: r.id,
            event_type: "WORKSPACE_CREATED",
            payload: serde_json::json!({ "runtime": r.runtime, "job_id": job_ids.get(&r.id) }),
        })
        .collect();
    events::record_many(&mut tx, &events).await?;
    tx.commit().await?;
    Ok(verdicts
        .into_iter()
        .zip(reqs)
        .map(|(v, r)| {
            v?;
            let workspace = rows.remove(&r.id).ok_or(ApiError::Internal)?;
            Ok(Created { workspace, job_id: job_ids.get(&r.id).cloned() })
        })
        .collect())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// 1–200, default 50.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous page.
    #[param(value_type = Option<uuid::Uuid>)]
    pub cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct WorkspacePage {
    pub items: Vec<Workspace>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

pub(crate) fn page_limit(limit: Option<i64>) -> ApiResult<i64> {
    match limit {
        None => Ok(50),
        Some(n) if (1..=200).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::bad("invalid_query", "limit must be between 1 and 200")),
    }
}

/// A2: this organization's workspaces (not removed), newest first.
#[utoipa::path(get, path = "/workspaces", params(ListQuery), tag = "workspaces", security(("bearer" = [])),
    responses(
        (status = 200, body = WorkspacePage),
        (status = 400, description = "bad query", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn list(State(st): State<AppState>, p: Principal, ApiQuery(q): ApiQuery<ListQuery>) -> ApiResult<Json<WorkspacePage>> {
    let limit = page_limit(q.limit)?;
    let cursor = match q.cursor.as_deref() {
        None => None,
        Some(c) => {
            let id: Uuid = c.parse().map_err(|_| ApiError::bad("invalid_cursor", "cursor is not one this API returned"))?;
            let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM workspaces WHERE id = $1 AND org_id = $2")
                .bind(id)
                .bind(p.org.0)
                .fetch_optional(&st.db)
                .await?;
            if found.is_none() {
                return Err(ApiError::bad("invalid_cursor", "cursor is not one this API returned"));
            }
            Some(id)
        }
    };
    let mut items: Vec<Workspace> = sqlx::query_as(ws_select!(
        "WHERE w.org_id = $1 AND ($2::uuid IS NULL OR w.id = $2) AND w.status <> 'removed' \
         AND ($3::uuid IS NULL OR (w.created_at, w.id) < (SELECT c.created_at, c.id FROM workspaces c WHERE c.id = $3)) \
         ORDER BY w.created_at DESC, w.id DESC LIMIT $4"
    ))
    .bind(p.org.0)
    .bind(p.workspace.map(|w| w.0))
    .bind(cursor)
    .bind(limit + 1)
    .fetch_all(&st.db)
    .await?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|w| w.id.to_string())
    } else {
        None
    };
    Ok(Json(WorkspacePage { items, next_cursor }))
}

/// The dashboard's listing: an org's workspaces (`Some`) or every org's, not removed,
/// most recently changed first.
pub(crate) async fn recent(db: &sqlx::PgPool, org: Option<molecule_domain::OrgId>, limit: i64) -> Result<Vec<Workspace>, sqlx::Error> {
    sqlx::query_as(ws_select!(
        "WHERE ($1::uuid IS NULL OR w.org_id = $1) AND w.status <> 'removed' ORDER BY w.updated_at DESC, w.id DESC LIMIT $2"
    ))
    .bind(org.map(|o| o.0))
    .bind(limit)
    .fetch_all(db)
    .await
}

async fn load(st: &AppState, p: &Principal, id: WorkspaceId) -> ApiResult<Workspace> {
    if !p.may_see(id) {
        return Err(ApiError::NotFound("workspace"));
    }
    let ws: Option<Workspace> =
        sqlx::query_as(ws_select!("WHERE w.id = $1 AND w.org_id = $2")).bind(id.0).bind(p.org.0).fetch_optional(&st.db).await?;
    ws.ok_or(ApiError::NotFound("workspace"))
}

/// A2: one workspace of the caller's organization (another org's id reads as not found).
#[utoipa::path(get, path = "/workspaces/{id}", tag = "workspaces", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path, description = "workspace id")),
    responses(
        (status = 200, body = Workspace),
        (status = 400, description = "malformed id", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn get(State(st): State<AppState>, p: Principal, Path(id): Path<String>) -> ApiResult<Json<Workspace>> {
    let id = parse_workspace_id(&id)?;
    Ok(Json(load(&st, &p, id).await?))
}

#[derive(Serialize, ToSchema)]
pub struct Removed {
    /// Workspaces this call marked removed (empty when they already were).
    pub removed: Vec<Uuid>,
    /// One stop job per removed workspace.
    pub job_ids: Vec<String>,
}

/// Locks a workspace and every descendant (removed ones too), in id order, the order a
/// create batch locks its parents in. A later pass of [`delete`]'s loop locks descendants
/// found since, which may sort before rows already held: a create batch can then be in a
/// deadlock with it, which PostgreSQL breaks (the delete is run again, a batch re-runs
/// its requests one by one).
const LOCK_TREE: &str = r#"
WITH RECURSIVE tree AS (
    SELECT id FROM workspaces WHERE id = $1 AND org_id = $2
    UNION
    SELECT w.id FROM workspaces w JOIN tree t ON w.parent_id = t.id WHERE w.org_id = $2
)
SELECT id FROM workspaces WHERE id IN (SELECT id FROM tree) ORDER BY id FOR UPDATE
"#;

/// The workspace and every descendant, in the caller's organization, that are not yet removed.
const REMOVE_TREE: &str = r#"
WITH RECURSIVE tree AS (
    SELECT id FROM workspaces WHERE id = $1 AND org_id = $2
    UNION
    SELECT w.id FROM workspaces w JOIN tree t ON w.parent_id = t.id WHERE w.org_id = $2
)
UPDATE workspaces SET status = 'removed', updated_at = now()
WHERE id IN (SELECT id FROM tree) AND status <> 'removed'
RETURNING id
"#;

/// A3: remove a workspace and all its descendants; one stop job each. Idempotent.
#[utoipa::path(delete, path = "/workspaces/{id}", tag = "workspaces", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path, description = "workspace id")),
    responses(
        (status = 202, body = Removed),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn delete(State(st): State<AppState>, p: Principal, Path(id): Path<String>) -> ApiResult<(StatusCode, Json<Removed>)> {
    let id = parse_workspace_id(&id)?;
    let org = p.require_org()?;
    // A deadlock's victim (503 busy: only a deadlock gives that here, nothing sets a lock
    // timeout) is rolled back whole: run again, a few times, before the caller hears of it.
    let mut tries = 0;
    let removed = loop {
        tries += 1;
        match remove_tree(&st, id, org).await {
            Err(ApiError::Busy) if tries < 3 => continue,
            r => break r?,
        }
    };
    Ok((StatusCode::ACCEPTED, Json(removed)))
}

async fn remove_tree(st: &AppState, id: WorkspaceId, org: OrgId) -> ApiResult<Removed> {
    let mut tx = st.db.begin().await?;
    // The whole tree is locked before it is marked, until no new descendant shows up: a
    // create under any of its workspaces either committed before (the next read sees its
    // child, which is locked and removed too) or waits for this delete and then finds its
    // parent removed (its parent check takes KEY SHARE). Locking the root alone left a
    // child created under a descendant live under a removed parent. Serializes concurrent
    // deletes of one tree too.
    let mut locked: HashSet<Uuid> = HashSet::new();
    loop {
        let tree: Vec<Uuid> = sqlx::query_scalar(LOCK_TREE).bind(id.0).bind(org.0).fetch_all(&mut *tx).await?;
        let before = locked.len();
        locked.extend(tree);
        if locked.len() == before {
            break;
        }
    }
    if !locked.contains(&id.0) {
        return Err(ApiError::NotFound("workspace"));
    }
    let removed: Vec<Uuid> = sqlx::query_scalar(REMOVE_TREE).bind(id.0).bind(org.0).fetch_all(&mut *tx).await?;
    // Their tokens die with them, in this transaction (not only through the `removed`
    // status in the lookup predicate).
    molecule_domain::tokens::revoke_tokens_of(&mut tx, &removed).await?;
    let mut job_ids = Vec::with_capacity(removed.len());
    for ws in &removed {
        let job = NewJob::new(JobKind::Stop, &serde_json::json!({ "workspace_id": ws, "reason": "delete" }))
            .org(org)
            .workspace(WorkspaceId(*ws))
            .announce_after_commit();
        let job_id = enqueue(&mut tx, &job).await?.to_string();
        record_event(&mut tx, org, *ws, "WORKSPACE_REMOVED", serde_json::json!({ "job_id": job_id, "root": id })).await?;
        job_ids.push(job_id);
    }
    tx.commit().await?;
    if !job_ids.is_empty() {
        st.announcer.announce(JobKind::Stop.queue());
    }
    tracing::info!(event = "workspace.removed", workspace_id = %id, org_id = %org, count = removed.len());
    Ok(Removed { removed, job_ids })
}

#[derive(Serialize, ToSchema)]
pub struct RestartQueued {
    pub job_id: String,
    /// True when a restart was already pending and is returned instead of a new one.
    pub coalesced: bool,
}

/// A4: queue a restart; a restart already pending for the workspace is returned instead.
#[utoipa::path(post, path = "/workspaces/{id}/restart", tag = "workspaces", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path, description = "workspace id")),
    responses(
        (status = 202, body = RestartQueued),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "removed or external workspace", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn restart(State(st): State<AppState>, p: Principal, Path(id): Path<String>) -> ApiResult<(StatusCode, Json<RestartQueued>)> {
    let id = parse_workspace_id(&id)?;
    let org = p.require_org()?;
    let mut tx = st.db.begin().await?;
    // The row lock makes concurrent restarts of one workspace take turns: the second sees
    // the first one's pending job.
    let row: Option<(WorkspaceStatus, String)> =
        sqlx::query_as("SELECT status, runtime FROM workspaces WHERE id = $1 AND org_id = $2 FOR UPDATE")
            .bind(id.0)
            .bind(org.0)
            .fetch_optional(&mut *tx)
            .await?;
    let (status, runtime) = row.ok_or(ApiError::NotFound("workspace"))?;
    if status == WorkspaceStatus::Removed {
        return Err(ApiError::Conflict { code: "workspace_removed", detail: "the workspace is removed".into() });
    }
    if runtime == runtimes::EXTERNAL {
        return Err(ApiError::Conflict {
            code: "not_restartable",
            detail: "external workspaces run elsewhere; restart their agent there".into(),
        });
    }
    let r = molecule_jobs::restarts::request(&mut tx, org, id, "requested").await?;
    tx.commit().await?;
    let job_id = r.job_id.to_string();
    if !r.coalesced {
        tracing::info!(event = "workspace.restart_requested", workspace_id = %id, org_id = %org, job_id);
    }
    Ok((StatusCode::ACCEPTED, Json(RestartQueued { job_id, coalesced: r.coalesced })))
}

#[derive(Serialize, ToSchema, sqlx::FromRow)]
pub struct Event {
    pub id: i64,
    pub event_type: String,
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// 1–200, default 50.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
}

/// Lifecycle events of a workspace (created, removed, restart requested …), newest first.
#[utoipa::path(get, path = "/workspaces/{id}/events", tag = "workspaces", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path, description = "workspace id"), EventsQuery),
    responses(
        (status = 200, body = Vec<Event>),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn events(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> ApiResult<Json<Vec<Event>>> {
    let id = parse_workspace_id(&id)?;
    let limit = page_limit(q.limit)?;
    load(&st, &p, id).await?;
    let rows: Vec<Event> = sqlx::query_as(
        "SELECT id, event_type, payload, created_at FROM structure_events \
         WHERE workspace_id = $1 AND org_id = $2 ORDER BY id DESC LIMIT $3",
    )
    .bind(id.0)
    .bind(p.org.0)
    .bind(limit)
    .fetch_all(&st.db)
    .await?;
    Ok(Json(rows))
}
