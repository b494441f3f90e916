//! The process's Prometheus recorder (one per process, installed before pools start, so
//! their handles are live) and the HTTP request metrics. `/metrics` renders it
//! (`routes::metrics`).

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const HTTP_REQUESTS: &str = "molecule_http_requests_total";
pub const HTTP_DURATION: &str = "molecule_http_request_duration_seconds";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the recorder once per process (later calls return the same handle). Inside a
/// tokio runtime it also starts the upkeep that drains histogram samples between scrapes
/// (without it they pile up while nobody scrapes). None when another recorder is
/// installed.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(molecule_jobs::metrics::DURATION.into()), &JOB_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(HTTP_DURATION.into()), &HTTP_BUCKETS));
            let handle = match builder.and_then(|b| b.install_recorder()) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed; /metrics answers 503");
                    return None;
                }
            };
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let h = handle.clone();
                rt.spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        h.run_upkeep();
                    }
                });
            }
            Some(handle)
        })
        .as_ref()
}

/// The handle, installing the recorder if nobody has (a router built in a test).
pub fn handle() -> Option<&'static PrometheusHandle> {
    install()
}

const JOB_BUCKETS: [f64; 16] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0, 600.0];
const HTTP_BUCKETS: [f64; 13] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Marks a response whose request a route's own layer recorded.
#[derive(Clone, Copy)]
struct Recorded;

/// Per route template (`/workspaces/{id}`, never the path itself: ids would make a
/// series each). A route layer: only matched routes have a template.
pub(crate) async fn track_route(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let started = Instant::now();
    let mut res = next.run(req).await;
    record(method.as_str(), route, res.status().as_u16(), started);
    res.extensions_mut().insert(Recorded);
    res
}

/// For requests no route matched (404s, refused bodies before routing): one series.
pub(crate) fn record_unmatched(method: &str, res: &Response, started: Instant) {
    if res.extensions().get::<Recorded>().is_none() {
        record(method, "unmatched".into(), res.status().as_u16(), started);
    }
}

fn record(method: &str, route: String, status: u16, started: Instant) {
    // Any token is a method to HTTP: an unknown one must not make a series of its own.
    let method = match method {
        "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS" => method,
        _ => "other",
    }
    .to_string();
    let status = status.to_string();
    metrics::counter!(HTTP_REQUESTS, "method" => method.clone(), "route" => route.clone(), "status" => status.clone()).increment(1);
    metrics::histogram!(HTTP_DURATION, "method" => method, "route" => route, "status" => status).record(started.elapsed().as_secs_f64());
}

/// `/metrics` and `/healthz` on their own listener, for processes that run pools but no
/// API (`molecule worker --metrics-listen …`): their job counters live only in them.
pub async fn serve_alone(
    listener: tokio::net::TcpListener,
    db: sqlx::PgPool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/metrics", get(crate::routes::metrics::render))
        .route("/healthz", get(crate::routes::health::healthz))
        .route_layer(axum::middleware::from_fn(track_route))
        .with_state(db);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
