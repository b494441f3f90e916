//! The HTTP server: axum's router on hyper's HTTP/1 connections, with what a public
//! server needs and `axum::serve` does not offer — a header-read timeout (which in hyper
//! also runs while a kept-alive connection waits for its next request, so it is the idle
//! timeout too), a cap on concurrent connections (past it, new ones wait in the kernel's
//! backlog), and a bounded graceful shutdown: stop accepting, let NDJSON streams send
//! their final frame, finish in-flight requests, and drop whatever is left after the limit.

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::AppState;

#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// A connection must deliver a whole request head within this long of opening, and
    /// of its previous response (idle keep-alive).
    pub header_timeout: Duration,
    /// Most connections served at once.
    pub max_connections: usize,
    /// After shutdown is asked: how long open requests and streams get before they are cut.
    pub shutdown_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits { header_timeout: Duration::from_secs(15), max_connections: 1024, shutdown_timeout: Duration::from_secs(10) }
    }
}

/// Serves with the default limits until `shutdown` resolves.
pub async fn serve(listener: TcpListener, state: AppState, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    serve_with(listener, state, shutdown, HttpLimits::default()).await
}

pub async fn serve_with(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: HttpLimits,
) -> std::io::Result<()> {
    let app = crate::router(state.clone());
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    // Every connection's task, so that those still open when the shutdown timeout ends are
    // dropped (with their streams) rather than left running past `serve` returning.
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => break },
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // NDJSON frames are small: send each at once.
        let _ = stream.set_nodelay(true);
        let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        connections.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    state.streams.close();
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.shutdown_timeout) => {
            tracing::warn!(still_open = connections.len(), timeout_s = limits.shutdown_timeout.as_secs(),
                "connections still open at the end of the shutdown timeout; dropping them");
        }
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
    Ok(())
}
