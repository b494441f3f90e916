//! Wake-ups sent after the enqueuing transaction committed.
//!
//! A NOTIFY inside a transaction makes its commit take a server-wide lock until the
//! commit is flushed, so transactions that notify commit one at a time, each waiting for
//! its own WAL flush (migrations/…_announce_after_commit.sql has the figures).
//! A caller on a busy path enqueues with [`NewJob::announce_after_commit`] instead and,
//! once its transaction committed, calls [`Announcer::announce`]. One task per
//! [`Announcer`] sends one autocommit `pg_notify` per queue for every queue announced
//! while its previous statement ran, on a connection of its own: one short locked
//! commit for many enqueues, none of them waiting for it.
//!
//! A lost announcement (the statement failed, the process died after the commit) costs
//! latency, never a job: pools also poll.
//!
//! [`NewJob::announce_after_commit`]: crate::NewJob::announce_after_commit

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

use crate::runtime::{INSERT_CHANNEL, LocalWakers};

/// Announces queues with committed new jobs. Cheap to clone; every clone feeds one task.
#[derive(Clone)]
pub struct Announcer {
    inner: Arc<Inner>,
}

struct Inner {
    /// Queues announced since the last statement (a set: one notify per queue however
    /// many jobs).
    pending: Mutex<BTreeSet<String>>,
    wake: Notify,
    /// This process's pools (`serve`): woken at once, without the NOTIFY's round trip.
    local: std::sync::OnceLock<LocalWakers>,
}

impl Announcer {
    /// Starts the announcing task on a connection of its own made from `options`. Call
    /// inside a tokio runtime. The task ends when the last clone is dropped.
    pub fn start(options: PgConnectOptions) -> Announcer {
        let inner = Arc::new(Inner { pending: Mutex::new(BTreeSet::new()), wake: Notify::new(), local: Default::default() });
        // One connection kept open and not pinged before each use: an announce after a
        // quiet spell must not pay a login (or a round trip) before its NOTIFY.
        let db = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .idle_timeout(None)
            .max_lifetime(None)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options);
        tokio::spawn(run(Arc::downgrade(&inner), db));
        Announcer { inner }
    }

    /// Also wakes these pools of this process directly on each announce (the NOTIFY still
    /// goes out, for other processes). Set once; later calls change nothing.
    pub fn wake_locally(&self, wakers: LocalWakers) {
        let _ = self.inner.local.set(wakers);
    }

    /// Wakes the pools of `queue`: call after the transaction that enqueued to it
    /// committed (before, a woken pool could find nothing and go back to sleep).
    pub fn announce(&self, queue: &str) {
        if let Some(local) = self.inner.local.get() {
            local.wake(queue);
        }
        let mut pending = lock(&self.inner.pending);
        if !pending.contains(queue) {
            pending.insert(queue.to_string());
        }
        drop(pending);
        self.inner.wake.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The insert trigger's payload without its `shards` (an announce does not know the jobs'
/// shards): listeners wake every fetcher of the queue for it.
const NOTIFY: &str = "SELECT pg_notify($1, json_build_object('job_type', q)::text) FROM unnest($2::text[]) AS q";

async fn run(inner: std::sync::Weak<Inner>, db: PgPool) {
    loop {
        let queues: Vec<String> = {
            let Some(inner) = inner.upgrade() else { break };
            let queues: Vec<String> = std::mem::take(&mut *lock(&inner.pending)).into_iter().collect();
            if queues.is_empty() {
                // Woken by the next announce, or now and then to notice the last clone gone.
                let _ = tokio::time::timeout(Duration::from_secs(1), inner.wake.notified()).await;
                continue;
            }
            queues
        };
        if let Err(e) = sqlx::query(NOTIFY).bind(INSERT_CHANNEL).bind(&queues).execute(&db).await {
            // The pools' polling picks these jobs up meanwhile.
            tracing::warn!(error = %e, queues = ?queues, "announcing new jobs failed; pools will find them by polling");
        }
    }
    db.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::PoolWake;
    use crate::store::Shard;

    /// Local pools are woken by the announce itself, before (and without) any NOTIFY:
    /// this announcer's connection leads nowhere.
    #[tokio::test]
    async fn an_announce_wakes_the_local_pool_of_its_queue_only() {
        let (mine, other) = (Arc::new(PoolWake::default()), Arc::new(PoolWake::default()));
        let map = [("mine".to_string(), mine.clone()), ("other".to_string(), other.clone())].into_iter().collect();
        let nowhere = PgConnectOptions::new().host("127.0.0.1").port(1);
        let announcer = Announcer::start(nowhere);
        announcer.wake_locally(LocalWakers(Arc::new(map)));
        announcer.announce("mine");
        for shard in Shard::all() {
            let woken = tokio::time::timeout(Duration::from_secs(5), mine.shard(shard).notified()).await;
            woken.expect("each fetcher of the local pool of the queue is woken");
            // `other` holds no stored wake-up: a fresh notified() would wait.
            let woken = tokio::time::timeout(Duration::from_millis(1), other.shard(shard).notified()).await;
            assert!(woken.is_err(), "another queue's pool was woken");
        }
        announcer.announce("no such queue"); // no local pool: nothing to wake, no panic
    }
}
