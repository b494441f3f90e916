//! J6 a2a_dispatch: delivers one queued message to its workspace's agent.
//!
//! Re-reads the queue row and the workspace (ids only in the payload), renders the
//! canonical request in the generation the agent speaks (learning it from the agent's
//! card the first time when the registration did not say), POSTs it with the platform
//! inbound secret as bearer, and writes the outcome on the queue row:
//!
//! - a JSON-RPC result → `completed`, the reply rendered for the caller's generation;
//!   a JSON-RPC error or any other HTTP status → `failed`, recorded as the agent said it;
//! - 502/503/504/521/522/523/524 → the backend is asked whether the workspace runs:
//!   definitely not → the workspace goes `offline`, one restart is queued (coalesced), the
//!   row is `failed` with `restarting: true`, `retry_after: 15`; running or unknown → the
//!   status is recorded unchanged (a live agent is never recycled on one 5xx);
//! - transport errors → retried with the job core's backoff until the attempts or the
//!   row's `expires_at` run out; X5 refusing the address → `failed` at once.
//!
//! Every attempt is recorded in the target's `activity_logs` (`a2a_dispatch`; request and
//! answer redacted and bounded).

use molecule_domain::a2a::normalize::render_request;
use molecule_domain::a2a::queue::{self, Outcome, QueueRow, QueueStatus};
use molecule_domain::a2a::{card, wire, AgentVersion, Operation};
use molecule_domain::activity::{self, NewActivity};
use molecule_domain::{OrgId, WorkspaceId, WorkspaceStatus};
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::{JobContext, JobError};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::client::{Answer, CallError};
use crate::provision::db_err;
use crate::Deps;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatchArgs {
    pub queue_id: Uuid,
}

/// Seconds a caller is told to wait when the agent was found dead and is restarting.
pub const RETRY_AFTER_SECS: i32 = 15;

/// Upstream statuses that may mean the agent itself is gone (seed 003: the origin-failure
/// family behind an edge, 521–524 included; 520 and 525 are not).
pub fn is_upstream_dead_status(status: u16) -> bool {
    matches!(status, 502 | 503 | 504 | 521 | 522 | 523 | 524)
}

/// Most of a request or answer kept in an activity row.
const MAX_LOGGED_BODY: usize = 64 * 1024;

#[derive(sqlx::FromRow)]
struct Agent {
    status: WorkspaceStatus,
    runtime: String,
    delivery_mode: String,
    url: Option<String>,
    assigned_url: Option<String>,
    a2a_version: Option<AgentVersion>,
    platform_inbound_secret: Option<String>,
}

async fn load_agent(d: &Deps, ws: Uuid, org: Uuid) -> Result<Option<Agent>, JobError> {
    sqlx::query_as(
        "SELECT status, runtime, delivery_mode::text AS delivery_mode, url, assigned_url, a2a_version, platform_inbound_secret \
         FROM workspaces WHERE id = $1 AND org_id = $2",
    )
    .bind(ws)
    .bind(org)
    .fetch_optional(&d.db)
    .await
    .map_err(db_err)
}

