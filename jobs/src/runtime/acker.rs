//! A pool's acker: outcomes of attempts, written back in batches under their claims'
//! fences. A refused ack (its job was claimed again since) is counted and logged, never
//! applied to the newer attempt. Database faults are retried with backoff; an ack the
//! database refuses outright fails only its own job.

use serde_json::Value;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

use super::pool::PoolWake;

use super::Shared;
use crate::backoff::retry_delay;
use crate::handler::{Failure, JobError};
use crate::kinds::RetryPolicy;
use crate::metrics::QueueMetrics;
use crate::state::{JobState, Outcome};
use crate::store::{self, Ack};

/// The claim an ack answers.
#[derive(Clone, Debug)]
pub(super) struct Claim {
    pub id: String,
    pub fence: i64,
    /// Its claimed batch's row in `apalis.claims`.
    pub batch: i64,
    /// Where the claim left its row version.
    pub tid: String,
}

fn ack(c: Claim, state: JobState, outcome: Option<Outcome>) -> Ack {
    Ack {
        id: c.id,
        fence: c.fence,
        state,
        outcome,
        delay_ms: 0,
        error: None,
        error_detail: None,
        result: None,
        batch: c.batch,
        tid: Some(c.tid),
    }
}

/// A pool's claimed batches that still have jobs without a written ack, and how many.
/// Every claimed job gets exactly one ack (a result, a failure, a hand-back, an
/// interruption), so a batch is over when that many acks of it are written; its
/// `apalis.claims` row goes with the write of the last one. An ack refused as stale
/// counts too: its job is no longer this worker's.
#[derive(Clone, Default)]
pub(super) struct OpenBatches(Arc<Mutex<HashMap<i64, usize>>>);

impl OpenBatches {
    /// A claim took `jobs` jobs as `batch`. Called before any of their acks is sent.
    pub(super) fn opened(&self, batch: i64, jobs: usize) {
        lock(&self.0).insert(batch, jobs);
    }

    /// The batches still open.
    pub(super) fn known(&self) -> Vec<i64> {
        lock(&self.0).keys().copied().collect()
    }

    /// The batches whose remaining jobs all have their ack in `acks`.
    fn ending(&self, acks: &[Ack]) -> Vec<i64> {
        let open = lock(&self.0);
        per_batch(acks).into_iter().filter(|(b, n)| open.get(b) == Some(n)).map(|(b, _)| b).collect()
    }

    /// `acks` are written.
    fn written(&self, acks: &[Ack]) {
        let mut open = lock(&self.0);
        for (b, n) in per_batch(acks) {
            if let Some(left) = open.get_mut(&b) {
                *left = left.saturating_sub(n);
                if *left == 0 {
                    open.remove(&b);
                }
            }
        }
    }
}

fn per_batch(acks: &[Ack]) -> HashMap<i64, usize> {
    let mut n = HashMap::new();
    for a in acks {
        *n.entry(a.batch).or_insert(0) += 1;
    }
    n
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) fn succeeded(c: Claim, result: Value) -> Ack {
    Ack { result: Some(result), ..ack(c, JobState::Done, Some(Outcome::Succeeded)) }
}

pub(super) fn expired(c: Claim) -> Ack {
    Ack { error: Some(crate::failures::public("expired")), ..ack(c, JobState::Killed, Some(Outcome::Expired)) }
}

/// Handed back: runs again at once elsewhere, the attempt not counted.
pub(super) fn release(c: Claim) -> Ack {
    ack(c, JobState::Pending, None)
}

/// Snoozed ([`JobError::Snooze`]): a hand-back due `after` from now, the attempt not
/// counted, with why it waits as the job's last error (not in its attempt log). At least
/// 1 ms: a delay is what tells it from a release (metrics); at most 2³² ms (49 days), so
/// `now() + delay` stays a timestamp. Expiry is checked at claim.
pub(super) fn snoozed(c: Claim, why: &Failure, after: Duration) -> Ack {
    let delay_ms = after.as_millis().clamp(1, u32::MAX as u128) as i64;
    let error_detail = Some(truncate(&format!("{}: {}", why.code, why.detail), 2000));
    Ack { error: Some(crate::failures::public(why.code)), error_detail, delay_ms, ..release(c) }
}

/// A claimed row whose columns did not decode ([`crate::store::Claimed::unreadable`]):
/// failed at once, as a payload its handler cannot read is.
pub(super) fn unreadable(c: Claim, why: &str) -> Ack {
    permanent(c, &JobError::Undecodable(format!("the job's row: {why}")))
}

