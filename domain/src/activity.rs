//! The `activity_logs` table: a workspace's inbox and record of A2A traffic. Poll-mode
//! agents read their messages from it (`a2a_receive` rows, A9) with a `since_id` cursor
//! (A11); the dispatcher records each push delivery (`a2a_dispatch`, J6). Every statement
//! on it is here.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{OrgId, WorkspaceId};

/// A poll-mode workspace's incoming message (the agent reads and answers it).
pub const A2A_RECEIVE: &str = "a2a_receive";
/// A push delivery's request and the agent's answer (bodies bounded and redacted).
pub const A2A_DISPATCH: &str = "a2a_dispatch";

pub struct NewActivity<'a> {
    pub org: OrgId,
    pub workspace: WorkspaceId,
    pub kind: &'a str,
    /// Who sent it: the caller workspace's id, or None (an org token: the canvas).
    pub source_id: Option<String>,
    pub method: Option<&'a str>,
    pub request_body: Option<&'a serde_json::Value>,
    pub response_body: Option<&'a serde_json::Value>,
    pub status: Option<&'a str>,
    pub queue_id: Option<Uuid>,
    /// A repeat with the same key (same sender, same workspace) adds nothing.
    pub idempotency_key: Option<&'a str>,
    /// Past this the row is no longer listed (a poll-mode message's TTL).
    pub expires_at: Option<DateTime<Utc>>,
}

/// The row written, or the one an earlier call with the same idempotency key wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub id: i64,
    pub duplicate: bool,
}