pub async fn run(d: &Deps, ctx: &JobContext, a: DispatchArgs) -> HandlerResult {
    let Some(row) = queue::load(&d.db, a.queue_id).await.map_err(db_err)? else {
        return Ok(json!({ "skipped": "the queue row no longer exists" }));
    };
    if row.status == QueueStatus::Expired {
        finish(d, &row, QueueStatus::Expired, None, None, Some("expired before it could be delivered"), None).await?;
        return Ok(json!({ "status": "expired" }));
    }
    if row.status.is_final() {
        return Ok(json!({ "skipped": format!("already {}", row.status.as_str()) }));
    }
    let agent = match load_agent(d, row.workspace_id, row.org_id).await? {
        Some(a) if a.status != WorkspaceStatus::Removed => a,
        _ => {
            finish(d, &row, QueueStatus::Failed, None, None, Some("the target workspace was removed"), None).await?;
            return Ok(json!({ "status": "failed", "reason": "workspace removed" }));
        }
    };
    if !queue::start_attempt(&d.db, row.queue_id).await.map_err(db_err)? {
        // Expired (or finished) between the read and now.
        finish(d, &row, QueueStatus::Expired, None, None, Some("expired before it could be delivered"), None).await?;
        return Ok(json!({ "status": "expired" }));
    }
    let operation = Operation::of_method(row.body["method"].as_str().unwrap_or_default()).map(|(op, _)| op).unwrap_or(Operation::SendMessage);
    let caller_id = row.body.get("id").cloned().unwrap_or(Value::Null);

    if agent.delivery_mode == "poll" {
        // The workspace switched to poll mode after this was queued: into its inbox.
        return deliver_to_inbox(d, &row, &agent, operation, &caller_id).await;
    }
    let Some(url) = agent.url.clone() else {
        return retry(d, ctx, &row, "the agent has not registered a URL yet").await;
    };
    let Some(secret) = agent.platform_inbound_secret.clone() else {
        return retry(d, ctx, &row, "the workspace has no platform inbound secret yet (its agent has not registered)").await;
    };
    let trusted = agent.assigned_url.as_deref() == Some(url.as_str());
    let version = match agent.a2a_version {
        Some(v) => v,
        None => match learn_version(d, &row, &url, trusted).await {
            Ok(v) => v,
            Err(CallError::Refused(r)) => return refused(d, &row, r).await,
            Err(CallError::Transport(e)) => return retry(d, ctx, &row, &format!("reading the agent's card: {e}")).await,
        },
    };
    let request = render_request(&caller_id, operation, &row.body["params"], version);
    let headers: &[(&str, &str)] = match version {
        AgentVersion::V10 => &[("A2A-Version", "1.0")],
        AgentVersion::V03 => &[],
    };
    let body = serde_json::to_vec(&request).unwrap_or_default();
    match d.agents.post(&url, trusted, &secret, headers, body).await {
        Err(CallError::Refused(r)) => {
            record(d, &row, &request, None, "refused").await?;
            refused(d, &row, r).await
        }
        Err(CallError::Transport(e)) => {
            record(d, &row, &request, None, "transport_error").await?;
            retry(d, ctx, &row, &e).await
        }
        Ok(answer) => {
            let reply: Option<Value> = serde_json::from_slice(&answer.body).ok();
            record(d, &row, &request, reply.as_ref(), &answer.status.to_string()).await?;
            answered(d, &row, &agent, operation, version, &caller_id, answer, reply).await
        }
    }
}

/// The agent answered over HTTP: a reply, a JSON-RPC error, or an HTTP error.
#[allow(clippy::too_many_arguments)]
async fn answered(
    d: &Deps,
    row: &QueueRow,
    agent: &Agent,
    op: Operation,
    version: AgentVersion,
    caller_id: &Value,
    answer: Answer,
    reply: Option<Value>,
) -> HandlerResult {
    let status = answer.status;
    let for_caller = row.caller_generation().reply_version();
    if (200..300).contains(&status) {
        let Some(reply) = reply.filter(|r| r.get("result").is_some() || r.get("error").is_some()) else {
            let why = format!("the agent answered HTTP {status} with a body that is not a JSON-RPC response");
            finish(d, row, QueueStatus::Failed, Some(status), None, Some(&why), Some(version)).await?;
            return Ok(json!({ "status": "failed", "response_status": status }));
        };
        let rendered = wire::reply_to(&reply, op, for_caller, caller_id);
        if let Some(e) = reply.get("error") {
            let why = format!(
                "the agent answered JSON-RPC error {}: {}",
                e.get("code").map(Value::to_string).unwrap_or_default(),
                molecule_domain::text::head(e.get("message").and_then(Value::as_str).unwrap_or(""), 500)
            );
            finish(d, row, QueueStatus::Failed, Some(status), Some(&rendered), Some(&why), Some(version)).await?;
            return Ok(json!({ "status": "failed", "response_status": status }));
        }
        finish(d, row, QueueStatus::Completed, Some(status), Some(&rendered), None, Some(version)).await?;
        tracing::info!(event = "a2a.dispatched", queue_id = %row.queue_id, workspace_id = %row.workspace_id,
            org_id = %row.org_id, agent_version = version.as_str(), status);
        return Ok(json!({ "status": "completed", "response_status": status }));
    }
    if is_upstream_dead_status(status) && agent.runtime != molecule_domain::runtimes::EXTERNAL {
        let ws = WorkspaceId(row.workspace_id);
        let (running, unsure) = d.backend.is_running(ws).await;
        if !running && unsure.is_none() {
            return agent_is_dead(d, row, status, version).await;
        }
    }
    let rendered = reply.as_ref().filter(|r| r.get("error").is_some()).map(|r| wire::reply_to(r, op, for_caller, caller_id));
    let why = format!("the agent answered HTTP {status}");
    finish(d, row, QueueStatus::Failed, Some(status), rendered.as_ref(), Some(&why), Some(version)).await?;
    Ok(json!({ "status": "failed", "response_status": status }))
}

