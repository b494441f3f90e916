//! A5: run a one-shot command in a workspace (X3): argv only, tier ≥ 3, timeout default
//! 30 s and at most 120 s. The API validates and enqueues; the exec pool runs it.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use molecule_domain::JobId;
use molecule_domain::activity::RecentMarks;
use molecule_domain::{OrgId, WorkspaceId, WorkspaceStatus};
use molecule_jobs::output;
use molecule_jobs::status::{self, JobStatus};
use molecule_jobs::{Announcer, JobKind, NewJob, enqueue_many};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::collections::HashMap;
use std::time::Duration;
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::Principal;
use crate::batch::{self, Batcher};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, parse_workspace_id};
use crate::streams::{Admission, Subscription};

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
/// With `Accept: application/x-ndjson` the answer instead streams the output as the
/// worker produces it — `{"stream":"stdout","data":…}` / `{"stream":"stderr",…}` — and
/// ends with `{"exit_code":n}`, or `{"error":"timeout","status":504}` when the command
/// was killed at its timeout.
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
        (status = 429, description = "the organization follows too many exec streams on this server", body = ErrorBody),
        (status = 503, description = "database unavailable, or busy (a lock wait timed out; retry)", body = ErrorBody),
    ))]
pub async fn exec(
    State(st): State<AppState>,
    p: Principal,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ExecBody>,
) -> ApiResult<Response> {
    let stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().starts_with("application/x-ndjson")));
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
    // Streams are capped per org: refuse before anything is queued.
    let admission = match stream {
        true => Some(st.streams.admit(org).ok_or_else(|| ApiError::TooManyRequests {
            code: "too_many_streams",
            detail: format!(
                "this organization already follows {} exec streams on this server; wait for one to end, or poll GET /jobs/{{id}} instead",
                st.streams.max_per_org()
            ),
        })?),
        false => None,
    };
    let job_id = st.execs.submit(ExecRequest { org, workspace: id, argv: body.argv, timeout_s }).await.ok_or(ApiError::Internal)??;
    // Subscribed before the follower's first read: what the job did before this moment is
    // read from the table, what it does after is announced to the subscription.
    let subscription = admission.as_ref().map(|_| st.streams.subscribe(job_id.as_str()));
    let (Some(admission), Some(subscription)) = (admission, subscription) else {
        return Ok((StatusCode::ACCEPTED, Json(ExecQueued { job_id: job_id.to_string(), timeout_s })).into_response());
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let follower = Follower {
        db: st.db.clone(),
        job: job_id.clone(),
        subscription,
        closing: st.streams.closing(),
        give_up_after: Duration::from_secs(timeout_s + 300),
        _admission: admission,
    };
    tokio::spawn(follower.run(tx));
    let body = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<Bytes, std::io::Error>(b), rx)) });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header("x-job-id", job_id.as_str())
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

/// An exec the route has validated; the batch checks its workspace and queues it.
pub struct ExecRequest {
    org: OrgId,
    workspace: WorkspaceId,
    argv: Vec<String>,
    timeout_s: u64,
}

pub type ExecBatcher = Batcher<ExecRequest, ApiResult<JobId>>;

/// The lanes queueing execs (crate::batch): one transaction a batch.
pub fn exec_batcher(db: PgPool, activity: RecentMarks, announcer: Announcer, lock_wait: std::time::Duration) -> ExecBatcher {
    Batcher::start(batch::lanes(), batch::MAX, move |reqs: Vec<ExecRequest>| {
        let (db, activity, announcer) = (db.clone(), activity.clone(), announcer.clone());
        async move {
            let out = batch::each_alone_if_refused(reqs, |r| Box::pin(queue_execs(db.clone(), activity.clone(), lock_wait, r))).await;
            if out.iter().any(Result::is_ok) {
                announcer.announce(JobKind::Exec.queue());
            }
            out
        }
    })
}

/// Checks each exec's workspace and queues the runnable ones, in one transaction.
async fn queue_execs(
    db: PgPool,
    activity: RecentMarks,
    lock_wait: std::time::Duration,
    reqs: &[ExecRequest],
) -> Result<Vec<ApiResult<JobId>>, sqlx::Error> {
    let mut tx = batch::begin(&db, lock_wait).await?;
    let ids: Vec<uuid::Uuid> = reqs.iter().map(|r| r.workspace.0).collect();
    let found: Vec<(uuid::Uuid, uuid::Uuid, i16, WorkspaceStatus)> =
        sqlx::query_as("SELECT id, org_id, tier, status FROM workspaces WHERE id = ANY($1)").bind(&ids).fetch_all(&mut *tx).await?;
    let found: HashMap<_, _> = found.into_iter().map(|(id, org, tier, status)| (id, (org, tier, status))).collect();
    let verdicts: Vec<ApiResult<()>> = reqs
        .iter()
        .map(|r| match found.get(&r.workspace.0) {
            Some(&(org, tier, status)) if org == r.org.0 => runnable(tier, status),
            _ => Err(ApiError::NotFound("workspace")),
        })
        .collect();
    let accepted: Vec<&ExecRequest> = reqs.iter().zip(&verdicts).filter(|(_, v)| v.is_ok()).map(|(r, _)| r).collect();
    // A command nobody ran within 5 minutes is stale: it expires instead of surprising anyone.
    let expires_at = Utc::now() + chrono::Duration::minutes(5);
    let jobs: Vec<NewJob> = accepted
        .iter()
        .map(|r| {
            let payload = serde_json::json!({
                "workspace_id": r.workspace, "argv": r.argv, "timeout_s": r.timeout_s, "actor": format!("org:{}", r.org),
            });
            NewJob::new(JobKind::Exec, &payload).org(r.org).workspace(r.workspace).expires_at(expires_at).announce_after_commit()
        })
        .collect();
    let mut job_ids = match jobs.is_empty() {
        true => Vec::new(),
        false => enqueue_many(&mut tx, &jobs).await?,
    }
    .into_iter();
    let mut active: Vec<WorkspaceId> = accepted.iter().map(|r| r.workspace).collect();
    active.sort_unstable_by_key(|w| w.0);
    active.dedup();
    // Noted as marked before the commit: a batch that fails leaves these unmarked for up
    // to a second (the hibernation sweeper reads it in minutes, not seconds).
    activity.mark_active(&mut tx, &active).await?;
    tx.commit().await?;
    Ok(verdicts.into_iter().map(|v| v.and_then(|()| job_ids.next().ok_or(ApiError::Internal))).collect())
}

