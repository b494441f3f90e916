//! NDJSON followers (A5 streaming) of one API process share one LISTEN connection of its
//! own — outside the request pool — on the job-output and job-finished channels; each
//! NOTIFY wakes, in memory, the followers of the job it names. A follower holds no
//! database connection while it waits. Followers are capped per organization (a clear
//! 429 past the cap), end when their client goes away, and end with a final frame when
//! the server shuts down.

use molecule_domain::OrgId;
use molecule_jobs::output::{FINISHED_CHANNEL, OUTPUT_CHANNEL};
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// Default most concurrent streams per organization in one API process.
pub const DEFAULT_STREAMS_PER_ORG: usize = 64;

#[derive(Clone)]
pub struct Streams {
    inner: Arc<Inner>,
}

struct Inner {
    /// job id → (subscription id → its waker)
    subscribers: Mutex<HashMap<String, HashMap<u64, Arc<Notify>>>>,
    next_id: AtomicU64,
    per_org: Mutex<HashMap<OrgId, usize>>,
    max_per_org: usize,
    /// True once the server is shutting down: followers send their final frame.
    closing: watch::Sender<bool>,
}

impl Streams {
    /// Starts the shared listener (a connection of its own, with `db`'s settings). Call
    /// inside a tokio runtime.
    pub fn start(db: &PgPool, max_per_org: usize) -> Streams {
        let (closing, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            subscribers: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            per_org: Mutex::new(HashMap::new()),
            max_per_org: max_per_org.max(1),
            closing,
        });
        let own = PgPoolOptions::new().max_connections(1).min_connections(0).connect_lazy_with(db.connect_options().as_ref().clone());
        tokio::spawn(listen(own, Arc::downgrade(&inner)));
        Streams { inner }
    }

    /// A place for one more stream of `org`, or None when the org is at its cap.
    pub fn admit(&self, org: OrgId) -> Option<Admission> {
        let mut m = lock(&self.inner.per_org);
        let n = m.entry(org).or_insert(0);
        if *n >= self.inner.max_per_org {
            return None;
        }
        *n += 1;
        Some(Admission { inner: self.inner.clone(), org })
    }

    pub fn max_per_org(&self) -> usize {
        self.inner.max_per_org
    }

    /// Wake-ups for one job's output and end. Subscribe before reading, so nothing
    /// announced in between is missed (a wake-up is kept until it is waited for).
    pub fn subscribe(&self, job: &str) -> Subscription {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        lock(&self.inner.subscribers).entry(job.to_string()).or_default().insert(id, notify.clone());
        Subscription { inner: self.inner.clone(), job: job.to_string(), id, notify }
    }

    /// Resolves once the server started shutting down.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.inner.closing.subscribe()
    }

    /// Every follower sends its final frame and ends.
    pub fn close(&self) {
        self.inner.closing.send_replace(true);
    }
}

/// One admitted stream; its place is given back on drop.
pub struct Admission {
    inner: Arc<Inner>,
    org: OrgId,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut m = lock(&self.inner.per_org);
        if let Some(n) = m.get_mut(&self.org) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.org);
            }
        }
    }
}

pub struct Subscription {
    inner: Arc<Inner>,
    job: String,
    id: u64,
    notify: Arc<Notify>,
}

impl Subscription {
    /// Resolves at the next announcement for this job (or at once if one came since the
    /// last call).
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut m = lock(&self.inner.subscribers);
        if let Some(subs) = m.get_mut(&self.job) {
            subs.remove(&self.id);
            if subs.is_empty() {
                m.remove(&self.job);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn wake(inner: &Inner, job: Option<&str>) {
    let m = lock(&inner.subscribers);
    match job {
        Some(j) => m.get(j).into_iter().flat_map(|s| s.values()).for_each(|n| n.notify_one()),
        None => m.values().flat_map(|s| s.values()).for_each(|n| n.notify_one()),
    }
}

/// The shared LISTEN loop; ends when the hub is dropped. While it is down, followers
/// still poll (once a second), so a lost connection slows streams, never stops them.
async fn listen(own: PgPool, hub: std::sync::Weak<Inner>) {
    let mut delay = Duration::from_millis(100);
    loop {
        let connected = async {
            let mut l = PgListener::connect_with(&own).await?;
            l.listen_all([OUTPUT_CHANNEL, FINISHED_CHANNEL]).await?;
            Ok::<_, sqlx::Error>(l)
        }
        .await;
        let mut l = match connected {
            Ok(l) => l,
            Err(e) => {
                if hub.strong_count() == 0 {
                    return;
                }
                tracing::warn!(error = %e, "stream LISTEN connection failed; followers poll meanwhile");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        delay = Duration::from_millis(100);
        if let Some(h) = hub.upgrade() {
            wake(&h, None); // whatever was announced while we were not listening
        }
        loop {
            // Wake up now and then to notice that the hub is gone.
            let next = tokio::time::timeout(Duration::from_secs(5), l.try_recv()).await;
            let Some(h) = hub.upgrade() else { return };
            match next {
                Err(_) => {}
                Ok(Ok(Some(n))) => wake(&h, Some(n.payload())),
                Ok(Ok(None)) => wake(&h, None),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "stream LISTEN connection broken; reconnecting");
                    wake(&h, None);
                    break;
                }
            }
        }
    }
}