/// A 5xx from an agent whose instance is definitely not running: the workspace goes
/// offline and one restart is queued, in one transaction; the caller is told to retry.
async fn agent_is_dead(d: &Deps, row: &QueueRow, status: u16, version: AgentVersion) -> HandlerResult {
    let org = OrgId(row.org_id);
    let ws = WorkspaceId(row.workspace_id);
    let mut tx = d.db.begin().await.map_err(db_err)?;
    let current: Option<WorkspaceStatus> =
        sqlx::query_scalar("SELECT status FROM workspaces WHERE id = $1 AND org_id = $2 FOR UPDATE")
            .bind(ws.0)
            .bind(org.0)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?;
    let mut restart_job = None;
    if let Some(current) = current.filter(|s| *s != WorkspaceStatus::Removed) {
        if matches!(current, WorkspaceStatus::Online | WorkspaceStatus::Degraded) {
            sqlx::query("UPDATE workspaces SET status = 'offline', updated_at = now() WHERE id = $1")
                .bind(ws.0)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            molecule_domain::events::record(&mut tx, org, ws.0, "WORKSPACE_OFFLINE",
                json!({ "reason": "agent_unreachable", "upstream_status": status }))
                .await
                .map_err(db_err)?;
        }
        let r = molecule_jobs::restarts::request(&mut tx, org, ws, "agent_unreachable").await.map_err(db_err)?;
        restart_job = Some(r.job_id.to_string());
    }
    tx.commit().await.map_err(db_err)?;
    let why = format!("the agent answered HTTP {status} and its workspace is not running: a restart is queued");
    queue::finish(
        &d.db,
        row.queue_id,
        &Outcome {
            status: QueueStatus::Failed,
            response_status: Some(status as i32),
            response_body: None,
            last_error: Some(&why),
            restarting: true,
            retry_after_secs: Some(RETRY_AFTER_SECS),
            agent_version: Some(version),
        },
    )
    .await
    .map_err(db_err)?;
    tracing::warn!(event = "a2a.agent_dead", queue_id = %row.queue_id, workspace_id = %ws, org_id = %org, status,
        restart_job = ?restart_job, "agent unreachable and not running: offline, restart queued");
    Ok(json!({ "status": "failed", "restarting": true, "restart_job_id": restart_job }))
}

/// Reads the agent's card (`/.well-known/agent-card.json`, then `agent.json`) and records
/// the generation it announces; 0.3 when no card can be read (recorded as the default).
/// A transport failure is not recorded: the next attempt reads again.
async fn learn_version(d: &Deps, row: &QueueRow, url: &str, trusted: bool) -> Result<AgentVersion, CallError> {
    let origin = card::origin(url).unwrap_or(url);
    let mut found = None;
    for path in card::CARD_PATHS {
        let answer = d.agents.get(&format!("{origin}{path}"), trusted).await?;
        if answer.status == 200 {
            if let Some(v) = serde_json::from_slice::<Value>(&answer.body).ok().as_ref().and_then(card::version_of) {
                found = Some(v);
                break;
            }
        }
    }
    let (version, source) = match found {
        Some(v) => (v, "card"),
        None => (AgentVersion::V03, "default"),
    };
    // Only where nothing is known yet: a registration that said otherwise meanwhile wins.
    let _ = sqlx::query(
        "UPDATE workspaces SET a2a_version = $2, a2a_version_source = $3 WHERE id = $1 AND a2a_version IS NULL",
    )
    .bind(row.workspace_id)
    .bind(version)
    .bind(source)
    .execute(&d.db)
    .await;
    tracing::info!(event = "a2a.version_learned", workspace_id = %row.workspace_id, version = version.as_str(), source);
    Ok(version)
}

async fn deliver_to_inbox(d: &Deps, row: &QueueRow, agent: &Agent, op: Operation, caller_id: &Value) -> HandlerResult {
    let version = agent.a2a_version.unwrap_or(AgentVersion::V03);
    let request = render_request(caller_id, op, &row.body["params"], version);
    let mut tx = d.db.begin().await.map_err(db_err)?;
    let id = activity::record(
        &mut tx,
        &NewActivity {
            org: OrgId(row.org_id),
            workspace: WorkspaceId(row.workspace_id),
            kind: activity::A2A_RECEIVE,
            source_id: row.caller_id.map(|c| c.to_string()),
            method: Some(op.method(version)),
            request_body: Some(&request),
            response_body: None,
            status: Some("queued"),
            queue_id: Some(row.queue_id),
        },
    )
    .await
    .map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    // The row stays `dispatched`: delivered to the inbox, where no reply comes back through the queue.
    Ok(json!({ "status": "dispatched", "inbox_activity_id": id }))
}

