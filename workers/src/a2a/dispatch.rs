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
//!   definitely not → a serving workspace goes `offline` with one restart queued
//!   (coalesced), and the row is `failed` with `restarting: true`, `retry_after: 15`;
//!   running or unknown → the status is recorded unchanged (a live agent is never
//!   recycled on one 5xx);
//! - transport errors → retried with the job core's backoff until the attempts or the
//!   row's `expires_at` run out; X5 refusing the address → `failed` at once;
//! - a workspace still starting (`provisioning`: a first start or a restart whose agent
//!   has not registered yet) → nothing sent, retried like a transport error: its `url` is
//!   the previous instance's, no longer the one the platform assigned.
//!
//! Every attempt is recorded in the target's `activity_logs` (`a2a_dispatch`; request and
//! answer redacted and bounded), in the transaction that writes its outcome.
//!
//! Delivery is at least once: an attempt cut off after the agent got the message (a
//! crash, a shutdown past its grace) is sent again. The message's `messageId` is the same
//! on every attempt, for agents that deduplicate.

use molecule_domain::a2a::normalize::render_request;
use molecule_domain::a2a::queue::{self, Outcome, QueueRow, QueueStatus};
use molecule_domain::a2a::{AgentVersion, Operation, card, wire};
use molecule_domain::activity::{self, NewActivity};
use molecule_domain::{OrgId, WorkspaceId, WorkspaceStatus};
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::{JobContext, JobError};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::client::CallError;
use crate::Deps;
use crate::provision::db_err;

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
    a2a_version_source: Option<String>,
    platform_inbound_secret: Option<String>,
}

async fn load_agent(d: &Deps, ws: Uuid, org: Uuid) -> Result<Option<Agent>, JobError> {
    sqlx::query_as(
        "SELECT status, runtime, delivery_mode::text AS delivery_mode, url, assigned_url, a2a_version, a2a_version_source, \
         platform_inbound_secret FROM workspaces WHERE id = $1 AND org_id = $2",
    )
    .bind(ws)
    .bind(org)
    .fetch_optional(&d.db)
    .await
    .map_err(db_err)
}

/// What an attempt sent and got, for its activity row.
struct Attempt<'a> {
    request: &'a Value,
    answer: Option<&'a Value>,
    /// The HTTP status, or `transport_error` / `refused`.
    label: String,
}

/// How a delivery ends, before it is written.
struct Ending<'a> {
    status: QueueStatus,
    response_status: Option<u16>,
    response: Option<&'a Value>,
    last_error: Option<String>,
    restarting: bool,
    version: Option<AgentVersion>,
}

impl<'a> Ending<'a> {
    fn new(status: QueueStatus) -> Self {
        Ending { status, response_status: None, response: None, last_error: None, restarting: false, version: None }
    }
    fn error(mut self, why: impl Into<String>) -> Self {
        self.last_error = Some(why.into());
        self
    }
}

