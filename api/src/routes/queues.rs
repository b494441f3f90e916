//! A15: per-pool queue depth and workers, for operators (ADMIN_TOKEN).

use axum::extract::State;
use axum::Json;
use molecule_jobs::JobKind;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::Admin;
use crate::error::{ApiResult, ErrorBody};
use crate::AppState;

#[derive(Serialize, ToSchema, Default)]
pub struct QueueStats {
    pub queue: String,
    /// Due now, waiting for a worker.
    pub pending: i64,
    /// Due later.
    pub scheduled: i64,
    pub running: i64,
    /// Failed, waiting for their retry.
    pub retrying: i64,
    pub failed_last_hour: i64,
    pub dead_last_hour: i64,
    /// Seconds the oldest due job has waited (0 when none).
    pub oldest_pending_age_s: f64,
    pub workers_alive: i64,
    /// Sum of the alive workers' concurrency.
    pub concurrency: i64,
}

const STATS: &str = r#"
SELECT job_type,
       count(*) FILTER (WHERE status = 'Pending' AND run_at <= now()),
       count(*) FILTER (WHERE status = 'Pending' AND run_at > now()),
       count(*) FILTER (WHERE status IN ('Queued', 'Running')),
       count(*) FILTER (WHERE status = 'Failed'),
       count(*) FILTER (WHERE jsonb_array_length(attempt_log) > 0
                          AND (attempt_log -> -1 ->> 'failed_at')::timestamptz > now() - interval '1 hour'),
       count(*) FILTER (WHERE status = 'Killed' AND outcome = 'dead' AND done_at > now() - interval '1 hour'),
       COALESCE(EXTRACT(EPOCH FROM now() - min(run_at) FILTER (
           WHERE status IN ('Pending', 'Failed') AND run_at <= now()))::float8, 0)
FROM apalis.jobs
WHERE status <> 'Done' OR done_at > now() - interval '1 hour'
GROUP BY job_type
"#;

const WORKERS: &str = r#"
SELECT worker_type, count(*),
       COALESCE(sum(NULLIF(substring(layers FROM 'concurrency=([0-9]+)'), '')::bigint), 0)::bigint
FROM apalis.workers
WHERE last_seen > now() - interval '1 minute'
GROUP BY worker_type
"#;

type StatRow = (String, i64, i64, i64, i64, i64, i64, f64);

/// A15: every pool's depth, age of its oldest due job, and live workers.
#[utoipa::path(get, path = "/queues", tag = "operations", security(("admin" = [])),
    responses(
        (status = 200, body = Vec<QueueStats>),
        (status = 401, description = "missing or wrong ADMIN_TOKEN", body = ErrorBody),
        (status = 403, description = "ADMIN_TOKEN not configured", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn queues(State(st): State<AppState>, _admin: Admin) -> ApiResult<Json<Vec<QueueStats>>> {
    let rows: Vec<StatRow> = sqlx::query_as(STATS).fetch_all(&st.db).await?;
    let workers: Vec<(String, i64, i64)> = sqlx::query_as(WORKERS).fetch_all(&st.db).await?;
    let mut out: Vec<QueueStats> = JobKind::ALL
        .iter()
        .map(|k| QueueStats { queue: k.queue().to_string(), ..Default::default() })
        .collect();
    for r in rows {
        let i = match out.iter().position(|q| q.queue == r.0) {
            Some(i) => i,
            None => {
                out.push(QueueStats { queue: r.0.clone(), ..Default::default() });
                out.len() - 1
            }
        };
        let q = &mut out[i];
        (q.pending, q.scheduled, q.running, q.retrying, q.failed_last_hour, q.dead_last_hour, q.oldest_pending_age_s) =
            (r.1, r.2, r.3, r.4, r.5, r.6, r.7);
    }
    for (queue, alive, conc) in workers {
        if let Some(q) = out.iter_mut().find(|q| q.queue == queue) {
            q.workers_alive = alive;
            q.concurrency = conc;
        }
    }
    Ok(Json(out))
}
