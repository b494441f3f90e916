//! The HTTP API. It only validates, writes and enqueues — one transaction per request —
//! and never calls a workspace backend (this crate does not depend on one).
//!
//! route → extractors (auth, ids, body) → handler → one transaction (domain row + job) → answer.

pub mod auth;
pub mod batch;
pub mod dashboard;
pub mod error;
pub mod extract;
pub mod metrics;
pub mod openapi;
pub mod routes;
pub mod server;
pub mod streams;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use sqlx::PgPool;
use std::time::Instant;
use tracing::Instrument;

pub use auth::{AuthConfig, OrgPin};
pub use error::ApiError;

/// Request bodies are capped at 1 MiB (SPEC §3); the A2A route at 4 MiB.
pub const BODY_LIMIT: usize = 1 << 20;

#[derive(Clone)]
pub struct AppState {
    pub db: PgPool,
    pub auth: AuthConfig,
    /// NDJSON followers: one shared LISTEN connection, per-org caps.
    pub streams: streams::Streams,
    /// Wakes pools after a request's transaction committed (the busy paths enqueue
    /// without a NOTIFY in their transaction: molecule_jobs::announce).
    pub announcer: molecule_jobs::Announcer,
    /// Workspaces this process marked active within the last second (S5's marks).
    pub activity: molecule_domain::activity::RecentMarks,
    /// Token lookups and the enqueuing routes' writes, batched (crate::batch).
    pub tokens: auth::TokenBatcher,
    pub execs: routes::exec::ExecBatcher,
    pub creates: routes::workspaces::CreateBatcher,
}

/// Handlers that need only the database (`/metrics`) take it by itself, so a process
/// without the API can serve them too ([`metrics::serve_alone`]).
impl axum::extract::FromRef<AppState> for PgPool {
    fn from_ref(st: &AppState) -> PgPool {
        st.db.clone()
    }
}

impl AppState {
    /// State over `db` with the default stream cap. Starts the streams' listener: call
    /// inside a tokio runtime.
    pub fn new(db: PgPool, auth: AuthConfig) -> Self {
        Self::with_streams_per_org(db, auth, streams::DEFAULT_STREAMS_PER_ORG)
    }

    /// [`Self::new`] with another cap on one org's NDJSON streams.
    pub fn with_streams_per_org(db: PgPool, auth: AuthConfig, streams_per_org: usize) -> Self {
        Self::with_limits(db, auth, streams_per_org, batch::LOCK_WAIT)
    }

    /// [`Self::new`] with another cap on one org's NDJSON streams and another bound on the
    /// enqueuing batches' lock waits (tests hold a batch on a lock on purpose).
    pub fn with_limits(db: PgPool, auth: AuthConfig, streams_per_org: usize, batch_lock_wait: std::time::Duration) -> Self {
        let streams = streams::Streams::start(&db, streams_per_org);
        let announcer = molecule_jobs::Announcer::start(db.connect_options().as_ref().clone());
        let activity = molecule_domain::activity::RecentMarks::default();
        let execs = routes::exec::exec_batcher(db.clone(), activity.clone(), announcer.clone(), batch_lock_wait);
        let creates = routes::workspaces::create_batcher(db.clone(), announcer.clone(), batch_lock_wait);
        let tokens = auth::token_batcher(db.clone());
        AppState { db, auth, streams, announcer, activity, tokens, execs, creates }
    }
}

pub fn router(state: AppState) -> Router {
    use routes::*;
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(routes::metrics::render))
        .route("/openapi.json", get(openapi::serve))
        .route("/workspaces", post(workspaces::create).get(workspaces::list))
        .route("/workspaces/{id}", get(workspaces::get).delete(workspaces::delete))
        .route("/workspaces/{id}/restart", post(workspaces::restart))
        .route("/workspaces/{id}/events", get(workspaces::events))
        .route("/workspaces/{id}/rescue", get(rescue::latest))
        .route("/workspaces/{id}/exec", post(exec::exec))
        .route("/workspaces/{id}/console", get(console::console))
        .route("/workspaces/{id}/tokens", post(tokens::issue))
        .route("/workspaces/{id}/a2a", post(a2a::send).layer(DefaultBodyLimit::max(molecule_domain::a2a::BODY_LIMIT)))
        .route("/workspaces/{id}/a2a/queue/{queue_id}", get(a2a::lookup))
        .route("/workspaces/{id}/activity", get(a2a::activity))
        .route("/admin/workspaces/{id}/bootstrap-failed", post(rescue::bootstrap_failed))
        .route("/jobs", get(jobs::list))
        .route("/jobs/{id}", get(jobs::get))
        .route("/admin/jobs/{id}", get(jobs::admin_get))
        .route("/jobs/{id}/cancel", post(jobs::cancel))
        .route("/jobs/{id}/retry", post(jobs::retry))
        .route("/queues", get(queues::queues))
        .route("/registry/register", post(registry::register))
        .route("/registry/heartbeat", post(registry::heartbeat))
        .merge(dashboard::routes())
        .route_layer(axum::middleware::from_fn(crate::metrics::track_route))
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(request_context))
        .with_state(state)
}

/// Gives every request an id (the caller's `x-request-id` when it is a sane token, else
/// a ULID), runs it inside a span carrying that id, echoes the id back, and logs one line
/// per request: method, path, status, latency. Headers and bodies are never logged.
async fn request_context(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        .map(str::to_string)
        .unwrap_or_else(|| ulid::Ulid::generate().to_string());
    let span = tracing::info_span!("http", request_id = %id, method = %req.method(), path = %req.uri().path());
    let method = req.method().clone();
    let started = Instant::now();
    let mut res = next.run(req).instrument(span.clone()).await;
    crate::metrics::record_unmatched(method.as_str(), &res, started);
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert("x-request-id", v);
    }
    span.in_scope(|| tracing::info!(status = res.status().as_u16(), latency_ms = started.elapsed().as_secs_f64() * 1000.0, "request"));
    res
}

pub use server::{HttpLimits, serve, serve_with};
