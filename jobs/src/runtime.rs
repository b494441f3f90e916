//! Worker pools: one per queue, each with its own concurrency, in one runtime per process.
//!
//! Per pool: a fetcher claims up to `min(free slots, batch)` jobs in one statement
//! (`FOR UPDATE SKIP LOCKED` over the partial claim index), runs each on its own task,
//! and an acker writes outcomes back in batches. When the queue runs dry the fetcher
//! sleeps until the first of: a NOTIFY for its queue (the insert trigger), the next
//! job's `run_at` (retries, future-dated jobs), or the polling interval (missed NOTIFYs).
//!
//! Per process: one LISTEN connection, one heartbeat for every pool's worker row, and
//! the orphan reaper. Database errors anywhere back off and retry; nothing ends a pool
//! but shutdown.

use futures_util::FutureExt;
use molecule_domain::{JobId, OrgId, WorkspaceId};
use serde_json::Value;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::backoff::retry_delay;
use crate::handler::{Handler, JobContext, JobError};
use crate::kinds::RetryPolicy;
use crate::maintenance;

/// Inserts into `apalis.jobs` publish `{"job_type": …}` here, once per queue per statement
/// (migrations/…_statement_notify.sql; apalis' own channel name is kept).
pub const INSERT_CHANNEL: &str = "apalis::job::insert";

#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// A job whose worker has not heartbeaten for this long is run again elsewhere.
    pub lease: Duration,
    pub heartbeat: Duration,
    /// Fallback poll when no NOTIFY arrives.
    pub poll_interval: Duration,
    /// How long running jobs may take to finish after shutdown is asked.
    pub grace: Duration,
    /// Most jobs one claim takes.
    pub batch: usize,
    /// Identifies this process in worker names (host and pid by default).
    pub node: String,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(5),
            poll_interval: Duration::from_secs(1),
            grace: Duration::from_secs(30),
            batch: 200,
            node: default_node(),
        }
    }
}

pub fn default_node() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("{host}:{}", std::process::id())
}

/// One pool: the queue it serves, how many jobs it runs at once, and what it runs.
#[derive(Clone)]
pub struct PoolSpec {
    pub queue: String,
    pub concurrency: usize,
    pub retry: RetryPolicy,
    pub handler: Handler,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Jobs still running when the grace period ended, handed back to the queue.
    pub released: u64,
}

pub struct Runtime {
    shutdown: watch::Sender<bool>,
    pools: Vec<tokio::task::JoinHandle<u64>>,
    services: Vec<tokio::task::JoinHandle<()>>,
    worker_ids: Vec<String>,
}

struct Shared {
    db: PgPool,
    cfg: RuntimeConfig,
}

impl Runtime {
    /// Starts every pool. Never fails: a database that is down now is retried by each pool.
    pub fn start(db: PgPool, cfg: RuntimeConfig, specs: Vec<PoolSpec>) -> Runtime {
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared { db, cfg });
        let mut wakers = HashMap::new();
        let mut worker_ids = Vec::new();
        let mut pools = Vec::new();
        for spec in specs {
            let worker_id = format!("{}@{}#{}", spec.queue, shared.cfg.node, ulid::Ulid::generate());
            let notify = Arc::new(Notify::new());
            wakers.insert(spec.queue.clone(), notify.clone());
            worker_ids.push(worker_id.clone());
            pools.push(tokio::spawn(run_pool(shared.clone(), spec, worker_id, notify, shutdown_rx.clone())));
        }
        let services = vec![
            tokio::spawn(run_listener(shared.clone(), Arc::new(wakers), shutdown_rx.clone())),
            tokio::spawn(run_heartbeat(shared.clone(), worker_ids.clone(), shutdown_rx.clone())),
            tokio::spawn(run_reaper(shared.clone(), shutdown_rx)),
        ];
        Runtime { shutdown, pools, services, worker_ids }
    }

    pub fn worker_ids(&self) -> &[String] {
        &self.worker_ids
    }

    /// Stops fetching, lets running jobs finish within the grace period, hands the rest
    /// back to the queue, and flushes every outcome.
    pub async fn shutdown(self) -> ShutdownReport {
        let _ = self.shutdown.send(true);
        let mut report = ShutdownReport::default();
        for p in self.pools {
            report.released += p.await.unwrap_or(0);
        }
        for s in self.services {
            let _ = s.await;
        }
        report
    }
}

