//! The heartbeat: every `interval`, one statement upserts every pool's worker row on a
//! connection of its own — never waiting behind handlers or claims for a pooled
//! connection, so a busy process never loses its leases. It runs until the runtime's last
//! ack is written (the whole shutdown grace included), then removes the rows.

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection};
use std::time::Duration;
use tokio::sync::watch;

use super::ErrorBackoff;
use crate::store::workers::{self, WorkerRow};

pub(super) async fn run(
    options: PgConnectOptions,
    interval: Duration,
    rows: Vec<WorkerRow>,
    ready: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conn: Option<PgConnection> = None;
    let mut backoff = ErrorBackoff::new();
    while !*stop.borrow() {
        if conn.is_none() {
            match options.connect().await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "heartbeat connection failed; retrying");
                    backoff.wait(&mut stop).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        match workers::heartbeat(c, &rows).await {
            Ok(()) => {
                backoff.reset();
                ready.send_replace(true);
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.changed() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed; reconnecting");
                conn = None;
                backoff.wait(&mut stop).await;
            }
        }
    }
    let ids: Vec<String> = rows.into_iter().map(|r| r.id).collect();
    if let Some(mut c) = conn {
        if let Err(e) = workers::remove(&mut c, &ids).await {
            tracing::warn!(error = %e, "could not remove this process's worker rows; they expire with the lease");
        }
    }
}
