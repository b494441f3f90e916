//! The LISTEN side of wake-ups: one connection of its own (not from any pool) on the
//! insert channel, waking the pool of the queue each NOTIFY names.

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::watch;

use super::pool::PoolWake;

use super::{ErrorBackoff, INSERT_CHANNEL};

#[derive(serde::Deserialize)]
struct InsertEvent<'a> {
    #[serde(borrow)]
    job_type: &'a str,
}

pub(super) async fn run(options: PgConnectOptions, wakers: Arc<HashMap<String, Arc<PoolWake>>>, mut stop: watch::Receiver<bool>) {
    let wake_all = || wakers.values().for_each(|n| n.wake());
    // A pool of exactly one connection, used only by the listener (PgListener takes its
    // connection from a pool and reconnects through it).
    let own = PgPoolOptions::new().max_connections(1).min_connections(0).connect_lazy_with(options);
    let mut backoff = ErrorBackoff::new();
    while !*stop.borrow() {
        let mut listener = match PgListener::connect_with(&own).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN connection failed; polling meanwhile");
                backoff.wait(&mut stop).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(INSERT_CHANNEL).await {
            tracing::warn!(error = %e, "LISTEN failed; polling meanwhile");
            backoff.wait(&mut stop).await;
            continue;
        }
        backoff.reset();
        wake_all(); // anything inserted while we were not listening
        loop {
            tokio::select! {
                r = listener.try_recv() => match r {
                    Ok(Some(n)) => {
                        if let Ok(ev) = serde_json::from_str::<InsertEvent>(n.payload()) {
                            if let Some(w) = wakers.get(ev.job_type) { w.wake(); }
                        }
                    }
                    // Connection lost; try_recv reconnects on the next call. Wake everyone
                    // for what we may have missed.
                    Ok(None) => wake_all(),
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection broken; reconnecting");
                        wake_all();
                        backoff.wait(&mut stop).await;
                        break;
                    }
                },
                _ = stop.changed() => return,
            }
        }
    }
}
