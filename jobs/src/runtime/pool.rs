//! One pool: a fetcher per claim shard claims and runs jobs and hands their outcomes to
//! the pool's acker; the fetchers share the pool's slots. And its part of a shutdown.

use futures_util::FutureExt;
use molecule_domain::{JobId, OrgId, WorkspaceId};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::acker::{self, Claim, OpenBatches};
use super::claim_start::ClaimStart;
use super::{ErrorBackoff, PoolSpec, Shared};
use crate::handler::{Interrupt, JobContext, JobError};
use crate::store;
use crate::store::{CLAIM_SHARDS, Shard};

#[derive(Debug, Default)]
pub(super) struct PoolReport {
    pub released: u64,
    pub interrupted: u64,
}

pub(super) async fn run(
    shared: Arc<Shared>,
    spec: PoolSpec,
    worker_id: String,
    wake: Arc<PoolWake>,
    mut lease: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) -> PoolReport {
    let queue = spec.queue.clone();
    // No claim before the heartbeat has written our worker row: a claimed job whose
    // worker row does not exist looks orphaned to every lease rescuer.
    tokio::select! {
        r = lease.wait_for(|held| *held) => { if r.is_err() { return PoolReport::default(); } }
        _ = shutdown.wait_for(|s| *s) => return PoolReport::default(),
    }
    tracing::info!(queue, worker_id, concurrency = spec.concurrency, "pool started");

    let counts = crate::metrics::QueueMetrics::new(&queue);
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<store::Ack>();
    let batches = OpenBatches::default();
    let acker = tokio::spawn(acker::run(
        shared.clone(),
        counts.clone(),
        worker_id.clone(),
        spec.notify_finished,
        batches.clone(),
        ack_rx,
        wake.clone(),
    ));
    let pool = Arc::new(Pool {
        slots: Arc::new(Semaphore::new(spec.concurrency.max(1))),
        // Each fetcher claims at most its share of the slots, so both keep a claim going.
        share: spec.concurrency.max(1).div_ceil(CLAIM_SHARDS),
        shared,
        spec,
        worker_id,
        counts,
        batches,
        wake,
    });
    let fetchers: Vec<_> =
        Shard::all().map(|shard| tokio::spawn(fetch(pool.clone(), shard, ack_tx.clone(), lease.clone(), shutdown.clone()))).collect();
    // The acker ends when the last fetcher drops its sender (after its last ack).
    drop(ack_tx);
    let mut report = PoolReport::default();
    for f in fetchers {
        match f.await {
            Ok(ended) => {
                report.released += ended.released.load(Ordering::Relaxed);
                report.interrupted += ended.interrupted.load(Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(queue, error = %e, "fetcher ended abnormally"),
        }
    }
    if acker.await.is_err() {
        tracing::warn!(queue, "acker ended abnormally");
    }
    tracing::info!(queue, released = report.released, interrupted = report.interrupted, "pool stopped");
    report
}

/// Wakes a pool's fetchers, one per claim shard: an insert into its queue (the listener,
/// or an announcement), or a retry written (the acker).
#[derive(Default)]
pub(crate) struct PoolWake([Notify; CLAIM_SHARDS]);

impl PoolWake {
    pub(crate) fn wake(&self) {
        // notify_one keeps a permit for a fetcher that is not waiting yet: no wake-up lost.
        self.0.iter().for_each(Notify::notify_one);
    }

    /// Wakes the fetchers of the shards in `mask` (bit i: shard i); all of them when it
    /// names none of this pool's.
    pub(crate) fn wake_shards(&self, mask: u32) {
        if mask & ((1 << CLAIM_SHARDS) - 1) == 0 {
            return self.wake();
        }
        self.0.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).for_each(|(_, n)| n.notify_one());
    }

    pub(crate) fn shard(&self, shard: Shard) -> &Notify {
        &self.0[shard.index()]
    }
}

/// What a pool's fetchers share.
struct Pool {
    shared: Arc<Shared>,
    spec: PoolSpec,
    worker_id: String,
    counts: crate::metrics::QueueMetrics,
    slots: Arc<Semaphore>,
    share: usize,
    batches: OpenBatches,
    wake: Arc<PoolWake>,
}

/// One fetcher: claims the jobs of one shard of the pool's queue, runs them, and at
/// shutdown or a lost lease ends the attempts it started (a lost lease: its
/// [`guard_lease`], whatever the fetcher is awaiting then).
async fn fetch(
    pool: Arc<Pool>,
    shard: Shard,
    ack_tx: mpsc::UnboundedSender<store::Ack>,
    mut lease: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) -> Arc<Ended> {
    let Pool { shared, spec, worker_id, counts, slots, share, batches, wake } = &*pool;
    let (cfg, queue, notify) = (&shared.cfg, spec.queue.as_str(), wake.shard(shard));
    // Half a lease without a written heartbeat: others will soon take our jobs. Run-once
    // kinds get a moment to stop what they started, well within the other half.
    let lost_wait = if spec.runs_once { cfg.interrupt_wait.min(cfg.lease / 4) } else { Duration::ZERO };
    let attempts = Arc::new(tokio::sync::Mutex::new(Attempts::new(spec.runs_once)));
    let (guard_done, guard_stop) = oneshot::channel();
    let guard = tokio::spawn(guard_lease(attempts.clone(), lease.clone(), lost_wait, ack_tx.clone(), guard_stop));
    let mut backoff = ErrorBackoff::new();
    let mut start = ClaimStart::new(Instant::now());
    // A claim failed: it may have committed all the same, its jobs Running under our name
    // with nobody to run them (our heartbeat keeps rescuers away). Settled before the next.
    let mut unsure = false;
    // A claim failed since the last settling: settled once more after the next claim, for
    // a failed claim whose commit landed after the settling (its server end still running).
    let mut settle_again = false;

    while !*shutdown.borrow() {
        if !*lease.borrow() {
            // The guard ends the running attempts; no claim until beats are written again.
            tokio::select! {
                r = lease.wait_for(|held| *held) => { if r.is_err() { break; } }
                _ = shutdown.changed() => {}
            }
            continue;
        }
        attempts.lock().await.reap();
        if unsure {
            let settled = tokio::select! {
                r = pool.settle_lost_claims(shard) => r,
                // Cut short, it is simply done again (nothing else claims for us in this shard).
                _ = lease.wait_for(|held| !*held) => continue,
            };
            match settled {
                Ok(()) => unsure = false,
                Err(e) => {
                    tracing::warn!(queue, error = %e, "settling a failed claim failed; backing off");
                    tokio::select! {
                        _ = backoff.wait(&mut shutdown) => {}
                        _ = lease.wait_for(|held| !*held) => {}
                    }
                    continue;
                }
            }
        }
        // The slots are taken before the claim: the other fetcher cannot fill them meanwhile.
        let mut permits = tokio::select! {
            p = take_slots(slots, cfg.batch.max(1).min(*share)) => match p {
                Some(p) => p,
                None => break, // closed: never (the pool owns the semaphore)
            },
            // A sender gone (the runtime dropped without a shutdown): stop, do not spin.
            r = shutdown.changed() => if r.is_err() { break } else { continue },
            r = lease.changed() => if r.is_err() { break } else { continue },
        };
        if *shutdown.borrow() || !*lease.borrow() {
            // Changed in the same instant the slots came: no claim after a shutdown was
            // asked or the lease lapsed.
            continue;
        }
        let want = permits.num_permits();
        let from_cursor = start.next(Instant::now());
        // Not cut short by a lost lease: a claim dropped mid-flight may have committed, and
        // its jobs would stay Running under this worker. What it returns after the lease
        // went is handed back below, unstarted; what runs meanwhile, the guard ends.
        let claim = match &from_cursor {
            Some(c) => store::claim_after(&shared.core, queue, shard, want as i64, worker_id, c).await,
            None => store::claim(&shared.core, queue, shard, want as i64, worker_id).await,
        };
        let claimed = match claim {
            Ok(rows) => {
                backoff.reset();
                start.claimed(from_cursor.is_some(), &rows, want);
                unsure |= std::mem::take(&mut settle_again);
                rows
            }
            Err(e) => {
                drop(permits);
                (unsure, settle_again) = (true, true);
                tracing::warn!(queue, error = %e, "claim failed; backing off");
                tokio::select! {
                    _ = backoff.wait(&mut shutdown) => {}
                    _ = lease.wait_for(|held| !*held) => {}
                }
                continue;
            }
        };
        let n = claimed.len();
        if let Some(first) = claimed.first() {
            batches.opened(first.batch, n);
        }
        // Under the lock, so the guard either sees these attempts or we see the lease lost.
        let mut running = attempts.lock().await;
        if !*lease.borrow() {
            // The lease went while the claim was in flight: nothing starts, all goes back.
            for job in claimed {
                let claim = Claim { id: job.id, fence: job.fence, batch: job.batch, tid: job.tid };
                let _ = ack_tx.send(match (&job.unreadable, job.expired) {
                    (Some(why), _) => acker::unreadable(claim, why),
                    (None, true) => acker::expired(claim),
                    (None, false) => acker::release(claim),
                });
            }
            continue;
        }
        // An unreadable row counts: its attempt is counted, and it ends as a failed one.
        counts.started(claimed.iter().filter(|j| !j.expired).count());
        for job in claimed {
            let claim = Claim { id: job.id, fence: job.fence, batch: job.batch, tid: job.tid };
            if let Some(why) = &job.unreadable {
                tracing::error!(queue, job_id = %claim.id, error = %why, "a claimed job's row does not decode; it ends failed");
                let _ = ack_tx.send(acker::unreadable(claim, why));
                continue;
            }
            if job.expired {
                let _ = ack_tx.send(acker::expired(claim));
                continue;
            }
            let Some(permit) = permits.split(1) else {
                // Cannot happen (the claim asked for as many jobs as it holds slots);
                // if it did, the job goes back rather than overfilling the pool.
                let _ = ack_tx.send(acker::release(claim));
                continue;
            };
            let id = claim.id.clone();
            let key = running.start(claim);
            let ctx = JobContext {
                id: JobId::from_db(id),
                queue: queue.to_string(),
                attempt: job.attempts,
                max_attempts: job.max_attempts,
                org_id: job.org_id.map(OrgId),
                workspace_id: job.workspace_id.map(WorkspaceId),
                payload: job.job.into(),
                db: shared.db.clone(),
                interrupt: running.signal(),
            };
            let handler = spec.handler.clone();
            let retry = spec.retry;
            let runs_once = spec.runs_once;
            let ack_tx = ack_tx.clone();
            let unacked = running.unacked.clone();
            let ended = running.ended.clone();
            let (attempt, max_attempts) = (job.attempts, job.max_attempts);
            let counts = counts.clone();
            // Every event a handler (or the backend under it) logs carries the job's ids.
            let span = tracing::info_span!(
                "job",
                job_id = %ctx.id,
                queue = %ctx.queue,
                attempt,
                org_id = ctx.org_id.map(|o| tracing::field::display(o.0)),
                workspace_id = ctx.workspace_id.map(|w| tracing::field::display(w.0)),
            );
            running.tasks.spawn(async move {
                let began = std::time::Instant::now();
                let outcome = AssertUnwindSafe(handler(ctx).instrument(span.clone())).catch_unwind().await;
                // Out of the in-flight set before the ack leaves (no await between the two):
                // whatever is still in it after an abort never produced one. Never gone
                // here: stop() empties the set only once every attempt ended or was aborted.
                let Some(claim) = lock(&unacked).remove(&key) else { return };
                let ack = match outcome {
                    Ok(Ok(result)) => acker::succeeded(claim, result),
                    Ok(Err(JobError::Interrupted)) => {
                        ended.count(runs_once);
                        if runs_once { acker::interrupted(claim) } else { acker::release(claim) }
                    }
                    Ok(Err(JobError::Snooze { after, why })) => {
                        tracing::debug!(job_id = %claim.id, code = why.code, after_ms = after.as_millis() as u64, attempt, "attempt snoozed");
                        acker::snoozed(claim, &why, after)
                    }
                    Ok(Err(e)) => {
                        // The detail goes here, and to operators; tenants read the code.
                        span.in_scope(|| tracing::warn!(job_id = %claim.id, code = e.code(), error = %e.detail(), attempt, "attempt failed"));
                        acker::failed(claim, &e, attempt, max_attempts, &retry)
                    }
                    Err(_) => {
                        span.in_scope(|| tracing::error!(job_id = %claim.id, attempt, "handler panicked"));
                        acker::failed(claim, &JobError::retryable("handler_panicked", "handler panicked"), attempt, max_attempts, &retry)
                    }
                };
                counts.duration(&ack, began.elapsed().as_secs_f64());
                let _ = ack_tx.send(ack);
                drop(permit);
            });
        }
        drop(running);
        // Slots the claim did not fill go back now.
        drop(permits);
        if n < want && !start.head_next() {
            // After the cursor, only its priority's next due job is looked for (a range scan;
            // over the whole queue, `min(run_at)` reads the entries of every job claimed
            // since the last vacuum); the others are found by the next claim from the head.
            let read = async {
                match start.cursor() {
                    Some(c) => store::next_due_after_ms(&shared.core, queue, shard, c).await,
                    None => store::next_due_ms(&shared.core, queue, shard).await,
                }
            };
            let next = tokio::select! {
                n = read => n,
                // A read that hangs (a partition) must not keep the fetcher from noticing.
                _ = lease.wait_for(|held| !*held) => continue,
            };
            let wait = match next {
                Ok(Some(ms)) if ms > 0.0 => Duration::from_micros((ms * 1000.0) as u64).min(cfg.poll_interval),
                // Due now but skipped (another worker holds the row lock): look again soon.
                Ok(Some(_)) => Duration::from_millis(10).min(cfg.poll_interval),
                Ok(None) | Err(_) => cfg.poll_interval,
            };
            tokio::select! {
                _ = notify.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                r = shutdown.changed() => if r.is_err() { break },
                r = lease.changed() => if r.is_err() { break },
            }
        }
    }

    // A failed claim not yet settled: its jobs would otherwise wait for the rescuer, which
    // counts their attempt (an exec, one attempt, would end dead without having started).
    if unsure || settle_again {
        match tokio::time::timeout(cfg.lease / 4, pool.settle_lost_claims(shard)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(queue, error = %e, "settling a failed claim at shutdown failed; the rescuer will"),
            Err(_) => tracing::warn!(queue, "settling a failed claim at shutdown timed out; the rescuer will"),
        }
    }

    // Shutdown: no more claims. Running jobs get the grace period to finish; meanwhile
    // the heartbeat goes on, so their leases hold and nobody else runs them. A lease lost
    // now is watched for below (the guard, if stopping attempts, finishes first).
    let _ = guard_done.send(());
    let _ = guard.await;
    let mut attempts = attempts.lock().await;
    if !attempts.tasks.is_empty() {
        tracing::info!(queue, in_flight = attempts.tasks.len(), grace_s = cfg.grace.as_secs(), "waiting for running jobs");
    }
    let finished = tokio::select! {
        r = tokio::time::timeout(cfg.grace, drain(&mut attempts.tasks)) => r.is_ok(),
        // Unless the lease goes first: then they stop now, as below.
        _ = lease.wait_for(|held| !*held) => false,
    };
    if !finished {
        tracing::warn!(queue, still_running = attempts.tasks.len(), runs_once = spec.runs_once, "grace period over; interrupting");
        // Kinds that must not run twice get a moment to stop what they started (exec kills
        // its command and completes its audit row); the others go back to the queue now.
        let wait = if !*lease.borrow() {
            lost_wait
        } else if spec.runs_once {
            cfg.interrupt_wait
        } else {
            Duration::ZERO
        };
        attempts.stop(wait, &ack_tx).await;
    }
    attempts.ended.clone()
}

impl Pool {
    /// Hands back the jobs of `shard`'s claims that committed but whose answer was lost
    /// (the batches of ours it does not know): see store::claim::release_unknown_batches.
    async fn settle_lost_claims(&self, shard: Shard) -> Result<(), sqlx::Error> {
        let n = store::claim::release_unknown_batches(&self.shared.core, &self.worker_id, shard, &self.batches.known()).await?;
        self.counts.released(n);
        if n > 0 {
            tracing::warn!(queue = self.spec.queue.as_str(), released = n, "handed back the jobs of a claim whose answer was lost");
        }
        Ok(())
    }
}

/// Ends a fetcher's running attempts as soon as the lease is lost, whatever the fetcher is
/// awaiting then: a claim or a read that hangs (a partition drops packets and resets
/// nothing, so a statement waits for TCP to give up, minutes) must not let them run on
/// past the lease, into the time another process's rescuer runs them again. Until `done`.
async fn guard_lease(
    attempts: Arc<tokio::sync::Mutex<Attempts>>,
    mut lease: watch::Receiver<bool>,
    wait: Duration,
    ack_tx: mpsc::UnboundedSender<store::Ack>,
    mut done: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            r = lease.wait_for(|held| !*held) => if r.is_err() { return },
            _ = &mut done => return,
        }
        attempts.lock().await.stop(wait, &ack_tx).await;
        // Whatever changed since it was seen lost (held again, perhaps lost again) is
        // looked at anew; attempts started while it was held are stopped at the next loss.
        tokio::select! {
            r = lease.changed() => if r.is_err() { return },
            _ = &mut done => return,
        }
    }
}

