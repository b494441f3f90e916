//! A16: `GET /metrics`, Prometheus text. Process counters and histograms come from the
//! recorder ([`crate::metrics`]); queue depth, oldest pending age and live workers are
//! read from the database at scrape time, so `molecule api` alone reports them.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use molecule_jobs::store::stats::{queue_stats, QueueStats};

use sqlx::PgPool;

/// Prometheus metrics (text exposition format 0.0.4). Unauthenticated, like `/healthz`:
/// queue names and counts only, never a job's content.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn render(State(db): State<PgPool>) -> Response {
    let Some(handle) = crate::metrics::handle() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "another metrics recorder is installed in this process\n").into_response();
    };
    // A database that does not answer leaves the process metrics readable, with db_up 0.
    let stats = tokio::time::timeout(std::time::Duration::from_secs(2), queue_stats(&db)).await;
    match stats {
        Ok(Ok(stats)) => {
            set_queue_gauges(&stats);
            metrics::gauge!(DB_UP).set(1.0);
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "metrics: queue statistics unavailable");
            metrics::gauge!(DB_UP).set(0.0);
        }
        Err(_) => {
            tracing::warn!("metrics: queue statistics took over 2 s");
            metrics::gauge!(DB_UP).set(0.0);
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], handle.render()).into_response()
}

pub const DB_UP: &str = "molecule_metrics_database_up";
pub const DEPTH: &str = "molecule_queue_depth";
pub const OLDEST: &str = "molecule_queue_oldest_pending_age_seconds";
pub const FAILED_HOUR: &str = "molecule_queue_failed_last_hour";
pub const DEAD_HOUR: &str = "molecule_queue_dead_last_hour";
pub const WORKERS: &str = "molecule_pool_workers";
pub const CONCURRENCY: &str = "molecule_pool_concurrency";

fn set_queue_gauges(stats: &[QueueStats]) {
    for q in stats {
        let queue = q.queue.clone();
        for (state, n) in [("pending", q.pending), ("scheduled", q.scheduled), ("running", q.running), ("retrying", q.retrying)] {
            metrics::gauge!(DEPTH, "queue" => queue.clone(), "state" => state).set(n as f64);
        }
        metrics::gauge!(OLDEST, "queue" => queue.clone()).set(q.oldest_pending_age_s);
        metrics::gauge!(FAILED_HOUR, "queue" => queue.clone()).set(q.failed_last_hour as f64);
        metrics::gauge!(DEAD_HOUR, "queue" => queue.clone()).set(q.dead_last_hour as f64);
        metrics::gauge!(WORKERS, "queue" => queue.clone()).set(q.workers_alive as f64);
        metrics::gauge!(CONCURRENCY, "queue" => queue).set(q.concurrency as f64);
    }
}