pub async fn run(d: &Deps, ctx: &JobContext, a: DispatchArgs) -> HandlerResult {
    let Some(row) = queue::load(&d.db, a.queue_id).await.map_err(db_err)? else {
        return Ok(json!({ "skipped": "the queue row no longer exists" }));
    };
    if row.status == QueueStatus::Expired {
        conclude(d, &row, None, Ending::new(QueueStatus::Expired).error("expired before it could be delivered")).await?;
        return Ok(json!({ "status": "expired" }));
    }
    if row.status.is_final() {
        return Ok(json!({ "skipped": format!("already {}", row.status.as_str()) }));
    }
    let agent = match load_agent(d, row.workspace_id, row.org_id).await? {
        Some(a) if a.status != WorkspaceStatus::Removed => a,
        _ => {
            conclude(d, &row, None, Ending::new(QueueStatus::Failed).error("the target workspace was removed")).await?;
            return Ok(json!({ "status": "failed", "reason": "workspace removed" }));
        }
    };
    if !queue::start_attempt(&d.db, row.queue_id).await.map_err(db_err)? {
        // Expired (or finished) between the read and now.
        conclude(d, &row, None, Ending::new(QueueStatus::Expired).error("expired before it could be delivered")).await?;
        return Ok(json!({ "status": "expired" }));
    }
    let operation =
        Operation::of_method(row.body["method"].as_str().unwrap_or_default()).map(|(op, _)| op).unwrap_or(Operation::SendMessage);
    let caller_id = row.body.get("id").cloned().unwrap_or(Value::Null);

    if agent.delivery_mode == "poll" {
        // The workspace switched to poll mode after this was queued: into its inbox.
        return deliver_to_inbox(d, &row, &agent, operation, &caller_id).await;
    }
    if agent.status == WorkspaceStatus::Provisioning {
        // A start is under way (J1, or J3 from a user, S4 or the dead-agent path below) and
        // its agent has not registered (that flips the row online). A restart has written
        // the new `assigned_url` already, so the old `url` is untrusted now: X5 would
        // refuse its loopback or private address for good, and that port may be free or
        // another workspace's. The message waits for the new agent instead.
        return retry(d, ctx, &row, None, "the workspace is starting; its agent has not registered yet").await;
    }
    let Some(url) = agent.url.clone() else {
        return retry(d, ctx, &row, None, "the agent has not registered a URL yet").await;
    };
    let Some(secret) = agent.platform_inbound_secret.clone() else {
        return retry(d, ctx, &row, None, "the workspace has no platform inbound secret yet (its agent has not registered)").await;
    };
    let trusted = agent.assigned_url.as_deref() == Some(url.as_str());
    let (version, defaulted) = match agent.a2a_version {
        Some(v) => (v, agent.a2a_version_source.as_deref() == Some("default")),
        None => match learn_version(d, &row, &url, trusted).await {
            Ok(Some(v)) => (v, false),
            Ok(None) => (AgentVersion::V03, true),
            Err(CallError::Refused(r)) => return refused(d, &row, None, r).await,
            Err(CallError::Transport(e)) => return retry(d, ctx, &row, None, &format!("reading the agent's card: {e}")).await,
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
            let attempt = Attempt { request: &request, answer: None, label: "refused".into() };
            refused(d, &row, Some(attempt), r).await
        }
        Err(CallError::Transport(e)) => {
            let attempt = Attempt { request: &request, answer: None, label: "transport_error".into() };
            retry(d, ctx, &row, Some(attempt), &e).await
        }
        Ok(answer) => {
            let reply: Option<Value> = serde_json::from_slice(&answer.body).ok();
            let attempt = Attempt { request: &request, answer: reply.as_ref(), label: answer.status.to_string() };
            let sent = Sent { agent: &agent, op: operation, version, defaulted, caller_id: &caller_id };
            answered(d, ctx, &row, &sent, attempt, answer.status, reply.as_ref()).await
        }
    }
}

/// What was sent, to whom, in which generation.
struct Sent<'a> {
    agent: &'a Agent,
    op: Operation,
    version: AgentVersion,
    /// The version was a default (no card said it): a "method not found" may mean the
    /// agent speaks the other generation.
    defaulted: bool,
    caller_id: &'a Value,
}

/// The agent answered over HTTP: a reply, a JSON-RPC error, or an HTTP error.
async fn answered(
    d: &Deps,
    ctx: &JobContext,
    row: &QueueRow,
    sent: &Sent<'_>,
    attempt: Attempt<'_>,
    status: u16,
    reply: Option<&Value>,
) -> HandlerResult {
    let for_caller = row.caller_generation().reply_version();
    let ending = |s: QueueStatus| Ending { response_status: Some(status), version: Some(sent.version), ..Ending::new(s) };
    if (200..300).contains(&status) {
        let Some(reply) = reply.filter(|r| r.get("result").is_some() || r.get("error").is_some()) else {
            let why = format!("the agent answered HTTP {status} with a body that is not a JSON-RPC response");
            conclude(d, row, Some(attempt), ending(QueueStatus::Failed).error(why)).await?;
            return Ok(json!({ "status": "failed", "response_status": status }));
        };
        let rendered = wire::reply_to(reply, sent.op, for_caller, sent.caller_id);
        if let Some(e) = reply.get("error") {
            let code = e.get("code").and_then(Value::as_i64);
            if code == Some(-32601) && sent.defaulted {
                // Sent in a generation nobody announced, and the agent does not know the
                // method: forget the default and read its card again next attempt.
                forget_default_version(d, row).await?;
                return retry(d, ctx, row, Some(attempt), "the agent does not know this method in A2A 0.3; reading its card again").await;
            }
            let message = e.get("message").and_then(Value::as_str).unwrap_or("");
            let why = format!(
                "the agent answered JSON-RPC error {}: {}",
                code.map(|c| c.to_string()).unwrap_or_default(),
                redacted(d, message, 500)
            );
            conclude(d, row, Some(attempt), Ending { response: Some(&rendered), ..ending(QueueStatus::Failed) }.error(why)).await?;
            return Ok(json!({ "status": "failed", "response_status": status }));
        }
        conclude(d, row, Some(attempt), Ending { response: Some(&rendered), ..ending(QueueStatus::Completed) }).await?;
        tracing::info!(event = "a2a.dispatched", queue_id = %row.queue_id, workspace_id = %row.workspace_id,
            org_id = %row.org_id, agent_version = sent.version.as_str(), status);
        return Ok(json!({ "status": "completed", "response_status": status }));
    }
    if is_upstream_dead_status(status) && sent.agent.runtime != molecule_domain::runtimes::EXTERNAL {
        let (running, unsure) = d.backend.is_running(WorkspaceId(row.workspace_id)).await;
        if !running && unsure.is_none() {
            return agent_is_dead(d, row, attempt, status, sent.version).await;
        }
    }
    let rendered = reply.filter(|r| r.get("error").is_some()).map(|r| wire::reply_to(r, sent.op, for_caller, sent.caller_id));
    let why = format!("the agent answered HTTP {status}");
    conclude(d, row, Some(attempt), Ending { response: rendered.as_ref(), ..ending(QueueStatus::Failed) }.error(why)).await?;
    Ok(json!({ "status": "failed", "response_status": status }))
}

