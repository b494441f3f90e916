//! Worker pools: one per queue, each with its own concurrency, in one runtime per process.
//!
//! Per pool ([`pool`]): one fetcher per claim shard (a queue's jobs are split in two by a
//! hash of their id: [`crate::store::CLAIM_SHARDS`]) claims up to `min(free slots, batch,
//! half the pool)` jobs of its shard in one statement (`FOR UPDATE SKIP LOCKED` over the
//! partial claim index, whose second column is the shard), runs each on its own task; an
//! acker ([`acker`]) writes the outcomes back in batches, each under the fence of its
//! claim. Two claims are in flight at once and neither steps over the other's rows: one
//! claim loop kept PostgreSQL and this process, on two cores, 1.25 cores busy in a drain;
//! two keep 1.5 (`bench/queue`). Claim order holds within a shard, not across the two.
//!
//! The claim statement records its batch (worker, job ids) in `apalis.claims`, what the
//! lease rescuer reads for a dead worker; the acker deletes that row with the write of the
//! batch's last ack. A fetcher's claim starts where its last one ended, and from the head
//! of its shard about once a second ([`claim_start`]: claimed jobs' entries stay in the
//! index until a vacuum, and from the head a claim steps over all of them). When its shard
//! runs dry a fetcher sleeps until the first of: a NOTIFY for its queue (the insert
//! trigger's names the shards of the jobs inserted, so it wakes their fetchers only; an
//! announcement wakes both), the next job's `run_at` after its cursor (retries,
//! future-dated jobs of the cursor's priority), or the polling interval (missed NOTIFYs,
//! other priorities' future jobs).
//!
//! Per process: one LISTEN connection ([`listener`]) and one heartbeat connection
//! ([`heartbeat`]), both dedicated, outside every pool; claims and acks on a small pool of
//! their own ("core"); handlers on the pool they were given. So handlers that hold
//! connections can never starve claims, acks or the heartbeat that keeps their leases.
//!
//! Shutdown: stop claiming; running jobs get `grace` to finish and are acked as what they
//! are, while the heartbeat goes on (their leases hold: nobody else runs them). When the
//! grace runs out, attempts still running are interrupted ([`crate::handler::Interrupt`]);
//! then kinds that may run again are handed back (the attempt does not count) and kinds
//! that must not ([`PoolSpec::runs_once`]) end `interrupted`. The heartbeat stops, and the
//! worker rows are removed, only after the last ack.
//!
//! Lost lease: when no heartbeat has been written for half a lease, other processes are
//! about to take this one's jobs. The pools stop claiming and end their running attempts
//! the same way as at the end of a grace period (run-once kinds get at most a quarter
//! lease to stop), so nothing runs here once it may run elsewhere; they claim again when
//! beats are written again.

mod acker;
mod claim_start;
mod heartbeat;
mod listener;
mod pool;

use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;

pub(crate) use pool::PoolWake;

use crate::handler::Handler;
use crate::kinds::{JobKind, RetryPolicy};
use crate::store::workers::WorkerRow;

/// Inserts into `apalis.jobs` publish `{"job_type": …, "shards": …}` here, once per queue
/// per statement (migrations/…_statement_notify.sql, …_notify_names_shards.sql; apalis' own
/// channel name is kept), or, for enqueues announced after their commit, the
/// [`crate::announce::Announcer`] does (`{"job_type": …}`: every shard).
pub const INSERT_CHANNEL: &str = "apalis::job::insert";

#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// A job whose worker has not heartbeaten for this long is taken from it.
    pub lease: Duration,
    pub heartbeat: Duration,
    /// Fallback poll when no NOTIFY arrives.
    pub poll_interval: Duration,
    /// How long running jobs may take to finish after shutdown is asked.
    pub grace: Duration,
    /// After the grace: how long interrupted handlers of run-once kinds get to stop what
    /// they started before they are aborted (the others are aborted at once).
    pub interrupt_wait: Duration,
    /// Most jobs one claim takes.
    pub batch: usize,
    /// Identifies this process in worker names (host and pid by default).
    pub node: String,
    /// Queues whose jobs must never run twice: the lease rescuer ends theirs `interrupted`
    /// (including other processes' jobs). Defaults to the run-once [`JobKind`]s; the pools
    /// given to [`Runtime::start`] with [`PoolSpec::runs_once`] are added.
    pub run_once_queues: Vec<String>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(5),
            poll_interval: Duration::from_secs(1),
            grace: Duration::from_secs(30),
            interrupt_wait: Duration::from_secs(5),
            batch: 200,
            node: default_node(),
            run_once_queues: JobKind::ALL.iter().filter(|k| k.runs_once()).map(|k| k.queue().to_string()).collect(),
        }
    }
}