/// A claimed job as the claim statement returns it.
type Claimed = (String, Vec<u8>, i32, i32, Option<Uuid>, Option<Uuid>, bool);

/// `id = ANY(ARRAY(…))` keeps the update on the primary key; a join against the CTE let
/// the planner hash-join a sequential scan of the whole table (slower with every row kept).
const CLAIM: &str = r#"
UPDATE apalis.jobs AS j
SET status = 'Running', lock_by = $3, lock_at = now(), started_at = now(),
    attempts = j.attempts + 1
WHERE j.id = ANY(ARRAY(
    SELECT id FROM apalis.jobs
    WHERE job_type = $1 AND status IN ('Pending', 'Failed') AND run_at <= now()
    ORDER BY priority DESC, run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
))
RETURNING j.id, j.job, j.attempts, j.max_attempts, j.org_id, j.workspace_id,
          (j.expires_at IS NOT NULL AND j.expires_at <= now()) AS expired
"#;

/// Milliseconds until the queue's next job is due (negative: due now), NULL when empty.
const NEXT_DUE: &str = r#"
SELECT (EXTRACT(EPOCH FROM (min(run_at) - now())) * 1000)::float8
FROM apalis.jobs
WHERE job_type = $1 AND status IN ('Pending', 'Failed')
"#;

const REGISTER_WORKER: &str = r#"
INSERT INTO apalis.workers (id, worker_type, storage_name, layers, last_seen, started_at)
VALUES ($1, $2, 'molecule', $3, now(), now())
ON CONFLICT (id) DO UPDATE SET last_seen = now()
"#;

/// Jobs this worker still holds after its last ack: unfinished, so handed back untouched
/// (the interrupted attempt does not count).
const RELEASE: &str = r#"
UPDATE apalis.jobs
SET status = 'Pending', lock_by = NULL, lock_at = NULL, started_at = NULL,
    attempts = greatest(attempts - 1, 0), run_at = now()
WHERE lock_by = $1 AND status = 'Running'
"#;

