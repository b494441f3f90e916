//! The `a2a_queue` table: one row per push delivery (A9), read back by `queue_id` (A10),
//! written by the dispatcher (J6) and the TTL sweep (S6). Every statement on it is here.
//!
//! A row's life: `queued` → `dispatched` while a delivery attempt is in flight (back to
//! `queued` when it fails in transport and will be retried) → `completed` (the agent
//! answered a result), `failed` (it answered an error or an HTTP error, or attempts ran
//! out) or `expired` (its `expires_at` passed before it was delivered). A `queued` row past
//! its `expires_at` reads as `expired` at once, before the sweep writes it.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{AgentVersion, Generation};
use crate::{OrgId, WorkspaceId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum QueueStatus {
    Queued,
    Dispatched,
    Completed,
    Failed,
    Expired,
}

impl QueueStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueStatus::Queued => "queued",
            QueueStatus::Dispatched => "dispatched",
            QueueStatus::Completed => "completed",
            QueueStatus::Failed => "failed",
            QueueStatus::Expired => "expired",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, QueueStatus::Completed | QueueStatus::Failed | QueueStatus::Expired)
    }
}

impl TryFrom<String> for QueueStatus {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Ok(match s.as_str() {
            "queued" => QueueStatus::Queued,
            "dispatched" => QueueStatus::Dispatched,
            "completed" => QueueStatus::Completed,
            "failed" => QueueStatus::Failed,
            "expired" => QueueStatus::Expired,
            other => return Err(format!("unknown a2a_queue status {other:?}")),
        })
    }
}

/// A message to queue for push delivery.
pub struct NewMessage<'a> {
    pub org: OrgId,
    /// The target workspace.
    pub workspace: WorkspaceId,
    /// The sending workspace; None for org-token callers (the canvas).
    pub caller: Option<WorkspaceId>,
    /// The method as the caller sent it.
    pub method: &'a str,
    /// The canonical (v0.3) JSON-RPC request.
    pub body: &'a serde_json::Value,
    pub idempotency_key: Option<&'a str>,
    pub expires_at: Option<DateTime<Utc>>,
    pub caller_generation: Generation,
}

/// A new row, or the row an earlier request with the same idempotency key made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    New(Uuid),
    Existing(Uuid),
}

const INSERT: &str = r#"
INSERT INTO a2a_queue (org_id, workspace_id, caller_id, method, body, idempotency_key, expires_at, caller_generation)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (workspace_id, COALESCE(caller_id, '00000000-0000-0000-0000-000000000000'::uuid), idempotency_key)
    WHERE idempotency_key IS NOT NULL
DO NOTHING
RETURNING queue_id
"#;

/// Inserts the row unless the caller already sent this idempotency key to this target.
/// Run it in the transaction that enqueues the dispatch job.
pub async fn insert(conn: &mut PgConnection, m: &NewMessage<'_>) -> Result<Inserted, sqlx::Error> {
    let id: Option<Uuid> = sqlx::query_scalar(INSERT)
        .bind(m.org.0)
        .bind(m.workspace.0)
        .bind(m.caller.map(|c| c.0))
        .bind(m.method)
        .bind(m.body)
        .bind(m.idempotency_key)
        .bind(m.expires_at)
        .bind(m.caller_generation.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    if let Some(id) = id {
        return Ok(Inserted::New(id));
    }
    let existing: Uuid = sqlx::query_scalar(
        "SELECT queue_id FROM a2a_queue WHERE workspace_id = $1 AND caller_id IS NOT DISTINCT FROM $2 AND idempotency_key = $3",
    )
    .bind(m.workspace.0)
    .bind(m.caller.map(|c| c.0))
    .bind(m.idempotency_key)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Inserted::Existing(existing))
}

pub async fn set_job(conn: &mut PgConnection, queue_id: Uuid, job_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE a2a_queue SET job_id = $2 WHERE queue_id = $1").bind(queue_id).bind(job_id).execute(conn).await?;
    Ok(())
}

/// A queue row as callers and the dispatcher read it. `status` is the effective one: a
/// `queued` row past its `expires_at` is `expired`.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct QueueRow {
    pub queue_id: Uuid,
    pub org_id: Uuid,
    pub workspace_id: Uuid,
    pub caller_id: Option<Uuid>,
    pub method: String,
    pub body: serde_json::Value,
    #[sqlx(try_from = "String")]
    pub status: QueueStatus,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub response_body: Option<serde_json::Value>,
    pub response_status: Option<i32>,
    pub restarting: bool,
    pub retry_after_secs: Option<i32>,
    pub caller_generation: String,
    pub agent_version: Option<AgentVersion>,
    pub job_id: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub dispatched_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl QueueRow {
    pub fn caller_generation(&self) -> Generation {
        Generation::parse(&self.caller_generation).unwrap_or(Generation::V03)
    }
}

macro_rules! select_row {
    ($where:literal) => {
        concat!(
            "SELECT queue_id, org_id, workspace_id, caller_id, method, body, \
             CASE WHEN status = 'queued' AND expires_at <= now() THEN 'expired' ELSE status END AS status, \
             attempts, last_error, response_body, response_status, restarting, retry_after_secs, caller_generation, \
             agent_version, job_id, expires_at, created_at, updated_at, dispatched_at, completed_at \
             FROM a2a_queue ",
            $where
        )
    };
}

/// A10: the row, if `ws` is its target or its caller, within `org`. Whether the caller may
/// see it is the route's decision (the no-leak rule).
pub async fn get_for(db: &PgPool, org: OrgId, ws: WorkspaceId, queue_id: Uuid) -> Result<Option<QueueRow>, sqlx::Error> {
    sqlx::query_as(select_row!("WHERE queue_id = $1 AND org_id = $2 AND (workspace_id = $3 OR caller_id = $3)"))
        .bind(queue_id)
        .bind(org.0)
        .bind(ws.0)
        .fetch_optional(db)
        .await
}