/// A 5xx from an agent whose instance is definitely not running. Only a workspace that
/// was serving (`online`, `degraded`) is marked `offline` with a restart queued; one
/// already `offline` gets the waiting restart (coalesced); one `provisioning` is being
/// (re)started already. A `failed` workspace is kept for rescue and a hibernated one
/// stays asleep: no restart, the status is recorded as is. All in one transaction with
/// the row's outcome.
async fn agent_is_dead(d: &Deps, row: &QueueRow, attempt: Attempt<'_>, status: u16, version: AgentVersion) -> HandlerResult {
    let org = OrgId(row.org_id);
    let ws = WorkspaceId(row.workspace_id);
    let mut tx = d.db.begin().await.map_err(db_err)?;
    let current: Option<WorkspaceStatus> = sqlx::query_scalar("SELECT status FROM workspaces WHERE id = $1 AND org_id = $2 FOR UPDATE")
        .bind(ws.0)
        .bind(org.0)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
    let mut restart_job = None;
    let restarting = match current {
        Some(WorkspaceStatus::Online | WorkspaceStatus::Degraded) => {
            sqlx::query("UPDATE workspaces SET status = 'offline', updated_at = now() WHERE id = $1 AND status IN ('online', 'degraded')")
                .bind(ws.0)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            molecule_domain::events::record(
                &mut tx,
                org,
                ws.0,
                "WORKSPACE_OFFLINE",
                json!({ "reason": "agent_unreachable", "upstream_status": status }),
            )
            .await
            .map_err(db_err)?;
            true
        }
        Some(WorkspaceStatus::Offline) => true,
        Some(WorkspaceStatus::Provisioning) => true,
        _ => false,
    };
    if matches!(current, Some(WorkspaceStatus::Online | WorkspaceStatus::Degraded | WorkspaceStatus::Offline)) {
        let r = molecule_jobs::restarts::request(&mut tx, org, ws, "agent_unreachable").await.map_err(db_err)?;
        restart_job = Some(r.job_id.to_string());
    }
    let ending = Ending { response_status: Some(status), restarting, version: Some(version), ..Ending::new(QueueStatus::Failed) };
    let ending = if restarting {
        ending.error(format!("the agent answered HTTP {status} and its workspace is not running: it is being restarted"))
    } else {
        let state = current.map(|s| s.as_str()).unwrap_or("gone");
        ending.error(format!("the agent answered HTTP {status}; its workspace is {state} and is not restarted automatically"))
    };
    write_ending(&mut tx, row, Some(attempt), &ending, d.redactor.as_deref()).await?;
    tx.commit().await.map_err(db_err)?;
    tracing::warn!(event = "a2a.agent_dead", queue_id = %row.queue_id, workspace_id = %ws, org_id = %org, status,
        restarting, restart_job = ?restart_job, "agent unreachable and not running");
    Ok(json!({ "status": "failed", "restarting": restarting, "restart_job_id": restart_job }))
}

