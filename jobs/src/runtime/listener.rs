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
    /// The claim shards of the inserted jobs, a bit each (migrations/…_notify_names_shards.sql);
    /// absent (an announcement, a retry, an older trigger): every shard.
    #[serde(default)]
    shards: Option<u32>,
}

/// Wakes what a NOTIFY's payload names: the fetchers of its queue's shards.
fn wake_for(payload: &str, wakers: &HashMap<String, Arc<PoolWake>>) {
    if let Ok(ev) = serde_json::from_str::<InsertEvent>(payload) {
        if let Some(w) = wakers.get(ev.job_type) {
            match ev.shards {
                Some(mask) => w.wake_shards(mask),
                None => w.wake(),
            }
        }
    }
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
                    Ok(Some(n)) => wake_for(n.payload(), &wakers),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Shard;
    use futures_util::FutureExt;

    /// Which of the pool's fetchers (one per shard) holds a wake-up; takes it.
    fn woken(w: &PoolWake) -> Vec<bool> {
        Shard::all().map(|s| w.shard(s).notified().now_or_never().is_some()).collect()
    }

    #[test]
    fn a_notify_wakes_the_fetchers_of_the_shards_it_names_and_all_when_it_names_none() {
        let w = Arc::new(PoolWake::default());
        let wakers = HashMap::from([("q".to_string(), w.clone())]);
        wake_for(r#"{"job_type": "q", "shards": 2}"#, &wakers);
        assert_eq!(woken(&w), [false, true]);
        wake_for(r#"{"job_type": "q", "shards": 1}"#, &wakers);
        assert_eq!(woken(&w), [true, false]);
        wake_for(r#"{"job_type": "q", "shards": 3}"#, &wakers);
        assert_eq!(woken(&w), [true, true]);
        // An announcement (or a trigger from before shards were named): every fetcher.
        wake_for(r#"{"job_type": "q"}"#, &wakers);
        assert_eq!(woken(&w), [true, true]);
        // No shard this pool knows: every fetcher rather than none.
        wake_for(r#"{"job_type": "q", "shards": 0}"#, &wakers);
        assert_eq!(woken(&w), [true, true]);
        wake_for(r#"{"job_type": "other", "shards": 3}"#, &wakers);
        assert_eq!(woken(&w), [false, false]);
    }

    /// The insert trigger's payload names the shard of a single job, and both shards for
    /// a bulk insert that has jobs in each.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_insert_notify_names_the_shards_of_the_inserted_jobs() {
        let (db, _) = molecule_domain::testing::fresh_db().await;
        let mut listener = PgListener::connect_with(&db).await.unwrap();
        listener.listen(INSERT_CHANNEL).await.unwrap();
        let mut next = async || -> serde_json::Value {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), listener.recv()).await.expect("a NOTIFY").unwrap();
            serde_json::from_str(n.payload()).unwrap()
        };
        let mut conn = db.acquire().await.unwrap();
        for _ in 0..4 {
            let id = crate::enqueue(&mut conn, &crate::NewJob::to_queue("q", &serde_json::json!({}))).await.unwrap();
            let shard = Shard::of(&db, id.as_str()).await.unwrap();
            assert_eq!(next().await, serde_json::json!({ "job_type": "q", "shards": 1 << shard.index() }), "job {id}");
        }
        let jobs: Vec<crate::NewJob> = (0..40).map(|_| crate::NewJob::to_queue("q", &serde_json::json!({}))).collect();
        crate::enqueue_many(&mut conn, &jobs).await.unwrap();
        assert_eq!(next().await, serde_json::json!({ "job_type": "q", "shards": 3 }));
    }
}