/// Appends a row; returns its id. Rows of one workspace get their ids in commit order: the
/// insert first takes a per-workspace transaction lock, so a `since_id` reader can never
/// see a later id commit before an earlier one and skip it. Call it inside a transaction
/// (the lock is held to its end).
pub async fn record(conn: &mut PgConnection, a: &NewActivity<'_>) -> Result<Recorded, sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('molecule.activity.' || $1::text, 0))")
        .bind(a.workspace.0)
        .execute(&mut *conn)
        .await?;
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO activity_logs (workspace_id, org_id, type, source_id, method, request_body, response_body, status, \
                                    queue_id, idempotency_key, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
         ON CONFLICT (workspace_id, COALESCE(source_id, ''), idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING \
         RETURNING id",
    )
    .bind(a.workspace.0)
    .bind(a.org.0)
    .bind(a.kind)
    .bind(&a.source_id)
    .bind(a.method)
    .bind(a.request_body)
    .bind(a.response_body)
    .bind(a.status)
    .bind(a.queue_id)
    .bind(a.idempotency_key)
    .bind(a.expires_at)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(id) = id {
        return Ok(Recorded { id, duplicate: false });
    }
    let id = sqlx::query_scalar(
        "SELECT id FROM activity_logs WHERE workspace_id = $1 AND COALESCE(source_id, '') = COALESCE($2, '') AND idempotency_key = $3",
    )
    .bind(a.workspace.0)
    .bind(&a.source_id)
    .bind(a.idempotency_key)
    .fetch_one(conn)
    .await?;
    Ok(Recorded { id, duplicate: true })
}

/// Records that these workspaces did something asked of them now (an A2A message to or
/// from them, an exec): S5 hibernates only workspaces idle since. Run it in the
/// transaction that records the request.
///
/// At most once a second per workspace: the update holds the workspace's row until its
/// transaction commits, so every request to a busy workspace waited for the previous
/// one's commit (64 clients exec'ing on one workspace: 249 requests/s). A second is far
/// below any hibernation idle time.
///
/// A row another transaction holds is skipped, not waited for: the mark is best effort
/// (the workspace's next request marks it), and the API's execs are written in batches
/// (api/src/batch.rs) that a wait here would hold up, every org's with them.
pub async fn mark_active(conn: &mut PgConnection, workspaces: &[WorkspaceId]) -> Result<(), sqlx::Error> {
    let ids: Vec<Uuid> = workspaces.iter().map(|w| w.0).collect();
    sqlx::query(
        "UPDATE workspaces w SET last_active_at = now() \
         FROM (SELECT id FROM workspaces WHERE id = ANY($1) \
               AND (last_active_at IS NULL OR last_active_at < now() - interval '1 second') \
               FOR NO KEY UPDATE SKIP LOCKED) due \
         WHERE w.id = due.id",
    )
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(())
}

/// Which workspaces this process marked active within the last second. Consulted before
/// [`mark_active`], it spares the statement (and the wait for the row, which a marking
/// transaction holds until it commits) for all but one request a second per workspace
/// and process; the statement's own predicate still keeps processes from writing more.
#[derive(Clone, Default)]
pub struct RecentMarks {
    marked: std::sync::Arc<std::sync::Mutex<Marked>>,
}

#[derive(Default)]
struct Marked {
    at: std::collections::HashMap<Uuid, std::time::Instant>,
    /// When stale entries were last forgotten: at most once a [`RecentMarks::FOR`].
    swept: Option<std::time::Instant>,
}

impl RecentMarks {
    /// How long a mark spares further ones.
    pub const FOR: std::time::Duration = std::time::Duration::from_secs(1);
    /// Past this many remembered workspaces, those older than [`Self::FOR`] are forgotten.
    const KEEP: usize = 4096;

    /// Those of `workspaces` not marked by this process within the last second, noted as
    /// marked at `now`. Noted before the marking transaction commits: if it rolls back,
    /// the workspace's requests of the next second (committed or not) leave no mark — a
    /// second of activity unrecorded, far below any hibernation idle time.
    pub fn due(&self, workspaces: &[WorkspaceId], now: std::time::Instant) -> Vec<WorkspaceId> {
        let mut guard = self.marked.lock().unwrap_or_else(|p| p.into_inner());
        let marked = &mut *guard;
        let sweep_due = marked.swept.is_none_or(|s| now.saturating_duration_since(s) >= Self::FOR);
        if marked.at.len() > Self::KEEP && sweep_due {
            marked.at.retain(|_, at| now.saturating_duration_since(*at) < Self::FOR);
            marked.swept = Some(now);
        }
        let marked = &mut marked.at;
        let mut due = Vec::new();
        for ws in workspaces {
            match marked.get(&ws.0) {
                Some(at) if now.saturating_duration_since(*at) < Self::FOR => {}
                _ => {
                    marked.insert(ws.0, now);
                    due.push(*ws);
                }
            }
        }
        due
    }

    /// [`mark_active`] for those of `workspaces` this process has not marked within the
    /// last second (see [`Self::due`]); no statement when there are none.
    pub async fn mark_active(&self, conn: &mut PgConnection, workspaces: &[WorkspaceId]) -> Result<(), sqlx::Error> {
        let due = self.due(workspaces, std::time::Instant::now());
        if due.is_empty() {
            return Ok(());
        }
        mark_active(conn, &due).await
    }
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Activity {
    pub id: i64,
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub kind: String,
    pub source_id: Option<String>,
    pub method: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub request_body: Option<serde_json::Value>,
    #[schema(value_type = Option<Object>)]
    pub response_body: Option<serde_json::Value>,
    pub status: Option<String>,
    pub queue_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
}

/// A11's filters, already validated.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub kind: Option<String>,
    pub source: Option<String>,
    pub limit: i64,
    pub since_secs: Option<i64>,
    pub since_id: Option<i64>,
}

pub enum Page {
    Rows(Vec<Activity>),
    /// The `since_id` cursor is not one of this workspace's rows (never was, pruned, or
    /// another workspace's): 410, the same answer for each, so nothing leaks.
    CursorGone,
}

macro_rules! activity_select {
    () => {
        "SELECT id, type, source_id, method, request_body, response_body, status, queue_id, created_at FROM activity_logs \
         WHERE workspace_id = $1 AND org_id = $2 \
           AND ($3::text IS NULL OR type = $3) AND ($4::text IS NULL OR source_id = $4) \
           AND ($5::bigint IS NULL OR created_at >= now() - make_interval(secs => $5)) \
           AND ($6::bigint IS NULL OR id > $6) AND (expires_at IS NULL OR expires_at > now())"
    };
}

/// A11: without `since_id`, the newest rows first; with it, the rows strictly after it in
/// ascending order (the order they were written).
pub async fn list(db: &PgPool, org: OrgId, ws: WorkspaceId, f: &Filter) -> Result<Page, sqlx::Error> {
    // 0 is no row's id: it reads from the first row.
    if let Some(cursor) = f.since_id.filter(|c| *c > 0) {
        let known: Option<i64> = sqlx::query_scalar("SELECT id FROM activity_logs WHERE id = $1 AND workspace_id = $2 AND org_id = $3")
            .bind(cursor)
            .bind(ws.0)
            .bind(org.0)
            .fetch_optional(db)
            .await?;
        if known.is_none() {
            return Ok(Page::CursorGone);
        }
    }
    // Two statements rather than one ORDER BY CASE: each walks the (workspace_id, id)
    // index in its own direction and stops at the limit.
    let sql = if f.since_id.is_some() {
        concat!(activity_select!(), " ORDER BY id ASC LIMIT $7")
    } else {
        concat!(activity_select!(), " ORDER BY id DESC LIMIT $7")
    };
    let rows = sqlx::query_as(sql)
        .bind(ws.0)
        .bind(org.0)
        .bind(&f.kind)
        .bind(&f.source)
        .bind(f.since_secs)
        .bind(f.since_id)
        .bind(f.limit)
        .fetch_all(db)
        .await?;
    Ok(Page::Rows(rows))
}

/// S7: rows older than `older_than`, in batches; returns how many.
pub async fn prune(db: &PgPool, older_than: std::time::Duration, batch: i64) -> Result<u64, sqlx::Error> {
    crate::db::delete_in_batches(
        db,
        "DELETE FROM activity_logs WHERE id IN \
         (SELECT id FROM activity_logs WHERE created_at < now() - make_interval(secs => $1) ORDER BY created_at LIMIT $2)",
        older_than,
        batch,
    )
    .await
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use crate::testing::fresh_db;

    async fn at(conn: &mut PgConnection, ws: Uuid) -> Option<chrono::DateTime<chrono::Utc>> {
        sqlx::query_scalar("SELECT last_active_at FROM workspaces WHERE id = $1").bind(ws).fetch_one(conn).await.unwrap()
    }

    #[test]
    fn recent_marks_spare_a_workspace_for_a_second() {
        let marks = RecentMarks::default();
        let (a, b) = (WorkspaceId(Uuid::new_v4()), WorkspaceId(Uuid::new_v4()));
        let t0 = std::time::Instant::now();
        assert_eq!(marks.due(&[a], t0), vec![a]);
        assert_eq!(marks.due(&[a, b], t0 + std::time::Duration::from_millis(500)), vec![b], "a was marked half a second ago");
        assert_eq!(marks.due(&[a, b], t0 + std::time::Duration::from_millis(1000)), vec![a], "a's second is over; b's is not");
        // Beyond KEEP entries the stale ones go; the fresh ones stay remembered.
        let later = t0 + std::time::Duration::from_secs(5);
        for _ in 0..=RecentMarks::KEEP {
            marks.due(&[WorkspaceId(Uuid::new_v4())], later);
        }
        let fresh = WorkspaceId(Uuid::new_v4());
        marks.due(&[fresh], later);
        assert!(marks.due(&[fresh], later).is_empty());
        assert!(marks.marked.lock().unwrap().at.len() <= RecentMarks::KEEP + 3);
    }

    /// Once a second at most: a busy workspace's requests do not queue on its row.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn activity_is_marked_at_most_once_a_second() {
        let (db, _) = fresh_db().await;
        let mut conn = db.acquire().await.unwrap();
        let (org, _) = crate::tokens::create_org(&mut conn, "acme").await.unwrap();
        let ws: Uuid = sqlx::query_scalar(
            "INSERT INTO workspaces (org_id, name, runtime, tier, status) VALUES ($1, 'w', 'echo', 3, 'online') RETURNING id",
        )
        .bind(org.0)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        mark_active(&mut conn, &[WorkspaceId(ws)]).await.unwrap();
        let first = at(&mut conn, ws).await.expect("marked: it never was");
        mark_active(&mut conn, &[WorkspaceId(ws)]).await.unwrap();
        assert_eq!(at(&mut conn, ws).await, Some(first), "within the second: not written again");
        backdate(&mut conn, ws).await;
        let old = at(&mut conn, ws).await;
        mark_active(&mut conn, &[WorkspaceId(ws)]).await.unwrap();
        assert!(at(&mut conn, ws).await > old, "older than a second: marked again");

        // A row another transaction holds is skipped at once, not waited for.
        backdate(&mut conn, ws).await;
        let old = at(&mut conn, ws).await;
        let mut holder = db.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM workspaces WHERE id = $1 FOR UPDATE").bind(ws).execute(&mut *holder).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), mark_active(&mut conn, &[WorkspaceId(ws)]))
            .await
            .expect("skipped, not waited for")
            .unwrap();
        holder.rollback().await.unwrap();
        assert_eq!(at(&mut conn, ws).await, old, "the held row was left for the next mark");
    }

    /// Marked two seconds ago: older than the mark's one-second threshold.
    async fn backdate(conn: &mut PgConnection, ws: Uuid) {
        sqlx::query("UPDATE workspaces SET last_active_at = now() - interval '2 seconds' WHERE id = $1")
            .bind(ws)
            .execute(conn)
            .await
            .unwrap();
    }
}
