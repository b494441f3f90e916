//! What the job core counts (the `metrics` facade; `molecule-api` installs the Prometheus
//! recorder and serves `/metrics`). Queue depth, ages and live workers are not counted
//! here: they are read from the database at scrape time (`store::stats`), so a process
//! that runs no pools reports them too.
//!
//! A pool takes its handles once ([`QueueMetrics::new`]): a drain of 30k jobs/s must not
//! pay a registry lookup and a label allocation per event. Handles taken before a
//! recorder is installed stay no-ops, so processes install it before starting pools.

use metrics::{Counter, Histogram};

use crate::state::{JobState, Outcome};
use crate::store::Ack;

pub const ENQUEUED: &str = "molecule_jobs_enqueued_total";
pub const STARTED: &str = "molecule_jobs_started_total";
/// Attempts that ended, by `event` (see [`EVENTS`]).
pub const ENDED: &str = "molecule_job_attempts_total";
/// A handler's run time, by how the attempt ended (`outcome`, one of [`EVENTS`]).
pub const DURATION: &str = "molecule_job_duration_seconds";
pub const STALE_ACKS: &str = "molecule_jobs_stale_acks_total";

/// How an attempt ended. `failed` counts every failed attempt: each is also `retried`
/// (it runs again) or `dead` (it does not: out of attempts, or failed permanently).
/// `released` (handed back, due at once) and `snoozed` (handed back due later,
/// [`crate::JobError::Snooze`]) do not count as attempts.
pub const EVENTS: [&str; 8] = ["succeeded", "failed", "retried", "dead", "interrupted", "expired", "released", "snoozed"];
const FAILED: usize = 1;
const RELEASED: usize = 6;

/// Counted when the insert runs: a caller's transaction that rolls back afterwards still
/// counted it (the jobs' rows are the exact figure).
pub(crate) fn enqueued(queue: &str, n: usize) {
    metrics::counter!(ENQUEUED, "queue" => queue.to_string()).increment(n as u64);
}

/// An attempt the lease rescuer ended (its worker stopped heartbeating): retried, dead
/// or interrupted, and — as from a pool — `failed` too unless interrupted. Rare: no
/// cached handles.
pub(crate) fn rescued(queue: &str, outcome: Option<&str>) {
    let event = match outcome {
        None => "retried",
        Some("interrupted") => "interrupted",
        Some(_) => "dead",
    };
    if event != "interrupted" {
        metrics::counter!(ENDED, "queue" => queue.to_string(), "event" => "failed").increment(1);
    }
    metrics::counter!(ENDED, "queue" => queue.to_string(), "event" => event).increment(1);
}

/// One pool's handles.
#[derive(Clone)]
pub(crate) struct QueueMetrics {
    started: Counter,
    ended: [Counter; EVENTS.len()],
    durations: [Histogram; EVENTS.len()],
    stale: Counter,
}

impl QueueMetrics {
    pub fn new(queue: &str) -> Self {
        let q = queue.to_string();
        QueueMetrics {
            started: metrics::counter!(STARTED, "queue" => q.clone()),
            ended: EVENTS.map(|e| metrics::counter!(ENDED, "queue" => q.clone(), "event" => e)),
            durations: EVENTS.map(|e| metrics::histogram!(DURATION, "queue" => q.clone(), "outcome" => e)),
            stale: metrics::counter!(STALE_ACKS, "queue" => q),
        }
    }

    pub fn started(&self, n: usize) {
        self.started.increment(n as u64);
    }

    pub fn duration(&self, ack: &Ack, seconds: f64) {
        self.durations[event(ack)].record(seconds);
    }

    /// Acks the database applied.
    pub fn applied<'a>(&self, acks: impl Iterator<Item = &'a Ack>) {
        let mut n = [0u64; EVENTS.len()];
        for a in acks {
            let e = event(a);
            n[e] += 1;
            if a.error.is_some() && matches!(EVENTS[e], "retried" | "dead") {
                n[FAILED] += 1;
            }
        }
        for (c, n) in self.ended.iter().zip(n) {
            if n > 0 {
                c.increment(n);
            }
        }
    }

    /// Jobs handed back outside an ack (a lost claim's, settled by its fetcher).
    pub fn released(&self, n: u64) {
        if n > 0 {
            self.ended[RELEASED].increment(n);
        }
    }

    pub fn stale(&self, n: usize) {
        self.stale.increment(n as u64);
    }
}

/// The index in [`EVENTS`] of how an ack ends its attempt.
fn event(ack: &Ack) -> usize {
    let name = match (ack.state, ack.outcome) {
        (JobState::Done, _) => "succeeded",
        (JobState::Failed, _) => "retried",
        (JobState::Killed, Some(Outcome::Interrupted)) => "interrupted",
        (JobState::Killed, Some(Outcome::Expired)) => "expired",
        (JobState::Killed, _) => "dead",
        (JobState::Pending, _) if ack.delay_ms > 0 => "snoozed",
        (JobState::Pending | JobState::Queued | JobState::Running, _) => "released",
    };
    EVENTS.iter().position(|e| *e == name).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(state: JobState, outcome: Option<Outcome>, error: bool) -> Ack {
        Ack {
            id: "x".into(),
            fence: 1,
            state,
            outcome,
            delay_ms: 0,
            error: error.then(|| "e".into()),
            error_detail: None,
            result: None,
            batch: 1,
            tid: None,
        }
    }

    #[test]
    fn every_ack_maps_to_its_event() {
        let name = |a: &Ack| EVENTS[event(a)];
        assert_eq!(name(&ack(JobState::Done, Some(Outcome::Succeeded), false)), "succeeded");
        assert_eq!(name(&ack(JobState::Failed, None, true)), "retried");
        assert_eq!(name(&ack(JobState::Killed, Some(Outcome::Dead), true)), "dead");
        assert_eq!(name(&ack(JobState::Killed, Some(Outcome::Interrupted), true)), "interrupted");
        assert_eq!(name(&ack(JobState::Killed, Some(Outcome::Expired), true)), "expired");
        assert_eq!(name(&ack(JobState::Pending, None, false)), "released");
        assert_eq!(name(&Ack { delay_ms: 5000, ..ack(JobState::Pending, None, true) }), "snoozed");
    }
}