/// Reads the agent's card (`/.well-known/agent-card.json`, then `agent.json`) and records
/// the generation it announces. None when no card says one: recorded as the default 0.3
/// only when both paths answered 404 (there is no card); any other answer is not
/// recorded, so the next delivery reads again (an agent still starting up is not pinned
/// to a guess).
async fn learn_version(d: &Deps, row: &QueueRow, url: &str, trusted: bool) -> Result<Option<AgentVersion>, CallError> {
    let origin = card::origin(url).unwrap_or(url);
    let mut found = None;
    let mut no_card = true;
    for path in card::CARD_PATHS {
        let answer = d.agents.get(&format!("{origin}{path}"), trusted).await?;
        no_card &= answer.status == 404;
        if answer.status == 200 {
            if let Some(v) = serde_json::from_slice::<Value>(&answer.body).ok().as_ref().and_then(card::version_of) {
                found = Some(v);
                break;
            }
        }
    }
    let (version, source) = match (found, no_card) {
        (Some(v), _) => (v, "card"),
        (None, true) => (AgentVersion::V03, "default"),
        (None, false) => return Ok(None),
    };
    // Only where nothing is known yet: a registration that said otherwise meanwhile wins.
    sqlx::query("UPDATE workspaces SET a2a_version = $2, a2a_version_source = $3 WHERE id = $1 AND a2a_version IS NULL")
        .bind(row.workspace_id)
        .bind(version)
        .bind(source)
        .execute(&d.db)
        .await
        .map_err(|e| CallError::Transport(format!("recording the agent's version: {e}")))?;
    tracing::info!(event = "a2a.version_learned", workspace_id = %row.workspace_id, version = version.as_str(), source);
    Ok(found)
}

async fn forget_default_version(d: &Deps, row: &QueueRow) -> Result<(), JobError> {
    sqlx::query("UPDATE workspaces SET a2a_version = NULL, a2a_version_source = NULL WHERE id = $1 AND a2a_version_source = 'default'")
        .bind(row.workspace_id)
        .execute(&d.db)
        .await
        .map_err(db_err)?;
    Ok(())
}

/// The workspace switched to poll mode after the message was queued: it goes to the
/// inbox (once, however often this runs: keyed by the queue row) and the row completes.
async fn deliver_to_inbox(d: &Deps, row: &QueueRow, agent: &Agent, op: Operation, caller_id: &Value) -> HandlerResult {
    let version = agent.a2a_version.unwrap_or(AgentVersion::V03);
    let request = render_request(caller_id, op, &row.body["params"], version);
    let key = format!("queue:{}", row.queue_id);
    let mut tx = d.db.begin().await.map_err(db_err)?;
    let recorded = activity::record(
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
            idempotency_key: Some(&key),
            expires_at: row.expires_at,
        },
    )
    .await
    .map_err(db_err)?;
    let ending = Ending { version: Some(version), ..Ending::new(QueueStatus::Completed) }
        .error(format!("handed to the workspace's poll inbox (activity {}); replies do not come back through this queue", recorded.id));
    write_ending(&mut tx, row, None, &ending, None).await?;
    tx.commit().await.map_err(db_err)?;
    Ok(json!({ "status": "completed", "inbox_activity_id": recorded.id }))
}

/// A transport failure: retried with backoff; on the last attempt the row is `failed`.
async fn retry(d: &Deps, ctx: &JobContext, row: &QueueRow, attempt: Option<Attempt<'_>>, why: &str) -> HandlerResult {
    let mut tx = d.db.begin().await.map_err(db_err)?;
    if let Some(a) = &attempt {
        record(&mut tx, row, a, d.redactor.as_deref()).await?;
    }
    if ctx.attempt >= ctx.max_attempts {
        let last = format!("not delivered after {} attempts: {why}", ctx.attempt);
        write_ending(&mut tx, row, None, &Ending::new(QueueStatus::Failed).error(last), None).await?;
    } else {
        queue::retry_later(&mut tx, row.queue_id, why).await.map_err(db_err)?;
    }
    tx.commit().await.map_err(db_err)?;
    Err(JobError::retryable("agent_unreachable", why))
}

async fn refused(d: &Deps, row: &QueueRow, attempt: Option<Attempt<'_>>, r: molecule_domain::ssrf::Refused) -> HandlerResult {
    let why = format!("the agent's URL is refused: {r}");
    conclude(d, row, attempt, Ending::new(QueueStatus::Failed).error(why.clone())).await?;
    tracing::warn!(event = "a2a.refused", queue_id = %row.queue_id, workspace_id = %row.workspace_id, reason = %r);
    Err(JobError::permanent("agent_url_refused", why))
}