/// An attempt that failed for good: tenants get its code and canned sentence, operators
/// the detail.
fn permanent(c: Claim, e: &JobError) -> Ack {
    Ack { error: Some(e.public()), error_detail: Some(truncate(&e.detail(), 2000)), ..ack(c, JobState::Killed, Some(Outcome::Failed)) }
}

pub(super) fn interrupted(c: Claim) -> Ack {
    Ack { error: Some(JobError::Interrupted.public()), ..ack(c, JobState::Killed, Some(Outcome::Interrupted)) }
}

/// A failed attempt: tenants get its code and canned sentence, operators the detail.
pub(super) fn failed(c: Claim, e: &JobError, attempt: i32, max_attempts: i32, retry: &RetryPolicy) -> Ack {
    if e.is_permanent() {
        return permanent(c, e);
    }
    let error = Some(e.public());
    let error_detail = Some(truncate(&e.detail(), 2000));
    if attempt >= max_attempts {
        Ack { error, error_detail, ..ack(c, JobState::Killed, Some(Outcome::Dead)) }
    } else {
        let delay_ms = retry_delay(retry, attempt).as_millis() as i64;
        Ack { error, error_detail, delay_ms, ..ack(c, JobState::Failed, None) }
    }
}

/// At most `max` bytes of an error, marked when cut.
fn truncate(s: &str, max: usize) -> String {
    let head = molecule_domain::text::head(s, max);
    if head.len() == s.len() { s.to_string() } else { format!("{head}…") }
}