/// The row a dispatch job delivers.
pub async fn load(db: &PgPool, queue_id: Uuid) -> Result<Option<QueueRow>, sqlx::Error> {
    sqlx::query_as(select_row!("WHERE queue_id = $1")).bind(queue_id).fetch_optional(db).await
}

/// [`load`] inside a transaction.
pub async fn load_in(conn: &mut PgConnection, queue_id: Uuid) -> Result<Option<QueueRow>, sqlx::Error> {
    sqlx::query_as(select_row!("WHERE queue_id = $1")).bind(queue_id).fetch_optional(conn).await
}

/// A delivery attempt starts: counted, and `dispatched` while it is in flight. False when
/// the row is no longer deliverable (final, or expired).
pub async fn start_attempt(db: &PgPool, queue_id: Uuid) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        "UPDATE a2a_queue SET status = 'dispatched', attempts = attempts + 1, dispatched_at = now(), updated_at = now() \
         WHERE queue_id = $1 AND status IN ('queued', 'dispatched') AND (expires_at IS NULL OR expires_at > now())",
    )
    .bind(queue_id)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// The attempt failed in transport and will be retried: `queued` again, with why.
pub async fn retry_later(conn: &mut PgConnection, queue_id: Uuid, error: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE a2a_queue SET status = 'queued', last_error = $2, updated_at = now() \
         WHERE queue_id = $1 AND status IN ('queued', 'dispatched')",
    )
    .bind(queue_id)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(())
}

/// How a delivery ended.
pub struct Outcome<'a> {
    pub status: QueueStatus,
    pub response_status: Option<i32>,
    /// The agent's reply, rendered for the caller.
    pub response_body: Option<&'a serde_json::Value>,
    pub last_error: Option<&'a str>,
    pub restarting: bool,
    pub retry_after_secs: Option<i32>,
    pub agent_version: Option<AgentVersion>,
}

/// Writes a final outcome; never over another final one (a row the sweep expired stays
/// expired). True when written.
pub async fn finish(conn: &mut PgConnection, queue_id: Uuid, o: &Outcome<'_>) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        "UPDATE a2a_queue SET status = $2, response_status = $3, response_body = $4, \
         last_error = CASE WHEN $2 = 'completed' THEN NULL ELSE COALESCE($5, last_error) END, \
         restarting = $6, retry_after_secs = $7, agent_version = COALESCE($8, agent_version), \
         completed_at = now(), updated_at = now() \
         WHERE queue_id = $1 AND status IN ('queued', 'dispatched')",
    )
    .bind(queue_id)
    .bind(o.status.as_str())
    .bind(o.response_status)
    .bind(o.response_body)
    .bind(o.last_error)
    .bind(o.restarting)
    .bind(o.retry_after_secs)
    .bind(o.agent_version)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Rows not final whose dispatch job may have ended without writing them (an attempt cut
/// off by a shutdown, then expired or out of attempts): `(queue_id, job_id)` of rows not
/// touched for `idle_secs`, oldest first.
pub async fn unsettled(db: &PgPool, idle_secs: i64, batch: i64) -> Result<Vec<(Uuid, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT queue_id, job_id FROM a2a_queue WHERE status IN ('queued', 'dispatched') AND job_id IS NOT NULL \
         AND updated_at < now() - make_interval(secs => $1) ORDER BY updated_at LIMIT $2",
    )
    .bind(idle_secs)
    .bind(batch)
    .fetch_all(db)
    .await
}

/// Settles a row whose job ended without an outcome: `expired` when its TTL has passed or
/// its job expired, else `failed` with why. Never over a final status.
pub async fn settle(db: &PgPool, queue_id: Uuid, job_expired: bool, why: &str) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        "UPDATE a2a_queue SET status = CASE WHEN $2 OR expires_at <= now() THEN 'expired' ELSE 'failed' END, \
         last_error = COALESCE(last_error || '; ', '') || $3, completed_at = now(), updated_at = now() \
         WHERE queue_id = $1 AND status IN ('queued', 'dispatched')",
    )
    .bind(queue_id)
    .bind(job_expired)
    .bind(why)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// S6: rows still waiting past their `expires_at` → `expired`, at most `batch` at a time
/// (the sweep loops until none are left). Returns how many were expired.
pub async fn expire_due(db: &PgPool, batch: i64) -> Result<u64, sqlx::Error> {
    // The partial index on expires_at WHERE status = 'queued' serves the inner SELECT.
    Ok(sqlx::query(
        "UPDATE a2a_queue SET status = 'expired', last_error = COALESCE(last_error, 'expired before it could be delivered'), \
         updated_at = now() \
         WHERE queue_id = ANY(ARRAY(SELECT queue_id FROM a2a_queue WHERE status = 'queued' AND expires_at <= now() \
                                    ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED))",
    )
    .bind(batch)
    .execute(db)
    .await?
    .rows_affected())
}

/// S7: finished rows (completed, failed, expired) untouched for `older_than`, in batches.
pub async fn prune_finished(db: &PgPool, older_than: std::time::Duration, batch: i64) -> Result<u64, sqlx::Error> {
    crate::db::delete_in_batches(
        db,
        "DELETE FROM a2a_queue WHERE queue_id IN \
         (SELECT queue_id FROM a2a_queue WHERE status IN ('completed', 'failed', 'expired') \
            AND updated_at < now() - make_interval(secs => $1) ORDER BY updated_at LIMIT $2)",
        older_than,
        batch,
    )
    .await
}