async fn run_pool(
    shared: Arc<Shared>,
    spec: PoolSpec,
    worker_id: String,
    notify: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) -> u64 {
    let db = &shared.db;
    let cfg = &shared.cfg;
    let queue = spec.queue.clone();

    // Register (retrying: the database may not be up yet).
    let mut backoff = ErrorBackoff::new();
    loop {
        if *shutdown.borrow() {
            return 0;
        }
        let layers = format!("concurrency={}", spec.concurrency);
        match sqlx::query(REGISTER_WORKER).bind(&worker_id).bind(&queue).bind(&layers).execute(db).await {
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(queue, error = %e, "cannot register worker; retrying");
                backoff.wait(&mut shutdown).await;
            }
        }
    }
    tracing::info!(queue, worker_id, concurrency = spec.concurrency, "pool started");

    let slots = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<Ack>();
    let acker = tokio::spawn(run_acker(db.clone(), worker_id.clone(), ack_rx, cfg.grace, notify.clone()));
    let mut running: JoinSet<()> = JoinSet::new();
    let mut backoff = ErrorBackoff::new();

    while !*shutdown.borrow() {
        while running.try_join_next().is_some() {}
        let free = slots.available_permits();
        if free == 0 {
            tokio::select! {
                p = slots.acquire() => drop(p),
                _ = shutdown.changed() => {}
            }
            continue;
        }
        let want = free.min(cfg.batch.max(1));
        let claimed: Vec<Claimed> = match sqlx::query_as(CLAIM)
            .bind(&queue)
            .bind(want as i64)
            .bind(&worker_id)
            .fetch_all(db)
            .await
        {
            Ok(rows) => {
                backoff.reset();
                rows
            }
            Err(e) => {
                tracing::warn!(queue, error = %e, "claim failed; backing off");
                backoff.wait(&mut shutdown).await;
                continue;
            }
        };
        let n = claimed.len();
        for (id, payload, attempt, max_attempts, org, ws, expired) in claimed {
            if expired {
                let _ = ack_tx.send(Ack::expired(id));
                continue;
            }
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                // Cannot happen (only this loop takes slots and it asked for `free`);
                // if it did, the job goes back rather than overfilling the pool.
                let _ = ack_tx.send(Ack::release(id));
                continue;
            };
            let ctx = JobContext {
                id: JobId::from_db(id),
                queue: queue.clone(),
                attempt,
                max_attempts,
                org_id: org.map(OrgId),
                workspace_id: ws.map(WorkspaceId),
                payload: payload.into(),
                db: db.clone(),
            };
            let handler = spec.handler.clone();
            let retry = spec.retry;
            let ack_tx = ack_tx.clone();
            running.spawn(async move {
                let id = ctx.id.as_str().to_string();
                let outcome = AssertUnwindSafe(handler(ctx)).catch_unwind().await;
                let ack = match outcome {
                    Ok(Ok(result)) => Ack::succeeded(id, result),
                    Ok(Err(e)) => Ack::failed(id, &e, attempt, max_attempts, &retry),
                    Err(_) => Ack::failed(
                        id,
                        &JobError::Retryable("handler panicked".into()),
                        attempt,
                        max_attempts,
                        &retry,
                    ),
                };
                let _ = ack_tx.send(ack);
                drop(permit);
            });
        }
        if n < want {
            let wait = match sqlx::query_scalar::<_, Option<f64>>(NEXT_DUE).bind(&queue).fetch_one(db).await {
                Ok(Some(ms)) if ms > 0.0 => Duration::from_micros((ms * 1000.0) as u64).min(cfg.poll_interval),
                // Due now but skipped (another worker holds the row lock): look again soon.
                Ok(Some(_)) => Duration::from_millis(10).min(cfg.poll_interval),
                Ok(None) | Err(_) => cfg.poll_interval,
            };
            tokio::select! {
                _ = notify.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    // Shutdown: no more claims. Let running jobs finish within the grace period.
    let in_flight = running.len();
    if in_flight > 0 {
        tracing::info!(queue, in_flight, grace_s = cfg.grace.as_secs(), "waiting for running jobs");
    }
    let finished = tokio::time::timeout(cfg.grace, async { while running.join_next().await.is_some() {} }).await;
    if finished.is_err() {
        tracing::warn!(queue, still_running = running.len(), "grace period over; releasing unfinished jobs");
        running.abort_all();
        while running.join_next().await.is_some() {}
    }
    drop(ack_tx);
    let _ = acker.await;
    let released = match sqlx::query(RELEASE).bind(&worker_id).execute(db).await {
        Ok(r) => r.rows_affected(),
        Err(e) => {
            // They stay Running under our name; the reaper re-runs them after the lease.
            tracing::warn!(queue, error = %e, "could not release unfinished jobs; the lease will recover them");
            0
        }
    };
    tracing::info!(queue, released, "pool stopped");
    released
}

/// One job's outcome, written back by the acker.
#[derive(Debug)]
struct Ack {
    id: String,
    status: &'static str,
    outcome: Option<&'static str>,
    delay_ms: i64,
    error: Option<String>,
    result: Option<Value>,
}

impl Ack {
    fn succeeded(id: String, result: Value) -> Self {
        Ack { id, status: "Done", outcome: Some("succeeded"), delay_ms: 0, error: None, result: Some(result) }
    }
    fn expired(id: String) -> Self {
        Ack {
            id,
            status: "Killed",
            outcome: Some("expired"),
            delay_ms: 0,
            error: Some("expired before it could run".into()),
            result: None,
        }
    }
    fn release(id: String) -> Self {
        Ack { id, status: "Pending", outcome: None, delay_ms: 0, error: None, result: None }
    }
    fn failed(id: String, e: &JobError, attempt: i32, max_attempts: i32, retry: &RetryPolicy) -> Self {
        let error = Some(truncate(&e.to_string(), 2000));
        if e.is_permanent() || attempt >= max_attempts {
            Ack { id, status: "Killed", outcome: Some("dead"), delay_ms: 0, error, result: None }
        } else {
            let delay_ms = retry_delay(retry, attempt).as_millis() as i64;
            Ack { id, status: "Failed", outcome: None, delay_ms, error, result: None }
        }
    }
}

/// At most `max` bytes of an error, marked when cut.
fn truncate(s: &str, max: usize) -> String {
    let head = molecule_domain::text::head(s, max);
    if head.len() == s.len() { s.to_string() } else { format!("{head}…") }
}

/// Writes a batch of outcomes in one statement. Only rows this worker still holds are
/// touched: an ack for a job the reaper already handed to someone else is dropped
/// (delivery is at-least-once).
const ACK: &str = r#"
UPDATE apalis.jobs AS j
SET status = r.status,
    outcome = r.outcome,
    done_at = CASE WHEN r.status IN ('Done', 'Killed') THEN now() END,
    run_at = CASE WHEN r.status IN ('Failed', 'Pending')
                  THEN now() + r.delay_ms * interval '1 millisecond' ELSE j.run_at END,
    attempts = CASE WHEN r.status = 'Pending' THEN greatest(j.attempts - 1, 0) ELSE j.attempts END,
    lock_by = CASE WHEN r.status = 'Pending' THEN NULL ELSE j.lock_by END,
    last_error = COALESCE(r.error, j.last_error),
    last_result = CASE WHEN r.error IS NOT NULL THEN jsonb_build_object('Err', r.error)
                       ELSE jsonb_build_object('Ok', r.result) END,
    attempt_log = CASE WHEN r.error IS NULL THEN j.attempt_log
                       ELSE j.attempt_log || jsonb_build_array(jsonb_build_object(
                            'attempt', j.attempts, 'started_at', j.started_at,
                            'failed_at', now(), 'error', r.error)) END
FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::jsonb[])
     AS r(id, status, outcome, delay_ms, error, result)