/// Writes an attempt's activity row and the delivery's outcome in one transaction: an
/// answer the agent gave is never recorded without its outcome (which would send the
/// message again on the retry that follows a failed write).
async fn conclude(d: &Deps, row: &QueueRow, attempt: Option<Attempt<'_>>, ending: Ending<'_>) -> Result<(), JobError> {
    let mut tx = d.db.begin().await.map_err(db_err)?;
    write_ending(&mut tx, row, attempt, &ending, d.redactor.as_deref()).await?;
    tx.commit().await.map_err(db_err)
}

async fn write_ending(
    conn: &mut sqlx::PgConnection,
    row: &QueueRow,
    attempt: Option<Attempt<'_>>,
    e: &Ending<'_>,
    redactor: Option<&molecule_domain::redact::Redactor>,
) -> Result<(), JobError> {
    if let Some(a) = &attempt {
        record(&mut *conn, row, a, redactor).await?;
    }
    queue::finish(
        conn,
        row.queue_id,
        &Outcome {
            status: e.status,
            response_status: e.response_status.map(i32::from),
            response_body: e.response,
            last_error: e.last_error.as_deref(),
            restarting: e.restarting,
            retry_after_secs: e.restarting.then_some(RETRY_AFTER_SECS),
            agent_version: e.version,
        },
    )
    .await
    .map_err(db_err)?;
    Ok(())
}

/// An agent's words, redacted and bounded, for `last_error`.
fn redacted(d: &Deps, text: &str, max: usize) -> String {
    match d.redactor.as_deref() {
        // Redacted whole, then cut.
        Some(r) => molecule_domain::text::head(&r.redact(text), max).to_string(),
        None => "(not shown: no redactor configured)".into(),
    }
}

/// One `a2a_dispatch` activity row for an attempt.
async fn record(
    conn: &mut sqlx::PgConnection,
    row: &QueueRow,
    a: &Attempt<'_>,
    redactor: Option<&molecule_domain::redact::Redactor>,
) -> Result<(), JobError> {
    let request = logged(a.request, redactor);
    let answer = a.answer.map(|v| logged(v, redactor));
    activity::record(
        conn,
        &NewActivity {
            org: OrgId(row.org_id),
            workspace: WorkspaceId(row.workspace_id),
            kind: activity::A2A_DISPATCH,
            source_id: row.caller_id.map(|c| c.to_string()),
            method: a.request.get("method").and_then(Value::as_str),
            request_body: Some(&request),
            response_body: answer.as_ref(),
            status: Some(&a.label),
            queue_id: Some(row.queue_id),
            idempotency_key: None,
            expires_at: None,
        },
    )
    .await
    .map_err(db_err)?;
    Ok(())
}

/// A body as an activity row keeps it: redacted as JSON text — so a secret-named key
/// sees its value (`{"password": "…"}`) — at most 64 KiB. With no redactor nothing of it
/// is kept (fail closed).
fn logged(v: &Value, redactor: Option<&molecule_domain::redact::Redactor>) -> Value {
    let Some(r) = redactor else {
        return json!({ "omitted": "no redactor configured" });
    };
    let text = v.to_string();
    let redacted = r.redact(&text);
    if redacted.len() <= MAX_LOGGED_BODY {
        // A rule that ran to a line's end may have taken a closing quote with it: then
        // the redacted text is kept as text.
        if let Ok(v) = serde_json::from_str::<Value>(&redacted) {
            return v;
        }
        return json!({ "redacted_text": redacted });
    }
    json!({ "truncated": true, "bytes": redacted.len(), "head": molecule_domain::text::head(&redacted, MAX_LOGGED_BODY) })
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
        let v = json!({"params": {"message": {"parts": [{"kind": "text", "text": format!("key is {secret}")}]}},
                       "metadata": {"password": "hunter2hunter2", "Authorization": "Basic dXNlcjpwYXNz"}});
        let out = logged(&v, Some(&r));
        assert!(!out.to_string().contains(&secret));
        assert!(!out.to_string().contains("hunter2hunter2"), "a secret-named key's value: {out}");
        assert!(!out.to_string().contains("dXNlcjpwYXNz"), "{out}");
        assert_eq!(out["metadata"]["password"], "[REDACTED]", "still JSON: {out}");
        let big = json!({"text": "x".repeat(200 * 1024)});
        let out = logged(&big, Some(&r));
        assert_eq!(out["truncated"], true);
        assert!(out.to_string().len() < 70 * 1024);
        assert_eq!(logged(&v, None), json!({"omitted": "no redactor configured"}));
    }
}