pub fn default_node() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "host".into());
    format!("{host}:{}", std::process::id())
}

/// One pool: the queue it serves, how many jobs it runs at once, and what it runs.
#[derive(Clone)]
pub struct PoolSpec {
    pub queue: String,
    pub concurrency: usize,
    pub retry: RetryPolicy,
    pub handler: Handler,
    /// Jobs of this queue must never run twice (a user's command): one still running at
    /// the end of the grace period ends `interrupted` instead of being handed back.
    pub runs_once: bool,
    /// Announce each finished job on `output::FINISHED_CHANNEL` (streaming followers wait on it).
    pub notify_finished: bool,
}

impl PoolSpec {
    pub fn new(queue: impl Into<String>, concurrency: usize, retry: RetryPolicy, handler: Handler) -> Self {
        PoolSpec { queue: queue.into(), concurrency, retry, handler, runs_once: false, notify_finished: false }
    }

    /// The pool of a product kind, with the kind's retry policy and shutdown rule.
    pub fn for_kind(kind: JobKind, concurrency: usize, handler: Handler) -> Self {
        PoolSpec {
            queue: kind.queue().to_string(),
            concurrency,
            retry: kind.retry_policy(),
            handler,
            runs_once: kind.runs_once(),
            notify_finished: kind.streams_output(),
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Jobs still running when the grace period ended, handed back to the queue.
    pub released: u64,
    /// Jobs still running when the grace period ended that must not run twice: `interrupted`.
    pub interrupted: u64,
    /// Acks refused because their fence was stale (over the runtime's life).
    pub stale_acks: u64,
}

/// What every pool of a process shares.
struct Shared {
    /// Handlers' pool (given by the caller).
    db: PgPool,
    /// Claims, acks, next-due reads and the lease rescuer: a pool of their own.
    core: PgPool,
    cfg: RuntimeConfig,
    stale_acks: AtomicU64,
    /// Acks written and applied (see [`Runtime::acks_applied`]).
    acks_applied: AtomicU64,
}

/// The wakers of a runtime's pools, by queue: what a NOTIFY for the queue would wake.
#[derive(Clone, Default)]
pub struct LocalWakers(pub(crate) Arc<std::collections::HashMap<String, Arc<PoolWake>>>);

impl LocalWakers {
    /// Wakes this process's pool of `queue`, if it runs one; whether it does.
    pub fn wake(&self, queue: &str) -> bool {
        self.0.get(queue).map(|n| n.wake()).is_some()
    }
}

pub struct Runtime {
    pools_stop: watch::Sender<bool>,
    services_stop: watch::Sender<bool>,
    pools: Vec<tokio::task::JoinHandle<pool::PoolReport>>,
    services: Vec<tokio::task::JoinHandle<()>>,
    heartbeat: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
    wakers: LocalWakers,
}

impl Runtime {
    /// Starts every pool. Never fails: a database that is down now is retried by each pool.
    pub fn start(db: PgPool, mut cfg: RuntimeConfig, specs: Vec<PoolSpec>) -> Runtime {
        // The rescuer ends run-once jobs `interrupted`: the product's run-once kinds (the
        // default) and whatever pool here says so, from one source each.
        for spec in specs.iter().filter(|s| s.runs_once) {
            if !cfg.run_once_queues.contains(&spec.queue) {
                cfg.run_once_queues.push(spec.queue.clone());
            }
        }
        let options = db.connect_options().as_ref().clone();
        // A claimer per claim shard and an acker per pool, plus the lease rescuer: none of
        // them waits for a connection a handler holds.
        let per_pool = crate::store::CLAIM_SHARDS + 1;
        let core = molecule_domain::db::pool_options(molecule_domain::db::PING_IF_IDLE_FOR)
            .max_connections((per_pool * specs.len() + 1).max(2) as u32)
            .connect_lazy_with(options.clone());
        let shared = Arc::new(Shared { db, core, cfg, stale_acks: AtomicU64::new(0), acks_applied: AtomicU64::new(0) });
        let (pools_stop, pools_rx) = watch::channel(false);
        let (services_stop, services_rx) = watch::channel(false);
        // False until the first beat is written, and again whenever beats lapse for half a lease.
        let (lease_tx, lease_rx) = watch::channel(false);
        let mut wakers = std::collections::HashMap::new();
        let mut rows = Vec::new();
        let mut pools = Vec::new();
        for spec in specs {
            let row = WorkerRow {
                id: format!("{}@{}#{}", spec.queue, shared.cfg.node, ulid::Ulid::generate()),
                queue: spec.queue.clone(),
                concurrency: spec.concurrency,
            };
            let wake = Arc::new(PoolWake::default());
            wakers.insert(spec.queue.clone(), wake.clone());
            rows.push(row.clone());
            pools.push(tokio::spawn(pool::run(shared.clone(), spec, row.id, wake, lease_rx.clone(), pools_rx.clone())));
        }
        let beat = heartbeat::Heartbeat { options: options.clone(), interval: shared.cfg.heartbeat, lease: shared.cfg.lease, rows };
        let heartbeat = tokio::spawn(heartbeat::run(beat, lease_tx, services_rx.clone()));
        let wakers = LocalWakers(Arc::new(wakers));
        let services = vec![
            tokio::spawn(listener::run(options, wakers.0.clone(), services_rx.clone())),
            tokio::spawn(run_rescuer(shared.clone(), pools_rx)),
        ];
        Runtime { pools_stop, services_stop, pools, services, heartbeat, shared, wakers }
    }

    /// Its pools' wakers, for an [`crate::Announcer`] in the same process
    /// ([`crate::Announcer::wake_locally`]).
    pub fn local_wakers(&self) -> LocalWakers {
        self.wakers.clone()
    }

    /// Acks refused so far because a newer claim of their job exists.
    pub fn stale_acks(&self) -> u64 {
        self.shared.stale_acks.load(Ordering::Relaxed)
    }

    /// Acks written and applied so far, every pool: an outcome, a failed attempt's retry,
    /// a hand-back (a retried job counts once per attempt). For watching a drain of jobs
    /// that succeed, as bench/queue does. A batch whose write committed but whose answer
    /// was lost is written again and reads as refused: its acks are not counted.
    pub fn acks_applied(&self) -> u64 {
        self.shared.acks_applied.load(Ordering::Relaxed)
    }

    /// Stops claiming, lets running jobs finish within the grace period, interrupts the
    /// rest, writes every outcome — heartbeating all along — then stops the heartbeat and
    /// removes this process's worker rows.
    pub async fn shutdown(self) -> ShutdownReport {
        let _ = self.pools_stop.send(true);
        let mut report = ShutdownReport::default();
        for p in self.pools {
            let r = p.await.unwrap_or_default();
            report.released += r.released;
            report.interrupted += r.interrupted;
        }
        let _ = self.services_stop.send(true);
        for s in self.services {
            let _ = s.await;
        }
        let _ = self.heartbeat.await;
        report.stale_acks = self.shared.stale_acks.load(Ordering::Relaxed);
        self.shared.core.close().await;
        report
    }
}

/// How often the lease rescuer reads the whole job table, besides the claimed batches every
/// third of a lease (maintenance/lease_rescuer.rs: jobs claimed without a batch row, by a
/// version from before it, wait up to this long after their lease). The first read is one
/// lease after the start, not at it: a rolling restart's new process starts while the
/// old one's heartbeat is still fresh (at the start it finds nothing to take; a lease
/// later, the old one's jobs), and a process started under load — a scaled-out worker,
/// a benchmark's — does not read a large table at once.
const WHOLE_TABLE_RESCUE_EVERY: Duration = Duration::from_secs(300);

/// The lease rescuer, and the stats refresher beside it, every third of a lease, until the
/// pools stop.
async fn run_rescuer(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    use crate::maintenance::Scope;
    let period = (shared.cfg.lease / 3).max(Duration::from_millis(200));
    let run_once: Vec<&str> = shared.cfg.run_once_queues.iter().map(String::as_str).collect();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut whole_table_next = tokio::time::Instant::now() + shared.cfg.lease.min(WHOLE_TABLE_RESCUE_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let mut scopes = vec![Scope::ClaimedBatches];
        // Within half a period of it: ticks count from the interval's start, a hair before
        // `whole_table_next` was set, and would otherwise miss it by a tick.
        if tokio::time::Instant::now() + period / 2 >= whole_table_next {
            whole_table_next = tokio::time::Instant::now() + WHOLE_TABLE_RESCUE_EVERY;
            scopes.push(Scope::WholeTable);
        }
        for scope in scopes {
            match crate::maintenance::rescue_expired_leases(&shared.core, shared.cfg.lease, &run_once, scope).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(rescued = n, ?scope, "took back jobs of workers past their lease"),
                Err(e) => tracing::warn!(error = %e, ?scope, "lease rescue failed"),
            }
        }
        match crate::maintenance::refresh_if_outgrown(&shared.core).await {
            Ok(true) => tracing::info!("analyzed apalis.jobs: it had outgrown its planner statistics"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "refreshing the job table's planner statistics failed"),
        }
    }
}

/// Exponential wait after database errors: 100 ms doubling to 5 s, cut short by `stop`.
pub(crate) struct ErrorBackoff(Duration);

impl ErrorBackoff {
    pub(crate) fn new() -> Self {
        Self(Duration::from_millis(100))
    }
    pub(crate) fn reset(&mut self) {
        self.0 = Duration::from_millis(100);
    }
    pub(crate) async fn wait(&mut self, stop: &mut watch::Receiver<bool>) {
        tokio::select! {
            _ = tokio::time::sleep(self.0) => {}
            _ = stop.changed() => {}
        }
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enqueue::{NewJob, enqueue};
    use crate::maintenance::lease_rescuer::claim_without_batch_row;
    use crate::store::workers::{WorkerRow, heartbeat};
    use molecule_domain::JobId;
    use molecule_domain::testing::fresh_db;
    use std::sync::atomic::AtomicUsize;

    /// A runtime for one test: a heartbeat of 300 ms, the rest as the test needs.
    fn test_cfg(lease: Duration, poll_interval: Duration, grace: Duration) -> RuntimeConfig {
        RuntimeConfig { lease, heartbeat: Duration::from_millis(300), poll_interval, grace, node: "test".into(), ..Default::default() }
    }

    /// A job claimed without a batch row (by a version from before them) whose worker died
    /// just before this process started: at the start its lease still holds; the runtime's
    /// first whole-table rescue comes a lease after its start, and takes it then (read only
    /// at the start, it waited for the next read, five minutes on).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batchless_job_of_a_worker_that_died_just_before_the_start_is_rescued_a_lease_later() {
        let (db, _) = fresh_db().await;
        let mut conn = db.acquire().await.unwrap();
        let old = WorkerRow { id: "old@host:1#before".into(), queue: "upgrade".into(), concurrency: 1 };
        heartbeat(&mut conn, std::slice::from_ref(&old)).await.unwrap();
        let id = enqueue(&mut conn, &NewJob::to_queue("upgrade", &serde_json::json!({})).max_attempts(3)).await.unwrap();
        claim_without_batch_row(&db, id.as_str(), &old.id).await;
        drop(conn);
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let handler = crate::handler_fn(move |_ctx| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(serde_json::Value::Null)
            }
        });
        let cfg = test_cfg(Duration::from_secs(2), Duration::from_millis(500), Duration::from_secs(5));
        let policy = RetryPolicy { base: Duration::from_millis(50), cap: Duration::from_secs(30), max_attempts: 10 };
        let rt = Runtime::start(db.clone(), cfg, vec![PoolSpec::new("upgrade", 2, policy, handler)]);
        let give_up = tokio::time::Instant::now() + Duration::from_secs(15);
        let (status, attempts) = loop {
            let (status, attempts): (String, i32) =
                sqlx::query_as("SELECT status, attempts FROM apalis.jobs WHERE id = $1").bind(id.as_str()).fetch_one(&db).await.unwrap();
            if status == "Done" || tokio::time::Instant::now() >= give_up {
                break (status, attempts);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        rt.shutdown().await;
        assert_eq!(status, "Done", "not rescued and run within 15 s of the start");
        assert_eq!(attempts, 2, "rescued once, then run here");
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    /// With no shutdown grace (MOLECULE_SHUTDOWN_GRACE_SECS=0), the hand-back written at
    /// shutdown meets faults of the moment (two serialization failures): it is retried, not
    /// dropped. Dropped, the job stayed Running under a worker that had left, for some
    /// rescuer to count the attempt — its last: dead, never having finished.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ack_at_shutdown_outlives_a_fault_of_the_moment_with_no_grace() {
        let (db, _) = fresh_db().await;
        let (started_tx, mut started) = watch::channel(false);
        let started_tx = Arc::new(started_tx);
        let handler = crate::handler_fn(move |ctx: crate::JobContext| {
            let started_tx = started_tx.clone();
            async move {
                started_tx.send_replace(true);
                ctx.interrupt.wait().await;
                Err(crate::JobError::Interrupted)
            }
        });
        let cfg = test_cfg(Duration::from_secs(4), Duration::from_millis(100), Duration::ZERO);
        let policy = RetryPolicy { base: Duration::from_millis(50), cap: Duration::from_secs(1), max_attempts: 1 };
        let rt = Runtime::start(db.clone(), cfg, vec![PoolSpec::new("nograce", 1, policy, handler)]);
        let mut conn = db.acquire().await.unwrap();
        let id = enqueue(&mut conn, &NewJob::to_queue("nograce", &serde_json::json!({})).max_attempts(1)).await.unwrap();
        drop(conn);
        tokio::time::timeout(Duration::from_secs(15), started.wait_for(|s| *s)).await.expect("the job started").unwrap();
        // From now on, the first two writes of a job row fail as a serialization failure
        // would (a sequence: its count survives the failed statements' rollback).
        sqlx::raw_sql(
            "CREATE SEQUENCE ack_faults;
             CREATE FUNCTION fail_twice() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF nextval('ack_faults') <= 2 THEN RAISE EXCEPTION 'injected' USING ERRCODE = '40001'; END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER fail_twice BEFORE UPDATE ON apalis.jobs FOR EACH ROW EXECUTE FUNCTION fail_twice();",
        )
        .execute(&db)
        .await
        .unwrap();
        let report = tokio::time::timeout(Duration::from_secs(20), rt.shutdown()).await.expect("shut down");
        assert_eq!(report.released, 1);
        let tries: i64 = sqlx::query_scalar("SELECT last_value FROM ack_faults").fetch_one(&db).await.unwrap();
        assert!(tries >= 3, "the faults were met ({tries} writes)");
        let (status, lock_by, attempts): (String, Option<String>, i32) =
            sqlx::query_as("SELECT status, lock_by, attempts FROM apalis.jobs WHERE id = $1")
                .bind(id.as_str())
                .fetch_one(&db)
                .await
                .unwrap();
        assert_eq!((status.as_str(), lock_by, attempts), ("Pending", None, 0), "handed back, its attempt not counted");
    }

    /// Acks that keep failing at shutdown are given up half a lease after the first failure,
    /// whatever the grace: retried for the grace instead, a shutdown could run a whole
    /// grace past the kubelet's terminationGracePeriodSeconds (then SIGKILL).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acks_failing_at_shutdown_are_given_up_after_half_a_lease_whatever_the_grace() {
        let (db, _) = fresh_db().await;
        let (started_tx, mut started) = watch::channel(false);
        let (finish_tx, finish) = watch::channel(false);
        let started_tx = Arc::new(started_tx);
        let handler = crate::handler_fn(move |_ctx: crate::JobContext| {
            let (started_tx, mut finish) = (started_tx.clone(), finish.clone());
            async move {
                started_tx.send_replace(true);
                let _ = finish.wait_for(|f| *f).await;
                Ok(serde_json::Value::Null)
            }
        });
        let cfg = test_cfg(Duration::from_secs(4), Duration::from_millis(100), Duration::from_secs(20));
        let policy = RetryPolicy { base: Duration::from_millis(50), cap: Duration::from_secs(1), max_attempts: 3 };
        let rt = Runtime::start(db.clone(), cfg, vec![PoolSpec::new("longgrace", 1, policy, handler)]);
        let mut conn = db.acquire().await.unwrap();
        enqueue(&mut conn, &NewJob::to_queue("longgrace", &serde_json::json!({}))).await.unwrap();
        drop(conn);
        tokio::time::timeout(Duration::from_secs(15), started.wait_for(|s| *s)).await.expect("the job started").unwrap();
        // Every write of a job row fails from now on, as in an outage.
        sqlx::raw_sql(
            "CREATE FUNCTION fail_always() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = '40001'; END $$;
             CREATE TRIGGER fail_always BEFORE UPDATE ON apalis.jobs FOR EACH ROW EXECUTE FUNCTION fail_always();",
        )
        .execute(&db)
        .await
        .unwrap();
        finish_tx.send_replace(true);
        let began = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(30), rt.shutdown()).await.expect("shut down");
        let took = began.elapsed();
        // Half a lease (2 s) after the first failure seen at shutdown, not the 20 s grace.
        assert!(took < Duration::from_secs(8), "shutdown took {took:?}");
    }

    /// A claim commits but its answer never reaches the pool (here: the pool's claim fails,
    /// and an earlier claim of the same worker whose answer was lost is in the table): its
    /// jobs must not stay Running under a live worker for ever. The fetcher settles its
    /// shard's unknown batches before it claims again; the job runs, its lost attempt
    /// counted. A claim that commits just after that settling (staged: by a trigger, in the
    /// settling's own transaction, after its snapshot) is settled after the next claim.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_jobs_of_a_claim_whose_answer_was_lost_are_handed_back() {
        let (db, _) = fresh_db().await;
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let handler = crate::handler_fn(move |_ctx| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(serde_json::Value::Null)
            }
        });
        let cfg = test_cfg(Duration::from_secs(30), Duration::from_millis(100), Duration::from_secs(5));
        let policy = RetryPolicy { base: Duration::from_millis(50), cap: Duration::from_secs(1), max_attempts: 3 };
        let rt = Runtime::start(db.clone(), cfg, vec![PoolSpec::new("lostreply", 2, policy, handler)]);
        let worker: String = loop {
            let w: Option<String> =
                sqlx::query_scalar("SELECT id FROM apalis.workers WHERE worker_type = 'lostreply'").fetch_optional(&db).await.unwrap();
            if let Some(w) = w {
                break w;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut conn = db.acquire().await.unwrap();
        // Not due: the pool leaves it alone until the claim below takes it.
        let later = chrono::Utc::now() + chrono::Duration::hours(1);
        let lost = enqueue(&mut conn, &NewJob::to_queue("lostreply", &serde_json::json!({})).run_at(later)).await.unwrap();
        // The claim whose answer was lost: committed under the pool's worker id.
        sqlx::query(
            "WITH j AS (UPDATE apalis.jobs SET status = 'Running', lock_by = $2, lock_at = now(), started_at = now(), \
             run_at = now(), attempts = attempts + 1, fence = fence + 1 WHERE id = $1 RETURNING id) \
             INSERT INTO apalis.claims (worker_id, ids) SELECT $2, array_agg(id) FROM j",
        )
        .bind(lost.as_str())
        .bind(&worker)
        .execute(&db)
        .await
        .unwrap();
        // The pool's next claim in that shard fails (once), as the lost one did.
        let shard = crate::store::Shard::of(&db, lost.as_str()).await.unwrap().index();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE SEQUENCE claim_faults;
             CREATE FUNCTION fail_a_claim() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF (hashtext(NEW.ids[1]) & 1) = {shard} AND nextval('claim_faults') = 1 THEN
                 RAISE EXCEPTION 'injected' USING ERRCODE = '40001';
               END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER fail_a_claim BEFORE INSERT ON apalis.claims FOR EACH ROW EXECUTE FUNCTION fail_a_claim();"
        )))
        .execute(&db)
        .await
        .unwrap();
        // Jobs in that shard, for the pool to claim; and one (not due) for the late claim.
        let mut others = Vec::new();
        let late = loop {
            let job = NewJob::to_queue("lostreply", &serde_json::json!({}));
            let job = if others.len() < 2 { job } else { job.run_at(later) };
            let id = enqueue(&mut conn, &job).await.unwrap();
            if crate::store::Shard::of(&db, id.as_str()).await.unwrap().index() == shard {
                if others.len() == 2 {
                    break id;
                }
                others.push(id);
            }
        };
        // The late claim: committed with the settling that hands `lost` back.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE FUNCTION claim_late() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               UPDATE apalis.jobs SET status = 'Running', lock_by = '{worker}', lock_at = now(), started_at = now(),
                 run_at = now(), attempts = attempts + 1, fence = fence + 1 WHERE id = '{late}';
               INSERT INTO apalis.claims (worker_id, ids) VALUES ('{worker}', ARRAY['{late}']);
               RETURN NULL;
             END $$;
             CREATE TRIGGER claim_late AFTER UPDATE ON apalis.jobs FOR EACH ROW
               WHEN (OLD.id = '{lost}' AND OLD.status = 'Running' AND NEW.lock_by IS NULL)
               EXECUTE FUNCTION claim_late();",
            late = late.as_str(),
            lost = lost.as_str(),
        )))
        .execute(&mut *conn)
        .await
        .unwrap();
        drop(conn);
        let give_up = tokio::time::Instant::now() + Duration::from_secs(15);
        let read = |id: JobId| {
            let db = db.clone();
            async move {
                let row: (String, i32, serde_json::Value) =
                    sqlx::query_as("SELECT status, attempts, attempt_log FROM apalis.jobs WHERE id = $1")
                        .bind(id.as_str())
                        .fetch_one(&db)
                        .await
                        .unwrap();
                row
            }
        };
        let (lost_row, late_row) = loop {
            let (a, b) = (read(lost.clone()).await, read(late.clone()).await);
            if (a.0 == "Done" && b.0 == "Done") || tokio::time::Instant::now() >= give_up {
                break (a, b);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        rt.shutdown().await;
        let faults: i64 = sqlx::query_scalar("SELECT last_value FROM claim_faults").fetch_one(&db).await.unwrap();
        assert!(faults >= 1, "a claim failed");
        for (what, (status, attempts, log)) in [("lost", lost_row), ("late", late_row)] {
            assert_eq!(status, "Done", "the {what} claim's job still {status} after 15 s");
            // Not counted: none of them started (an exec, one attempt, must not end for it).
            assert_eq!(attempts, 1, "the {what} claim's attempt is not counted");
            assert_eq!(log, serde_json::json!([]), "{what}: no failed attempt");
        }
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.claims").fetch_one(&db).await.unwrap();
        assert_eq!(left, 0, "no batch row left behind");
    }

    /// A column of a type this build does not read (a newer version's migration, mid
    /// rolling deploy) fails every row alike: that fails the claim, and its jobs go back
    /// uncounted, for a process that reads them — none ends `dead` for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_column_type_this_build_does_not_read_fails_the_claim_not_the_jobs() {
        let (db, _) = fresh_db().await;
        let handler = crate::handler_fn(|_ctx| async { Ok(serde_json::Value::Null) });
        let cfg = test_cfg(Duration::from_secs(30), Duration::from_millis(100), Duration::from_secs(5));
        let policy = RetryPolicy { base: Duration::from_millis(50), cap: Duration::from_secs(1), max_attempts: 1 };
        sqlx::raw_sql(
            "ALTER TABLE apalis.jobs ALTER COLUMN priority TYPE int8;
             CREATE SEQUENCE claims_made;
             CREATE FUNCTION count_claims() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM nextval('claims_made'); RETURN NULL; END $$;
             CREATE TRIGGER count_claims AFTER INSERT ON apalis.claims FOR EACH ROW EXECUTE FUNCTION count_claims();",
        )
        .execute(&db)
        .await
        .unwrap();
        let mut conn = db.acquire().await.unwrap();
        let job = enqueue(&mut conn, &NewJob::to_queue("newer", &serde_json::json!({})).max_attempts(1)).await.unwrap();
        drop(conn);
        let rt = Runtime::start(db.clone(), cfg, vec![PoolSpec::new("newer", 2, policy, handler)]);
        let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
        // Claimed three times: handed back twice in between, not ended.
        loop {
            let n: i64 =
                sqlx::query_scalar("SELECT last_value FROM claims_made WHERE is_called").fetch_optional(&db).await.unwrap().unwrap_or(0);
            if n >= 3 {
                break;
            }
            assert!(tokio::time::Instant::now() < give_up, "claimed {n} times in 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let status: String =
            sqlx::query_scalar("SELECT status FROM apalis.jobs WHERE id = $1").bind(job.as_str()).fetch_one(&db).await.unwrap();
        assert_ne!(status, "Killed", "the job ended for a type its worker could not read");
        rt.shutdown().await;
        let (status, attempts): (String, i32) =
            sqlx::query_as("SELECT status, attempts FROM apalis.jobs WHERE id = $1").bind(job.as_str()).fetch_one(&db).await.unwrap();
        assert_eq!((status.as_str(), attempts), ("Pending", 0), "back, uncounted, for a process that reads it");
    }

    /// A row that fails to decode does not fail the claim that takes it (which would take it
    /// again after every hand-back, its batch-mates with it): it alone ends `dead` at once,
    /// and the other job runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_that_never_decodes_ends_failed_instead_of_going_round() {
        let (db, _) = fresh_db().await;
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let handler = crate::handler_fn(move |_ctx| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(serde_json::Value::Null)
            }
        });
        let cfg = test_cfg(Duration::from_secs(30), Duration::from_millis(100), Duration::from_secs(5));
        let policy = RetryPolicy { base: Duration::from_millis(50), cap: Duration::from_secs(1), max_attempts: 3 };
        // A payload no claim can decode (`job` is not an Option).
        sqlx::query("ALTER TABLE apalis.jobs ALTER COLUMN job DROP NOT NULL").execute(&db).await.unwrap();
        let mut conn = db.acquire().await.unwrap();
        let poison = enqueue(&mut conn, &NewJob::to_queue("poison", &serde_json::json!({})).max_attempts(3)).await.unwrap();
        sqlx::query("UPDATE apalis.jobs SET job = NULL WHERE id = $1").bind(poison.as_str()).execute(&mut *conn).await.unwrap();
        // A healthy job in the poison's shard: one claim takes both, so the batch mixes them.
        let shard = crate::store::Shard::of(&db, poison.as_str()).await.unwrap();
        let healthy = loop {
            let id = enqueue(&mut conn, &NewJob::to_queue("poison", &serde_json::json!({})).max_attempts(3)).await.unwrap();
            if crate::store::Shard::of(&db, id.as_str()).await.unwrap() == shard {
                break id;
            }
            sqlx::query("DELETE FROM apalis.jobs WHERE id = $1").bind(id.as_str()).execute(&mut *conn).await.unwrap();
        };
        // Which batch each of them was claimed in.
        sqlx::raw_sql(
            "CREATE TABLE claimed_in (job text, batch int8);
             CREATE FUNCTION note_claims() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO claimed_in SELECT unnest(NEW.ids), NEW.id; RETURN NULL; END $$;
             CREATE TRIGGER note_claims AFTER INSERT ON apalis.claims FOR EACH ROW EXECUTE FUNCTION note_claims();",
        )
        .execute(&mut *conn)
        .await
        .unwrap();
        drop(conn);
        // Four slots, two a fetcher.
        let rt = Runtime::start(db.clone(), cfg, vec![PoolSpec::new("poison", 4, policy, handler)]);
        let give_up = tokio::time::Instant::now() + Duration::from_secs(15);
        let read = |id: JobId| {
            let db = db.clone();
            async move {
                let row: (String, Option<String>, i32, Option<String>) =
                    sqlx::query_as("SELECT status, outcome, attempts, last_error FROM apalis.jobs WHERE id = $1")
                        .bind(id.as_str())
                        .fetch_one(&db)
                        .await
                        .unwrap();
                row
            }
        };
        let (bad, good) = loop {
            let (a, b) = (read(poison.clone()).await, read(healthy.clone()).await);
            if (a.0 == "Killed" && b.0 == "Done") || tokio::time::Instant::now() >= give_up {
                break (a, b);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        rt.shutdown().await;
        assert_eq!((bad.0.as_str(), bad.1.as_deref(), bad.2), ("Killed", Some("failed"), 1), "the poison row after 15 s: {bad:?}");
        assert!(bad.3.as_deref().unwrap_or_default().starts_with("undecodable_payload: "), "{bad:?}");
        assert_eq!((good.0.as_str(), good.2), ("Done", 1), "the healthy job: {good:?}");
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        let batches: Vec<(String, i64)> = sqlx::query_as("SELECT job, batch FROM claimed_in").fetch_all(&db).await.unwrap();
        assert_eq!(batches.len(), 2, "each claimed once: {batches:?}");
        assert_eq!(batches[0].1, batches[1].1, "in one batch: {batches:?}");
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.claims").fetch_one(&db).await.unwrap();
        assert_eq!(left, 0, "no batch row left behind");
    }
}