/// A transport failure: retried with backoff; on the last attempt the row is `failed`.
async fn retry(d: &Deps, ctx: &JobContext, row: &QueueRow, why: &str) -> HandlerResult {
    if ctx.attempt >= ctx.max_attempts {
        let last = format!("not delivered after {} attempts: {why}", ctx.attempt);
        finish(d, row, QueueStatus::Failed, None, None, Some(&last), None).await?;
    } else {
        queue::retry_later(&d.db, row.queue_id, why).await.map_err(db_err)?;
    }
    Err(JobError::Retryable(why.to_string()))
}

async fn refused(d: &Deps, row: &QueueRow, r: molecule_domain::ssrf::Refused) -> HandlerResult {
    let why = format!("the agent's URL is refused: {r}");
    finish(d, row, QueueStatus::Failed, None, None, Some(&why), None).await?;
    tracing::warn!(event = "a2a.refused", queue_id = %row.queue_id, workspace_id = %row.workspace_id, reason = %r);
    Err(JobError::Permanent(why))
}

async fn finish(
    d: &Deps,
    row: &QueueRow,
    status: QueueStatus,
    response_status: Option<u16>,
    response: Option<&Value>,
    last_error: Option<&str>,
    version: Option<AgentVersion>,
) -> Result<(), JobError> {
    queue::finish(
        &d.db,
        row.queue_id,
        &Outcome {
            status,
            response_status: response_status.map(i32::from),
            response_body: response,
            last_error,
            restarting: false,
            retry_after_secs: None,
            agent_version: version,
        },
    )
    .await
    .map_err(db_err)?;
    Ok(())
}

/// One `a2a_dispatch` activity row for an attempt.
async fn record(d: &Deps, row: &QueueRow, request: &Value, answer: Option<&Value>, status: &str) -> Result<(), JobError> {
    let redactor = d.redactor.as_deref();
    let request = logged(request, redactor);
    let answer = answer.map(|a| logged(a, redactor));
    let mut tx = d.db.begin().await.map_err(db_err)?;
    activity::record(
        &mut tx,
        &NewActivity {
            org: OrgId(row.org_id),
            workspace: WorkspaceId(row.workspace_id),
            kind: activity::A2A_DISPATCH,
            source_id: row.caller_id.map(|c| c.to_string()),
            method: request.get("method").and_then(Value::as_str),
            request_body: Some(&request),
            response_body: answer.as_ref(),
            status: Some(status),
            queue_id: Some(row.queue_id),
        },
    )
    .await
    .map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    Ok(())
}

/// A body as an activity row keeps it: every string redacted (X4), at most 64 KiB. With
/// no redactor nothing of it is kept (fail closed).
fn logged(v: &Value, redactor: Option<&molecule_domain::redact::Redactor>) -> Value {
    let Some(r) = redactor else {
        return json!({ "omitted": "no redactor configured" });
    };
    let v = redact_strings(v, r);
    let text = v.to_string();
    if text.len() <= MAX_LOGGED_BODY {
        return v;
    }
    json!({ "truncated": true, "bytes": text.len(), "head": molecule_domain::text::head(&text, MAX_LOGGED_BODY) })
}

fn redact_strings(v: &Value, r: &molecule_domain::redact::Redactor) -> Value {
    match v {
        Value::String(s) => Value::String(r.redact(s).into_owned()),
        Value::Array(a) => Value::Array(a.iter().map(|x| redact_strings(x, r)).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, x)| (k.clone(), redact_strings(x, r))).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seed 003's matrix: seven statuses mean "maybe dead", eleven do not (520 and 525
    /// look like an edge's but mean other failures).
    #[test]
    fn upstream_dead_statuses() {
        for s in [502, 503, 504, 521, 522, 523, 524] {
            assert!(is_upstream_dead_status(s), "{s}");
        }
        for s in [200, 201, 400, 401, 403, 404, 429, 500, 501, 520, 525] {
            assert!(!is_upstream_dead_status(s), "{s}");
        }
    }

    #[test]
    fn logged_bodies_are_redacted_and_bounded() {
        let r = molecule_domain::redact::Redactor::new();
        let secret = format!("sk-{}", "a".repeat(40));
        let v = json!({"params": {"message": {"parts": [{"kind": "text", "text": format!("key is {secret}")}]}}});
        let out = logged(&v, Some(&r));
        assert!(!out.to_string().contains(&secret));
        assert!(out.to_string().contains("[REDACTED]"));
        let big = json!({"text": "x".repeat(200 * 1024)});
        let out = logged(&big, Some(&r));
        assert_eq!(out["truncated"], true);
        assert!(out.to_string().len() < 70 * 1024);
        assert_eq!(logged(&v, None), json!({"omitted": "no redactor configured"}));
    }
}