/// Up to `most` of the pool's slots (at least one): one, waited for if need be and kept,
/// then as many more as are free. A slot waited for and let go (to count the free ones
/// after) would go straight to the other fetcher waiting, which would let it go to the
/// first, and so on: both spinning, the slot never used. None: the semaphore is closed.
async fn take_slots(slots: &Arc<Semaphore>, most: usize) -> Option<OwnedSemaphorePermit> {
    let mut permits = slots.clone().acquire_owned().await.ok()?;
    loop {
        // All or nothing: if the other fetcher took some meanwhile, ask for what is left.
        let more = (most - permits.num_permits()).min(slots.available_permits());
        if more == 0 {
            return Some(permits);
        }
        if let Ok(p) = slots.clone().try_acquire_many_owned(more as u32) {
            permits.merge(p);
            return Some(permits);
        }
    }
}

/// The attempts a pool is running, and how to end them early.
struct Attempts {
    tasks: JoinSet<()>,
    /// Claims whose attempt has not produced an ack yet, by a key of the attempt's own:
    /// whatever is still here after an abort never produced one. The attempt takes its
    /// claim back from here to ack it.
    unacked: Arc<Mutex<HashMap<u64, Claim>>>,
    /// The next attempt's key in `unacked`.
    next: u64,
    /// Tells running attempts to stop ([`Interrupt`]); replaced after each use.
    interrupt: watch::Sender<bool>,
    ended: Arc<Ended>,
    runs_once: bool,
}

