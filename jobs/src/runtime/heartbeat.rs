//! The heartbeat: every `interval`, one statement upserts every pool's worker row on a
//! connection of its own — never waiting behind handlers or claims for a pooled
//! connection, so a busy process never loses its leases. It runs until the runtime's last
//! ack is written (the whole shutdown grace included), then removes the rows.
//!
//! It also tells the pools whether this process still holds its lease ([`lease_held`]):
//! `true` from the first written beat, `false` once no beat has been written for half a
//! lease (a database that is down, a partition, a blocked statement). Other processes'
//! rescuers take our jobs a full lease after the last beat, so pools that stop claiming
//! and interrupt their attempts at half a lease have stopped before anybody else starts.

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

use super::ErrorBackoff;
use crate::store::workers::{self, WorkerRow};

pub(super) struct Heartbeat {
    pub options: PgConnectOptions,
    pub interval: Duration,
    pub lease: Duration,
    pub rows: Vec<WorkerRow>,
}

/// Runs the heartbeat and its watchdog until `stop`; `held` is the lease as pools see it.
pub(super) async fn run(hb: Heartbeat, held: watch::Sender<bool>, stop: watch::Receiver<bool>) {
    let last_ok: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    tokio::join!(beat(&hb, &last_ok, &held, stop.clone()), watchdog(hb.lease, &last_ok, &held, stop));
}

async fn beat(hb: &Heartbeat, last_ok: &Mutex<Option<Instant>>, held: &watch::Sender<bool>, mut stop: watch::Receiver<bool>) {
    // A connect or statement that hangs (a lock, a half-open socket) must not hold the
    // loop: each try is cut off and the next one starts on a new connection.
    let per_try = hb.interval.max(Duration::from_secs(1)).min(hb.lease / 4);
    let mut conn: Option<PgConnection> = None;
    let mut backoff = ErrorBackoff::new();
    while !*stop.borrow() {
        let attempt = tokio::time::timeout(per_try, async {
            if conn.is_none() {
                conn = Some(hb.options.connect().await?);
            }
            match conn.as_mut() {
                Some(c) => workers::heartbeat(c, &hb.rows).await,
                None => Ok(()),
            }
        })
        .await;
        match attempt {
            Ok(Ok(())) => {
                backoff.reset();
                let first = lock(last_ok).replace(Instant::now()).is_none();
                if held.send_if_modified(|h| !std::mem::replace(h, true)) && !first {
                    tracing::warn!("heartbeat written again: pools resume claiming");
                }
                tokio::select! {
                    _ = tokio::time::sleep(hb.interval) => {}
                    _ = stop.changed() => {}
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "heartbeat failed; reconnecting");
                conn = None;
                backoff.wait(&mut stop).await;
            }
            Err(_) => {
                tracing::warn!(timeout_ms = per_try.as_millis() as u64, "heartbeat timed out; reconnecting");
                conn = None;
                backoff.wait(&mut stop).await;
            }
        }
    }
    let ids: Vec<String> = hb.rows.iter().map(|r| r.id.clone()).collect();
    if let Some(mut c) = conn {
        let removed = tokio::time::timeout(per_try, workers::remove(&mut c, &ids)).await;
        if !matches!(removed, Ok(Ok(()))) {
            tracing::warn!("could not remove this process's worker rows; they expire with the lease");
        }
    }
}

/// Flips `held` to false once the last written beat is older than half a lease (and back
/// when beats are written again).
async fn watchdog(lease: Duration, last_ok: &Mutex<Option<Instant>>, held: &watch::Sender<bool>, mut stop: watch::Receiver<bool>) {
    let limit = lease / 2;
    let mut tick = tokio::time::interval((lease / 20).max(Duration::from_millis(20)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let Some(at) = *lock(last_ok) else { continue };
        let age = at.elapsed();
        if age > limit && held.send_if_modified(|h| std::mem::replace(h, false)) {
            tracing::error!(
                since_last_beat_ms = age.as_millis() as u64,
                lease_ms = lease.as_millis() as u64,
                "no heartbeat written for half a lease: pools stop claiming and interrupt their jobs"
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