WHERE j.id = ANY($1) AND j.id = r.id AND (j.lock_by = $7) IS TRUE AND (j.status = 'Running') IS TRUE
"#;

/// `wake` is the pool's own waker: after writing a retry (a new future run_at) the
/// fetcher must re-read its next due time.
async fn run_acker(
    db: PgPool,
    worker_id: String,
    mut rx: mpsc::UnboundedReceiver<Ack>,
    grace: Duration,
    wake: Arc<Notify>,
) {
    let mut buf: Vec<Ack> = Vec::new();
    let mut closed = false;
    while !closed || !buf.is_empty() {
        if buf.is_empty() {
            match rx.recv().await {
                Some(a) => buf.push(a),
                None => break,
            }
        }
        while buf.len() < 5000 {
            match rx.try_recv() {
                Ok(a) => buf.push(a),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        let mut delay = Duration::from_millis(50);
        let give_up_at = tokio::time::Instant::now() + grace;
        loop {
            let res = match write_acks(&db, &worker_id, &buf).await {
                // The database refused the batch itself (not a connection fault): one ack
                // must be bad (say, a result jsonb cannot hold). Isolate it instead of
                // retrying the whole batch forever.
                Err(sqlx::Error::Database(e)) => {
                    tracing::warn!(worker_id, error = %e, "batch ack refused; writing acks one by one");
                    write_acks_one_by_one(&db, &worker_id, &mut buf).await
                }
                other => other,
            };
            match res {
                Ok(()) => {
                    if buf.iter().any(|a| a.status == "Failed" || a.status == "Pending") {
                        wake.notify_one();
                    }
                    buf.clear();
                    break;
                }
                Err(e) => {
                    tracing::warn!(worker_id, pending = buf.len(), error = %e, "ack failed; retrying");
                    if rx.is_closed() && tokio::time::Instant::now() >= give_up_at {
                        // Shutting down with the database gone: the jobs stay Running under
                        // our name and the lease hands them to another worker.
                        tracing::warn!(worker_id, lost_acks = buf.len(), "giving up on acks at shutdown");
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// Writes acks singly; an ack the database refuses becomes a failure of its job
/// ("result could not be stored"), so it is never lost and never blocks the others.
async fn write_acks_one_by_one(db: &PgPool, worker_id: &str, buf: &mut Vec<Ack>) -> Result<(), sqlx::Error> {
    for ack in buf.iter_mut() {
        match write_acks(db, worker_id, std::slice::from_ref(ack)).await {
            Ok(()) => {}
            Err(sqlx::Error::Database(e)) => {
                let stored = Ack {
                    id: std::mem::take(&mut ack.id),
                    status: "Killed",
                    outcome: Some("dead"),
                    delay_ms: 0,
                    error: Some(format!("the job's outcome could not be stored: {}", truncate(e.message(), 300))),
                    result: None,
                };
                write_acks(db, worker_id, std::slice::from_ref(&stored)).await?;
                ack.id = stored.id;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The common case, kept cheap: successes without a result value.
///
/// Acks find rows by primary key only. The `(…) IS TRUE` conditions are deliberately
/// not indexable: with plain `lock_by = $2 AND status = 'Running'` the planner, trusting
/// stats taken while few jobs ran, walks the partial running-jobs index instead — which
/// still holds an entry for every job claimed since the last vacuum, so each ack got
/// slower as a drain went on (measured: 29k → 8k jobs/s by the third 20k drain).
const ACK_DONE: &str = r#"
UPDATE apalis.jobs
SET status = 'Done', outcome = 'succeeded', done_at = now(), last_result = '{"Ok": null}'
WHERE id = ANY($1) AND (lock_by = $2) IS TRUE AND (status = 'Running') IS TRUE
"#;

async fn write_acks(db: &PgPool, worker_id: &str, acks: &[Ack]) -> Result<(), sqlx::Error> {
    let plain = |a: &&Ack| a.status == "Done" && matches!(a.result, None | Some(Value::Null));
    let (done, rest): (Vec<&Ack>, Vec<&Ack>) = acks.iter().partition(plain);
    if !done.is_empty() {
        sqlx::query(ACK_DONE)
            .bind(done.iter().map(|a| a.id.as_str()).collect::<Vec<_>>())
            .bind(worker_id)
            .execute(db)
            .await?;
    }
    if rest.is_empty() {
        return Ok(());
    }
    let acks = rest;
    sqlx::query(ACK)
        .bind(acks.iter().map(|a| a.id.as_str()).collect::<Vec<_>>())
        .bind(acks.iter().map(|a| a.status).collect::<Vec<_>>())
        .bind(acks.iter().map(|a| a.outcome).collect::<Vec<_>>())
        .bind(acks.iter().map(|a| a.delay_ms).collect::<Vec<_>>())
        .bind(acks.iter().map(|a| a.error.as_deref()).collect::<Vec<_>>())
        .bind(acks.iter().map(|a| a.result.clone().unwrap_or(Value::Null)).collect::<Vec<_>>())
        .bind(worker_id)
        .execute(db)
        .await?;
    Ok(())
}

#[derive(serde::Deserialize)]
struct InsertEvent<'a> {
    #[serde(borrow)]
    job_type: &'a str,
}

async fn run_listener(shared: Arc<Shared>, wakers: Arc<HashMap<String, Arc<Notify>>>, mut shutdown: watch::Receiver<bool>) {
    let wake_all = || wakers.values().for_each(|n| n.notify_one());
    let mut backoff = ErrorBackoff::new();
    while !*shutdown.borrow() {
        let mut listener = match PgListener::connect_with(&shared.db).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN connection failed; polling meanwhile");
                backoff.wait(&mut shutdown).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(INSERT_CHANNEL).await {
            tracing::warn!(error = %e, "LISTEN failed; polling meanwhile");
            backoff.wait(&mut shutdown).await;
            continue;
        }
        backoff.reset();
        wake_all(); // anything inserted while we were not listening
        loop {
            tokio::select! {
                r = listener.try_recv() => match r {
                    Ok(Some(n)) => {
                        if let Ok(ev) = serde_json::from_str::<InsertEvent>(n.payload()) {
                            if let Some(w) = wakers.get(ev.job_type) { w.notify_one(); }
                        }
                    }
                    // Connection lost; try_recv reconnects on the next call. Wake everyone
                    // for what we may have missed.
                    Ok(None) => wake_all(),
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection broken; reconnecting");
                        wake_all();
                        backoff.wait(&mut shutdown).await;
                        break;
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}

async fn run_heartbeat(shared: Arc<Shared>, worker_ids: Vec<String>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(shared.cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = sqlx::query("UPDATE apalis.workers SET last_seen = now() WHERE id = ANY($1)")
            .bind(&worker_ids)
            .execute(&shared.db)
            .await
        {
            tracing::warn!(error = %e, "heartbeat failed");
        }
    }
}

async fn run_reaper(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let period = (shared.cfg.lease / 3).max(Duration::from_millis(200));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        match maintenance::recover_orphans(&shared.db, shared.cfg.lease).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(recovered = n, "re-queued jobs of workers past their lease"),
            Err(e) => tracing::warn!(error = %e, "orphan recovery failed"),
        }
    }
}

/// Exponential wait after database errors: 100 ms doubling to 5 s, cut short by shutdown.
struct ErrorBackoff(Duration);

impl ErrorBackoff {
    fn new() -> Self {
        Self(Duration::from_millis(100))
    }
    fn reset(&mut self) {
        self.0 = Duration::from_millis(100);
    }
    async fn wait(&mut self, shutdown: &mut watch::Receiver<bool>) {
        tokio::select! {
            _ = tokio::time::sleep(self.0) => {}
            _ = shutdown.changed() => {}
        }
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
    }
}