/// Exec needs a tier 3 or 4 workspace that is running.
fn runnable(tier: i16, status: WorkspaceStatus) -> ApiResult<()> {
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
    Ok(())
}

fn frame(v: serde_json::Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

/// Resolves when the server starts shutting down (never, if the signal is gone).
async fn closed(closing: &mut tokio::sync::watch::Receiver<bool>) {
    if closing.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Follows one job's output until the job ends, then sends the final frame. The worker
/// can be any process: chunks and the job's outcome are read from PostgreSQL whenever
/// the shared listener announces something for this job (or once a second, should the
/// listener be down). Holds no connection while it waits; ends when its client goes away.
struct Follower {
    db: PgPool,
    job: JobId,
    subscription: Subscription,
    closing: tokio::sync::watch::Receiver<bool>,
    give_up_after: Duration,
    _admission: Admission,
}

impl Follower {
    async fn run(mut self, tx: tokio::sync::mpsc::Sender<Bytes>) {
        let deadline = tokio::time::Instant::now() + self.give_up_after;
        let mut last = 0i32;
        loop {
            let terminal = match status::get(&self.db, &self.job).await {
                Ok(v) => v.filter(|v| v.status.is_final()),
                Err(_) => None,
            };
            // Chunks are all written before the job's outcome is: read them after the status.
            // A failed read is not "no more output": the end frame waits for a read that works.
            let (chunks, terminal) = match output::read_after(&self.db, self.job.as_str(), last).await {
                Ok(chunks) => (chunks, terminal),
                Err(e) => {
                    tracing::warn!(job_id = %self.job, error = %e, "exec output read failed; following on");
                    (Vec::new(), None)
                }
            };
            for c in chunks {
                last = c.seq;
                if !self.send(&tx, deadline, serde_json::json!({ "stream": c.stream, "data": c.data })).await {
                    return; // the caller went away or stopped reading; the command still runs to its end
                }
            }
            if let Some(v) = terminal {
                let result = v.result.unwrap_or_default();
                let end = match (v.status, result["outcome"].as_str()) {
                    (JobStatus::Succeeded, Some("timeout")) => serde_json::json!({ "error": "timeout", "status": 504 }),
                    (JobStatus::Succeeded, _) => serde_json::json!({ "exit_code": result["exit_code"] }),
                    (s, _) => serde_json::json!({ "error": s.as_str(), "detail": v.last_error }),
                };
                self.send(&tx, deadline, end).await;
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                last_frame(&tx, serde_json::json!({ "error": "timeout", "status": 504 })).await;
                return;
            }
            tokio::select! {
                _ = self.subscription.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = tx.closed() => return,
                _ = closed(&mut self.closing) => {
                    last_frame(&tx, self.shutting_down()).await;
                    return;
                }
            }
        }
    }

    /// Sends a frame, waiting while the client reads slowly, but not past the deadline or
    /// the server's shutdown: a client that stops reading must not hold its admission (and
    /// this task) forever. False when the stream is over.
    async fn send(&mut self, tx: &tokio::sync::mpsc::Sender<Bytes>, deadline: tokio::time::Instant, v: serde_json::Value) -> bool {
        tokio::select! {
            r = tx.send(frame(v)) => r.is_ok(),
            _ = tokio::time::sleep_until(deadline) => false,
            _ = closed(&mut self.closing) => {
                last_frame(tx, self.shutting_down()).await;
                false
            }
        }
    }

    fn shutting_down(&self) -> serde_json::Value {
        serde_json::json!({
            "error": "server_shutting_down",
            "status": 503,
            "detail": format!("the command goes on; follow it with GET /jobs/{}", self.job),
        })
    }
}

/// A stream's final frame: given a second to get into the buffer, dropped if the client
/// is not reading.
async fn last_frame(tx: &tokio::sync::mpsc::Sender<Bytes>, v: serde_json::Value) {
    let _ = tokio::time::timeout(Duration::from_secs(1), tx.send(frame(v))).await;
}
