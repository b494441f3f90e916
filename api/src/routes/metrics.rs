//! A16: `GET /metrics`, Prometheus text. Process counters and histograms come from the
//! recorder ([`crate::metrics`]); queue depth, oldest pending age and live workers are
//! read from the database at scrape time (so `molecule api` alone reports them) and
//! written out here rather than through the recorder: when the database does not answer
//! they are left out, never shown stale.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use molecule_jobs::store::stats::{QueueStats, queue_stats};
use sqlx::PgPool;
use std::fmt::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Prometheus metrics (text exposition format 0.0.4). Unauthenticated, like `/healthz`:
/// queue names and counts only, never a job's content.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn render(State(db): State<PgPool>) -> Response {
    let Some(handle) = crate::metrics::handle() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "another metrics recorder is installed in this process\n").into_response();
    };
    let mut text = handle.render();
    match queue_stats_cached(&db).await {
        Some(stats) => {
            write_queue_gauges(&mut text, &stats);
            gauge(&mut text, DB_UP, "1 when the queue statistics above were read from the database", &[("", 1.0)]);
        }
        None => gauge(&mut text, DB_UP, "1 when the queue statistics were read from the database", &[("", 0.0)]),
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// How long one read of the statistics serves scrapes: any number of scrapers (or a
/// flood of requests: the route is open) cost the database one query per interval.
const FRESH_FOR: Duration = Duration::from_secs(1);
/// A read that takes longer is abandoned (the scrape shows `database_up 0`).
const READ_CAP: Duration = Duration::from_secs(2);

type Cached = Option<(Instant, Arc<Vec<QueueStats>>)>;
static CACHE: std::sync::OnceLock<Mutex<Cached>> = std::sync::OnceLock::new();

/// One read at a time per process: concurrent scrapes wait for it and share it.
async fn queue_stats_cached(db: &PgPool) -> Option<Arc<Vec<QueueStats>>> {
    let mut cached = CACHE.get_or_init(|| Mutex::new(None)).lock().await;
    if let Some((at, stats)) = cached.as_ref() {
        if at.elapsed() < FRESH_FOR {
            return Some(stats.clone());
        }
    }
    match tokio::time::timeout(READ_CAP, queue_stats(db)).await {
        Ok(Ok(stats)) => {
            let stats = Arc::new(stats);
            *cached = Some((Instant::now(), stats.clone()));
            Some(stats)
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "metrics: queue statistics unavailable");
            None
        }
        Err(_) => {
            tracing::warn!("metrics: queue statistics took over 2 s");
            None
        }
    }
}

pub const DB_UP: &str = "molecule_metrics_database_up";
pub const DEPTH: &str = "molecule_queue_depth";
pub const OLDEST: &str = "molecule_queue_oldest_pending_age_seconds";
pub const FAILED_HOUR: &str = "molecule_queue_failed_last_hour";
pub const DEAD_HOUR: &str = "molecule_queue_dead_last_hour";
pub const WORKERS: &str = "molecule_pool_workers";
pub const CONCURRENCY: &str = "molecule_pool_concurrency";

/// One gauge family: `labels` are rendered as given (`queue="…",state="…"`, or empty).
fn gauge(out: &mut String, name: &str, help: &str, series: &[(&str, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (labels, v) in series {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {v}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
}

/// Queue names come from the job table: escaped as label values.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn as_refs(v: &[(String, f64)]) -> Vec<(&str, f64)> {
    v.iter().map(|(l, n)| (l.as_str(), *n)).collect()
}

fn write_queue_gauges(out: &mut String, stats: &[QueueStats]) {
    let q = |s: &QueueStats| format!("queue=\"{}\"", label(&s.queue));
    let mut depth = Vec::new();
    for s in stats {
        for (state, n) in [("pending", s.pending), ("scheduled", s.scheduled), ("running", s.running), ("retrying", s.retrying)] {
            depth.push((format!("{},state=\"{state}\"", q(s)), n as f64));
        }
    }
    let per_queue = |f: &dyn Fn(&QueueStats) -> f64| stats.iter().map(|s| (q(s), f(s))).collect::<Vec<_>>();

    gauge(out, DEPTH, "Jobs per queue and state: pending (due), scheduled (due later), running, retrying", &as_refs(&depth));
    gauge(out, OLDEST, "Seconds the oldest due job of the queue has waited", &as_refs(&per_queue(&|s| s.oldest_pending_age_s)));
    gauge(
        out,
        FAILED_HOUR,
        "Jobs of the queue with a failed attempt in the last hour",
        &as_refs(&per_queue(&|s| s.failed_last_hour as f64)),
    );
    gauge(
        out,
        DEAD_HOUR,
        "Jobs of the queue that ran out of attempts (dead) in the last hour",
        &as_refs(&per_queue(&|s| s.dead_last_hour as f64)),
    );
    gauge(out, WORKERS, "Live workers (pools of every process) of the queue", &as_refs(&per_queue(&|s| s.workers_alive as f64)));
    gauge(out, CONCURRENCY, "Sum of the live workers' concurrency", &as_refs(&per_queue(&|s| s.concurrency as f64)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_render_in_the_text_format_with_escaped_labels() {
        let mut out = String::new();
        let s = QueueStats { queue: "a\"b".into(), pending: 3, ..Default::default() };
        write_queue_gauges(&mut out, &[s]);
        assert!(out.contains("# TYPE molecule_queue_depth gauge\n"), "{out}");
        assert!(out.contains("molecule_queue_depth{queue=\"a\\\"b\",state=\"pending\"} 3\n"), "{out}");
    }
}
