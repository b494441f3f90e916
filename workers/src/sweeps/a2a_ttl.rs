//! S6 A2A TTL: queued messages past their `expires_at` → `expired`, in batches. Lookups
//! already read such rows as expired; this writes it down (and ends their wait). It also
//! settles rows whose dispatch job ended without writing them — an attempt cut off by a
//! shutdown and then expired, or lost with its last attempt — so no row stays
//! `dispatched` forever.

use molecule_domain::a2a::queue;
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::{JobContext, JobError, JobStatus, status};

/// A row untouched this long is checked against its job (an attempt in flight updates
/// its row when it starts and when it ends; agents may take minutes in between).
const SETTLE_AFTER_SECS: i64 = 60;

pub const NAME: &str = "a2a_ttl";

/// Rows per statement.
const BATCH: i64 = 1000;

pub async fn run(ctx: &JobContext) -> HandlerResult {
    let fail = |e: sqlx::Error| JobError::retryable("database", format!("a2a ttl sweep failed: {e}"));
    let expired = expire_all(&ctx.db).await.map_err(fail)?;
    let settled = settle_ended(&ctx.db, SETTLE_AFTER_SECS).await.map_err(fail)?;
    tracing::info!(event = "sweep.a2a_ttl", expired, settled, job_id = %ctx.id, "expired A2A messages past their TTL");
    Ok(serde_json::json!({ "expired": expired, "settled": settled }))
}

/// Rows idle for `idle_secs` whose dispatch job has ended: expired or failed, with why.
pub async fn settle_ended(db: &sqlx::PgPool, idle_secs: i64) -> Result<u64, sqlx::Error> {
    let rows = queue::unsettled(db, idle_secs, BATCH).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let ids: Vec<String> = rows.iter().map(|(_, j)| j.clone()).collect();
    let ended: std::collections::HashMap<String, JobStatus> = status::ended(db, &ids).await?.into_iter().collect();
    let mut settled = 0;
    for (queue_id, job_id) in rows {
        if let Some(s) = ended.get(&job_id) {
            let why = format!("its delivery job ended {} without an answer", s.as_str());
            settled += u64::from(queue::settle(db, queue_id, *s == JobStatus::Expired, &why).await?);
        }
    }
    Ok(settled)
}

/// Expires every due row, a batch at a time; returns how many.
pub async fn expire_all(db: &sqlx::PgPool) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let n = queue::expire_due(db, BATCH).await?;
        total += n;
        if n < BATCH as u64 {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use molecule_domain::testing::fresh_db;

    /// S6's predicate against a real PostgreSQL: only `queued` rows past `expires_at` flip;
    /// rows with time left, without a TTL, or already final are left as they are.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_queued_rows_past_their_ttl_expire() {
        let (db, _) = fresh_db().await;
        let ws: uuid::Uuid = sqlx::query_scalar(
            "WITH o AS (INSERT INTO organizations (name) VALUES ('o') RETURNING id) \
             INSERT INTO workspaces (org_id, name, runtime, tier) SELECT id, 'w', 'echo', 2 FROM o RETURNING id",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        // expires: seconds from now (negative: past), or None for no TTL.
        let add = |status: &'static str, expires: Option<f64>| {
            let db = db.clone();
            async move {
                sqlx::query_scalar::<_, uuid::Uuid>(
                    "INSERT INTO a2a_queue (org_id, workspace_id, method, body, status, expires_at) \
                     SELECT org_id, id, 'message/send', '{}', $2, now() + make_interval(secs => $3) FROM workspaces WHERE id = $1 \
                     RETURNING queue_id",
                )
                .bind(ws)
                .bind(status)
                .bind(expires)
                .fetch_one(&db)
                .await
                .unwrap()
            }
        };
        let due = add("queued", Some(-1.0)).await;
        let later = add("queued", Some(3600.0)).await;
        let no_ttl = add("queued", None).await;
        let done = add("completed", Some(-1.0)).await;
        // A second due row, to see the batches add up.
        let due2 = add("queued", Some(-60.0)).await;

        // Read as expired before the sweep writes it.
        let row = queue::load(&db, due).await.unwrap().unwrap();
        assert_eq!(row.status, queue::QueueStatus::Expired);

        assert_eq!(expire_all(&db).await.unwrap(), 2);
        for (id, want) in [(due, "expired"), (due2, "expired"), (later, "queued"), (no_ttl, "queued"), (done, "completed")] {
            let s: String = sqlx::query_scalar("SELECT status FROM a2a_queue WHERE queue_id = $1").bind(id).fetch_one(&db).await.unwrap();
            assert_eq!(s, want, "row {id}");
        }
        assert_eq!(expire_all(&db).await.unwrap(), 0, "a second sweep finds nothing");

        // Rows whose dispatch job ended without writing them: settled; a row whose job is
        // still waiting is left alone.
        let job = |db: sqlx::PgPool| async move {
            let mut c = db.acquire().await.unwrap();
            molecule_jobs::enqueue(&mut c, &molecule_jobs::NewJob::new(molecule_jobs::JobKind::A2aDispatch, &serde_json::json!({})))
                .await
                .unwrap()
        };
        let (ended, waiting) = (job(db.clone()).await, job(db.clone()).await);
        assert_eq!(status::cancel(&db, &ended).await.unwrap(), status::Transition::Done);
        let stuck = add("dispatched", None).await;
        let stuck_past_ttl = add("dispatched", Some(-5.0)).await;
        let live = add("dispatched", None).await;
        for (q, j) in [(stuck, &ended), (stuck_past_ttl, &ended), (live, &waiting)] {
            sqlx::query("UPDATE a2a_queue SET job_id = $2 WHERE queue_id = $1").bind(q).bind(j.as_str()).execute(&db).await.unwrap();
        }
        assert_eq!(settle_ended(&db, 0).await.unwrap(), 2);
        for (id, want) in [(stuck, "failed"), (stuck_past_ttl, "expired"), (live, "dispatched")] {
            let s: String = sqlx::query_scalar("SELECT status FROM a2a_queue WHERE queue_id = $1").bind(id).fetch_one(&db).await.unwrap();
            assert_eq!(s, want, "row {id}");
        }
        let why: String =
            sqlx::query_scalar("SELECT last_error FROM a2a_queue WHERE queue_id = $1").bind(stuck).fetch_one(&db).await.unwrap();
        assert!(why.contains("ended cancelled"), "{why}");
    }
}
