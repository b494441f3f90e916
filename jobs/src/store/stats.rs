//! Read models over the job tables for other crates: queue statistics (A15) and the
//! pending job of a kind for a workspace (restart coalescing, A4).

use molecule_domain::{JobId, OrgId, WorkspaceId};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use utoipa::ToSchema;

use crate::kinds::JobKind;

#[derive(Serialize, ToSchema, Default, Debug, Clone)]
pub struct QueueStats {
    pub queue: String,
    /// Due now, waiting for a worker.
    pub pending: i64,
    /// Due later.
    pub scheduled: i64,
    pub running: i64,
    /// Failed, waiting for their retry.
    pub retrying: i64,
    /// Jobs whose last failed attempt was in the last hour (retried since or not).
    pub failed_last_hour: i64,
    /// Jobs that ran out of attempts (`dead`) in the last hour. Permanent failures count
    /// in `failed_last_hour` (every failed attempt does).
    pub dead_last_hour: i64,
    /// Seconds the oldest due job has waited (0 when none).
    pub oldest_pending_age_s: f64,
    pub workers_alive: i64,
    /// Sum of the alive workers' concurrency.
    pub concurrency: i64,
}

#[derive(sqlx::FromRow)]
struct Depth {
    queue: String,
    pending: i64,
    scheduled: i64,
    running: i64,
    retrying: i64,
    failed_last_hour: i64,
    dead_last_hour: i64,
    oldest_pending_age_s: f64,
}

const DEPTH: &str = r#"
SELECT job_type AS queue,
       count(*) FILTER (WHERE status = 'Pending' AND run_at <= now()) AS pending,
       count(*) FILTER (WHERE status = 'Pending' AND run_at > now()) AS scheduled,
       count(*) FILTER (WHERE status IN ('Queued', 'Running')) AS running,
       count(*) FILTER (WHERE status = 'Failed') AS retrying,
       count(*) FILTER (WHERE jsonb_array_length(attempt_log) > 0
                          AND (attempt_log -> -1 ->> 'failed_at')::timestamptz > now() - interval '1 hour')
           AS failed_last_hour,
       count(*) FILTER (WHERE status = 'Killed' AND outcome = 'dead' AND done_at > now() - interval '1 hour')
           AS dead_last_hour,
       COALESCE(EXTRACT(EPOCH FROM now() - min(run_at) FILTER (
           WHERE status IN ('Pending', 'Failed') AND run_at <= now()))::float8, 0) AS oldest_pending_age_s
FROM apalis.jobs
WHERE (status <> 'Done' OR done_at > now() - interval '1 hour') AND ($1::uuid IS NULL OR org_id = $1)
GROUP BY job_type
"#;

#[derive(sqlx::FromRow)]
struct Workers {
    queue: String,
    alive: i64,
    concurrency: i64,
}

const WORKERS: &str = r#"
SELECT worker_type AS queue, count(*) AS alive,
       COALESCE(sum(NULLIF(substring(layers FROM 'concurrency=([0-9]+)'), '')::bigint), 0)::bigint AS concurrency
FROM apalis.workers
WHERE last_seen > now() - interval '1 minute'
GROUP BY worker_type
"#;

/// Every pool's depth, the age of its oldest due job, and its live workers: the product's
/// queues first (even when empty), then any other queue found in the table.
pub async fn queue_stats(db: &PgPool) -> Result<Vec<QueueStats>, sqlx::Error> {
    queue_stats_of(db, None).await
}

/// [`queue_stats`] of one organization's jobs (`Some`): its depths only; the pools'
/// workers are the platform's, not the org's, and are left at 0.
pub async fn queue_stats_of(db: &PgPool, org: Option<OrgId>) -> Result<Vec<QueueStats>, sqlx::Error> {
    let depths: Vec<Depth> = sqlx::query_as(DEPTH).bind(org.map(|o| o.0)).fetch_all(db).await?;
    let workers: Vec<Workers> = match org {
        None => sqlx::query_as(WORKERS).fetch_all(db).await?,
        Some(_) => Vec::new(),
    };
    let mut out: Vec<QueueStats> = JobKind::ALL.iter().map(|k| QueueStats { queue: k.queue().to_string(), ..Default::default() }).collect();
    let slot = |queue: &str, out: &mut Vec<QueueStats>| match out.iter().position(|q| q.queue == queue) {
        Some(i) => i,
        None => {
            out.push(QueueStats { queue: queue.to_string(), ..Default::default() });
            out.len() - 1
        }
    };
    for d in depths {
        let i = slot(&d.queue, &mut out);
        let q = &mut out[i];
        q.pending = d.pending;
        q.scheduled = d.scheduled;
        q.running = d.running;
        q.retrying = d.retrying;
        q.failed_last_hour = d.failed_last_hour;
        q.dead_last_hour = d.dead_last_hour;
        q.oldest_pending_age_s = d.oldest_pending_age_s;
    }
    for w in workers {
        let i = slot(&w.queue, &mut out);
        out[i].workers_alive = w.alive;
        out[i].concurrency = w.concurrency;
    }
    Ok(out)
}

/// The newest job of `kind` for `ws` that has not started yet (pending, scheduled, or
/// waiting for its retry), if any.
pub async fn waiting_job_of(conn: &mut PgConnection, ws: WorkspaceId, kind: JobKind) -> Result<Option<JobId>, sqlx::Error> {
    let id: Option<String> = sqlx::query_scalar(
        "SELECT id FROM apalis.jobs WHERE workspace_id = $1 AND job_type = $2 \
         AND status IN ('Pending', 'Failed') ORDER BY id DESC LIMIT 1",
    )
    .bind(ws.0)
    .bind(kind.queue())
    .fetch_optional(conn)
    .await?;
    Ok(id.map(JobId::from_db))
}

/// The payloads of a workspace's jobs of `kind`, oldest first, whatever their state
/// (sweepers' tests read what a sweep enqueued).
pub async fn payloads_of(db: &PgPool, kind: JobKind, ws: WorkspaceId) -> Result<Vec<serde_json::Value>, sqlx::Error> {
    let rows: Vec<Vec<u8>> = sqlx::query_scalar("SELECT job FROM apalis.jobs WHERE job_type = $1 AND workspace_id = $2 ORDER BY id")
        .bind(kind.queue())
        .bind(ws.0)
        .fetch_all(db)
        .await?;
    Ok(rows.iter().map(|b| serde_json::from_slice(b).unwrap_or(serde_json::Value::Null)).collect())
}

/// Every job row, whatever its queue and state.
pub async fn count_all(db: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM apalis.jobs").fetch_one(db).await
}
