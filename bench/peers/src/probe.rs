//! What every system's harness shares: the no-op handler's bookkeeping, the pickup
//! timing loop and the "outcome written" wait. Keeping these in one place is what makes
//! the three systems measured the same way.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
pub use molecule_bench_cpu::{Cpu, CpuUse};

/// Counts handler runs of a drain and wakes the harness when the last one ran.
#[derive(Clone, Debug)]
pub struct DrainCounter {
    ran: Arc<AtomicUsize>,
    all: Arc<Notify>,
    target: usize,
    first: Arc<OnceLock<Instant>>,
    last: Arc<OnceLock<Instant>>,
}

impl DrainCounter {
    pub fn new(target: usize) -> Self {
        Self {
            ran: Arc::new(AtomicUsize::new(0)),
            all: Arc::new(Notify::new()),
            target,
            first: Arc::new(OnceLock::new()),
            last: Arc::new(OnceLock::new()),
        }
    }

    /// Called by the no-op handler: the only work a job does.
    pub fn ran(&self) {
        self.first.get_or_init(Instant::now);
        if self.ran.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            self.last.get_or_init(Instant::now);
            self.all.notify_one();
        }
    }

    /// With PEERS_PHASES set: where a drain's time went (start → first handler → last
    /// handler → outcomes verified), on stderr.
    pub fn print_phases(&self, system: &str, t0: Instant, took: Duration) {
        if std::env::var_os("PEERS_PHASES").is_none() {
            return;
        }
        let ms = |i: Option<&Instant>| i.map(|i| i.duration_since(t0).as_secs_f64() * 1000.0).unwrap_or(f64::NAN);
        eprintln!(
            "  {system} phases: first handler {:.0} ms, last handler {:.0} ms, stopped and durable {:.0} ms",
            ms(self.first.get()),
            ms(self.last.get()),
            took.as_secs_f64() * 1000.0
        );
    }

    pub fn count(&self) -> usize {
        self.ran.load(Ordering::Relaxed)
    }

    /// Until every handler ran; panics after `limit` so a stuck peer cannot hang the run.
    pub async fn wait_all(&self, system: &str, limit: Duration) {
        if self.count() >= self.target {
            return;
        }
        if tokio::time::timeout(limit, self.all.notified()).await.is_err() && self.count() < self.target {
            panic!("{system}: only {}/{} handlers ran within {limit:?}", self.count(), self.target);
        }
    }
}

/// The pickup handler's side: the instant the handler started, sent to the harness.
pub type StartedTx = mpsc::UnboundedSender<Instant>;

pub fn started_channel() -> (StartedTx, mpsc::UnboundedReceiver<Instant>) {
    mpsc::unbounded_channel()
}

/// Pause between pickup samples, so every sample meets an idle worker.
pub const IDLE_GAP: Duration = Duration::from_millis(20);

/// Single jobs into an idle worker, `samples` times: latency in ms from BEFORE the
/// enqueue call to the handler's start (the enqueue's own cost is part of what a caller
/// waits for, and the same for every system). Sorted.
pub async fn time_pickups(
    system: &str,
    samples: usize,
    rx: &mut mpsc::UnboundedReceiver<Instant>,
    mut enqueue_one: impl AsyncFnMut(),
) -> Vec<f64> {
    let mut lat = Vec::with_capacity(samples);
    for _ in 0..samples {
        let called = Instant::now();
        enqueue_one().await;
        let started = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{system}: a single job was not picked up within 10 s"))
            .expect("handler channel open");
        lat.push(started.saturating_duration_since(called).as_secs_f64() * 1000.0);
        tokio::time::sleep(IDLE_GAP).await;
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    lat
}

/// The drain's duration once the worker has stopped: `t0` to now when `check` (every
/// job's outcome is in the database) already holds, since each system's shutdown is
/// documented to return only after its completions were written. If it does not hold
/// yet, `check` is polled until it does (panicking after 30 s) and the clock runs on to
/// that point: a drain counts only once it is durable.
pub async fn settle(system: &str, t0: Instant, mut check: impl AsyncFnMut() -> Result<(), String>) -> Duration {
    let stopped = t0.elapsed();
    if check().await.is_ok() {
        return stopped;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match check().await {
            Ok(()) => return t0.elapsed(),
            Err(why) if Instant::now() > deadline => panic!("{system}: drain not verified: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Jobs per second of `n` jobs over `since`.
pub fn rate(n: usize, since: Instant) -> f64 {
    n as f64 / since.elapsed().as_secs_f64()
}

/// One drain round of one system.
#[derive(Clone, Copy, Debug)]
pub struct Drain {
    pub enqueue_jobs_s: f64,
    pub drain_jobs_s: f64,
    /// CPU per job over the drain: the cluster's, and this process's (the system's worker).
    pub cpu: CpuUse,
}

static POSTMASTER: OnceLock<Option<u32>> = OnceLock::new();

/// The cluster whose CPU drains count (None: not on this machine; they count 0).
pub fn watch_cluster(postmaster: Option<u32>) {
    let _ = POSTMASTER.set(postmaster);
}

fn postmaster() -> Option<u32> {
    POSTMASTER.get().copied().flatten()
}

pub fn cluster_watched() -> bool {
    postmaster().is_some()
}

/// Until no autovacuum worker runs on the cluster (at most `limit`): each drain starts on a
/// quiet cluster, not beside the vacuum of the previous system's tables, whose CPU would
/// otherwise be counted and felt by whichever system drains next. A vacuum of the
/// draining system's own table during its drain still counts: that is its cost.
pub async fn until_autovacuum_idle(admin: &sqlx::PgPool, limit: Duration) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        let busy: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'")
            .fetch_one(admin)
            .await
            .unwrap_or(0);
        if busy == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t0.elapsed()
}

/// Taken when a drain's clock starts; [`Cpu::used`] when it stops.
pub fn cpu_sample() -> Cpu {
    Cpu::now(postmaster())
}
