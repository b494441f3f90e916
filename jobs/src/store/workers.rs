//! Worker rows (`apalis.workers`): one per pool per process, named
//! `<queue>@<host>:<pid>#<ulid>`. A row's `last_seen` is the lease of every job it holds.

use sqlx::PgConnection;

/// One pool's row.
#[derive(Debug, Clone)]
pub struct WorkerRow {
    pub id: String,
    pub queue: String,
    pub concurrency: usize,
}

/// Upserts every row with `last_seen = now()`: a heartbeat that also re-creates a row a
/// pruner removed, so a live worker's jobs are never taken for orphans.
const HEARTBEAT: &str = r#"
INSERT INTO apalis.workers (id, worker_type, storage_name, layers, last_seen, started_at)
SELECT id, queue, 'molecule', layers, now(), now()
FROM unnest($1::text[], $2::text[], $3::text[]) AS t(id, queue, layers)
ON CONFLICT (id) DO UPDATE SET last_seen = now()
"#;

pub async fn heartbeat(conn: &mut PgConnection, rows: &[WorkerRow]) -> Result<(), sqlx::Error> {
    sqlx::query(HEARTBEAT)
        .bind(rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.queue.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| format!("concurrency={}", r.concurrency)).collect::<Vec<_>>())
        .execute(conn)
        .await?;
    Ok(())
}

/// A clean exit: the rows go (after every job of theirs was acked or handed back), so
/// operators' views stop counting them at once.
pub async fn remove(conn: &mut PgConnection, ids: &[String]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM apalis.workers WHERE id = ANY($1)").bind(ids).execute(conn).await?;
    Ok(())
}

/// A live worker, for operators' views.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct LiveWorker {
    pub id: String,
    pub queue: String,
    pub concurrency: i64,
    /// Jobs it holds now.
    pub running: i64,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub last_seen: chrono::DateTime<chrono::Utc>,
}

/// Workers seen within a minute, by queue then id, with the jobs each holds: those of its
/// claimed batches (`apalis.claims`) still running under it, looked up by key.
pub async fn alive(db: &sqlx::PgPool) -> Result<Vec<LiveWorker>, sqlx::Error> {
    sqlx::query_as(
        "SELECT w.id, w.worker_type AS queue, \
                COALESCE(NULLIF(substring(w.layers FROM 'concurrency=([0-9]+)'), '')::bigint, 0) AS concurrency, \
                (SELECT count(*) FROM apalis.jobs j \
                 WHERE j.id = ANY(ARRAY(SELECT unnest(c.ids) FROM apalis.claims c WHERE c.worker_id = w.id)) \
                   AND j.lock_by = w.id AND j.status IN ('Queued', 'Running')) AS running, \
                w.started_at, w.last_seen \
         FROM apalis.workers w WHERE w.last_seen > now() - interval '1 minute' ORDER BY w.worker_type, w.id",
    )
    .fetch_all(db)
    .await
}