impl Attempts {
    fn new(runs_once: bool) -> Self {
        Attempts {
            tasks: JoinSet::new(),
            unacked: Arc::default(),
            next: 0,
            interrupt: watch::channel(false).0,
            ended: Arc::default(),
            runs_once,
        }
    }

    /// Puts `claim` in the in-flight set; its key there.
    fn start(&mut self, claim: Claim) -> u64 {
        self.next += 1;
        lock(&self.unacked).insert(self.next, claim);
        self.next
    }

    fn signal(&self) -> Interrupt {
        Interrupt::new(self.interrupt.subscribe())
    }

    /// Forgets finished tasks.
    fn reap(&mut self) {
        while self.tasks.try_join_next().is_some() {}
    }

    /// Interrupts every running attempt, gives them `wait` to return, aborts the rest,
    /// and acks those that never produced an ack: handed back, or `interrupted` when the
    /// kind must not run twice.
    async fn stop(&mut self, wait: Duration, ack_tx: &mpsc::UnboundedSender<store::Ack>) {
        if self.tasks.is_empty() {
            return;
        }
        self.interrupt.send_replace(true);
        if tokio::time::timeout(wait, drain(&mut self.tasks)).await.is_err() {
            self.tasks.abort_all();
            drain(&mut self.tasks).await;
        }
        let left: Vec<Claim> = lock(&self.unacked).drain().map(|(_, c)| c).collect();
        for claim in left {
            let ack = if self.runs_once { acker::interrupted(claim) } else { acker::release(claim) };
            let _ = ack_tx.send(ack);
            self.ended.count(self.runs_once);
        }
        // Attempts started later must not see this interrupt.
        self.interrupt = watch::channel(false).0;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn drain(running: &mut JoinSet<()>) {
    while running.join_next().await.is_some() {}
}

/// Attempts a shutdown ended early: handed back, or `interrupted`.
#[derive(Default)]
struct Ended {
    released: AtomicU64,
    interrupted: AtomicU64,
}

impl Ended {
    fn count(&self, runs_once: bool) {
        let c = if runs_once { &self.interrupted } else { &self.released };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both fetchers wait for a slot of a full pool; one is freed: one of them takes it and
    /// keeps it (on one thread, where a slot let go and waited for again went back and
    /// forth between the two for ever).
    #[tokio::test(flavor = "current_thread")]
    async fn of_two_fetchers_waiting_for_a_slot_one_takes_the_freed_slot() {
        let slots = Arc::new(Semaphore::new(3));
        let held = slots.clone().try_acquire_many_owned(3).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        for fetcher in 0..2 {
            let (slots, tx) = (slots.clone(), tx.clone());
            tokio::spawn(async move {
                let permits = take_slots(&slots, 2).await.unwrap();
                let _ = tx.send((fetcher, permits.num_permits()));
                std::future::pending::<()>().await; // keeps them
            });
        }
        tokio::task::yield_now().await; // both are waiting now
        let mut held = held;
        drop(held.split(1));
        let (_, got) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("the freed slot was taken").unwrap();
        assert_eq!(got, 1, "one slot was free");
        assert_eq!(slots.available_permits(), 0);
        // The other two: the second fetcher takes both (its most).
        drop(held);
        let (_, got) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("the others were taken").unwrap();
        assert_eq!(got, 2);
    }
}