/// `wake` is the pool's own waker: after writing a retry (a new future run_at) each
/// fetcher must re-read its next due time.
pub(super) async fn run(
    shared: Arc<Shared>,
    counts: QueueMetrics,
    worker_id: String,
    notify_finished: bool,
    batches: OpenBatches,
    mut rx: mpsc::UnboundedReceiver<Ack>,
    wake: Arc<PoolWake>,
) {
    let db = &shared.core;
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
        let ending = batches.ending(&buf);
        let mut delay = Duration::from_millis(50);
        // Half a lease from the first failure seen while shutting down, whatever the grace
        // (0 is allowed): a fault of the moment must not drop the pending acks — each would
        // become a rescue that counts its attempt (a last attempt ends dead, a success runs
        // again) — and a fixed bound keeps the whole shutdown within grace, interrupt wait,
        // half a lease and a margin (terminationGracePeriodSeconds in infra/k8s). The
        // heartbeat goes on meanwhile.
        let mut give_up_at = None;
        loop {
            let res = match store::write_acks(db, &buf, &ending).await {
                // The database refused the batch itself (not a connection fault): one ack
                // must be bad (say, a result jsonb cannot hold). Isolate it instead of
                // retrying the whole batch forever.
                Err(sqlx::Error::Database(e)) if !transient(e.as_ref()) => {
                    tracing::warn!(worker_id, error = %e, "batch ack refused; writing acks one by one");
                    write_one_by_one(db, &mut buf, &ending).await
                }
                other => other.map(|w| w.stale),
            };
            match res {
                Ok(stale) => {
                    batches.written(&buf);
                    let applied = which_applied(&buf, &stale);
                    report_stale(&shared, &counts, &worker_id, &buf, &applied);
                    counts.applied(buf.iter().zip(&applied).filter(|(_, ok)| **ok).map(|(a, _)| a));
                    shared.acks_applied.fetch_add(applied.iter().filter(|ok| **ok).count() as u64, Ordering::Relaxed);
                    if notify_finished && applied.contains(&true) {
                        let finished: Vec<String> =
                            buf.iter().zip(&applied).filter(|(a, ok)| **ok && a.state.is_terminal()).map(|(a, _)| a.id.clone()).collect();
                        if let Err(e) = store::ack::notify_finished(db, &finished).await {
                            // Followers fall back to their own polling.
                            tracing::warn!(worker_id, error = %e, "could not announce finished jobs");
                        }
                    }
                    if buf.iter().any(|a| matches!(a.state, JobState::Failed | JobState::Pending)) {
                        wake.wake();
                    }
                    buf.clear();
                    break;
                }
                Err(e) => {
                    tracing::warn!(worker_id, pending = buf.len(), error = %e, "ack failed; retrying");
                    let now = tokio::time::Instant::now();
                    if rx.is_closed() && now >= *give_up_at.get_or_insert(now + shared.cfg.lease / 2) {
                        // Shutting down with the database gone: the jobs stay Running under
                        // our name and the lease rescuer takes them once our rows expire.
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

/// For each sent ack, whether the database applied it (it is not among the `stale` ones)
/// — matched on (id, fence): two acks of one job in a batch (a slow attempt's and its
/// successor's) are two different acks. A set, not a scan per ack (5,000 a batch).
fn which_applied(sent: &[Ack], stale: &[(String, i64)]) -> Vec<bool> {
    if stale.is_empty() {
        return vec![true; sent.len()];
    }
    let set: std::collections::HashSet<(&str, i64)> = stale.iter().map(|(id, f)| (id.as_str(), *f)).collect();
    sent.iter().map(|a| !set.contains(&(a.id.as_str(), a.fence))).collect()
}

fn report_stale(shared: &Shared, counts: &QueueMetrics, worker_id: &str, sent: &[Ack], applied: &[bool]) {
    let stale = applied.iter().filter(|ok| !**ok).count();
    if stale == 0 {
        return;
    }
    counts.stale(stale);
    for (a, _) in sent.iter().zip(applied).filter(|(_, ok)| !**ok) {
        shared.stale_acks.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            worker_id,
            job_id = a.id,
            fence = a.fence,
            state = a.state.as_str(),
            "stale ack refused: the job was claimed again since (or taken by the lease rescuer)"
        );
    }
}

/// A fault of the moment, not of the ack: the statement is retried like a connection
/// fault, never taken for an ack the database cannot store. A deadlock or serialization
/// failure (class 40), or an outage ([`molecule_domain::db::is_outage`]): a statement in
/// flight when PostgreSQL stops gets 57P01, and taken for a refused ack it ended healthy
/// jobs `result_not_stored`. A cancelled statement or an out-of-memory is not: one ack at
/// a time is the way past those.
fn transient(e: &dyn sqlx::error::DatabaseError) -> bool {
    e.code().is_some_and(|c| c.starts_with("40")) || molecule_domain::db::is_outage(e)
}

/// Writes acks singly; an ack the database refuses becomes a failure of its job
/// ("result could not be stored"), so it is never lost and never blocks the others. The
/// `ending` batches' rows go with the last one. Returns the stale ones.
async fn write_one_by_one(db: &PgPool, buf: &mut [Ack], ending: &[i64]) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let mut stale = Vec::new();
    let last = buf.len().saturating_sub(1);
    for (i, a) in buf.iter_mut().enumerate() {
        let ending = if i == last { ending } else { &[] };
        match store::write_acks(db, std::slice::from_ref(a), ending).await {
            Ok(w) => stale.extend(w.stale),
            Err(sqlx::Error::Database(e)) if !transient(e.as_ref()) => {
                a.state = JobState::Killed;
                // Another attempt would produce the same result: failed, not out of attempts.
                a.outcome = Some(Outcome::Failed);
                a.result = None;
                a.delay_ms = 0;
                a.error = Some(crate::failures::public("result_not_stored"));
                a.error_detail = Some(format!("the job's outcome could not be stored: {}", truncate(e.message(), 300)));
                stale.extend(store::write_acks(db, std::slice::from_ref(a), ending).await?.stale);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(stale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use molecule_domain::testing::fresh_db;

    /// What PostgreSQL reports for each kind of failure, classified: a deadlock, a
    /// serialization failure or an outage is retried; an ack the database cannot store, a
    /// cancelled statement or an out-of-memory is isolated.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn faults_of_the_moment_are_transient_a_bad_value_is_not() {
        let (db, _) = fresh_db().await;
        let cases = [
            ("40P01", true),  // deadlock
            ("40001", true),  // serialization failure
            ("57P01", true),  // admin shutdown: PostgreSQL stopping under the statement
            ("08006", true),  // connection failure
            ("53300", true),  // too many connections
            ("58030", true),  // I/O error
            ("57014", false), // statement cancelled (statement_timeout): it may repeat with the batch
            ("53200", false), // out of memory: the same
            ("22P05", false), // a value PostgreSQL cannot store
            ("23505", false),
            ("42703", false),
        ];
        for (code, want) in cases {
            let raise = format!("DO $$ BEGIN RAISE EXCEPTION 'test' USING ERRCODE = '{code}'; END $$");
            match sqlx::raw_sql(sqlx::AssertSqlSafe(raise)).execute(&db).await {
                Err(sqlx::Error::Database(e)) => assert_eq!(transient(e.as_ref()), want, "{code}"),
                other => panic!("{code}: {other:?}"),
            }
        }
    }
}
