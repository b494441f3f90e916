//! The scheduler: fires sweeper jobs on their ticks. Each tick's job carries the
//! idempotency key (sweeper, tick), so any number of scheduler replicas fire it once.
//! Today: retention (S7), provision timeout (S1) and A2A TTL (S6) on fixed periods; the
//! other sweepers (S2–S5) and cron expressions per sweeper are not built yet.

use molecule_jobs::{enqueue, JobKind, NewJob};
use sqlx::PgPool;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// How often the retention sweep runs.
    pub retention_every: Duration,
    /// Finished jobs older than this are pruned.
    pub job_retention: Duration,
    /// How long a workspace may stay `provisioning` (S1).
    pub provision_timeout: Duration,
}

/// One sweeper the scheduler fires: its name, period and job settings.
struct Sweeper {
    name: &'static str,
    every: Duration,
    args: serde_json::Value,
}

impl SchedulerConfig {
    fn sweepers(&self) -> Vec<Sweeper> {
        vec![
            Sweeper {
                name: "retention",
                every: self.retention_every,
                args: serde_json::json!({ "retention_s": self.job_retention.as_secs() }),
            },
            Sweeper {
                name: "provision_timeout",
                every: provision_sweep_period(self.provision_timeout),
                args: serde_json::json!({ "timeout_s": self.provision_timeout.as_secs() }),
            },
            // Lookups read a message past its TTL as expired at once; this writes it down.
            Sweeper { name: "a2a_ttl", every: A2A_TTL_SWEEP_PERIOD, args: serde_json::json!({}) },
        ]
    }
}

/// S6's period.
pub const A2A_TTL_SWEEP_PERIOD: Duration = Duration::from_secs(30);

/// S1 runs often enough that a timeout is noticed within a tenth of itself (at most 30 s late).
pub fn provision_sweep_period(timeout: Duration) -> Duration {
    (timeout / 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// The tick a moment belongs to: the start of its `every`-long slot since the epoch.
pub fn tick_of(now_s: i64, every: Duration) -> i64 {
    let e = every.as_secs().max(1) as i64;
    now_s - now_s.rem_euclid(e)
}

/// Enqueues one sweep job for `sweeper` at `tick`; a second call for the same tick is a no-op.
pub async fn fire(db: &PgPool, sweeper: &str, tick: i64, args: serde_json::Value) -> Result<String, sqlx::Error> {
    let mut conn = db.acquire().await?;
    let mut payload = args;
    payload["sweeper"] = serde_json::Value::String(sweeper.to_string());
    let job = NewJob::new(JobKind::Sweep, &payload).idempotency_key(format!("{sweeper}:{tick}"));
    Ok(enqueue(&mut conn, &job).await?.to_string())
}

pub async fn run(db: PgPool, cfg: SchedulerConfig, mut shutdown: watch::Receiver<bool>) {
    let sweepers = cfg.sweepers();
    for s in &sweepers {
        tracing::info!(sweeper = s.name, every_s = s.every.as_secs(), "scheduler: sweeper");
    }
    let mut last_tick: Vec<Option<i64>> = vec![None; sweepers.len()];
    loop {
        let now = chrono::Utc::now().timestamp();
        let mut wait = Duration::from_secs(3600);
        for (s, last) in sweepers.iter().zip(last_tick.iter_mut()) {
            let tick = tick_of(now, s.every);
            if *last != Some(tick) {
                match fire(&db, s.name, tick, s.args.clone()).await {
                    Ok(job_id) => {
                        tracing::debug!(event = "sweep.fired", sweeper = s.name, tick, job_id, "sweep enqueued");
                        *last = Some(tick);
                    }
                    Err(e) => tracing::warn!(sweeper = s.name, error = %e, "cannot enqueue sweep; retrying"),
                }
            }
            let next = tick + s.every.as_secs().max(1) as i64;
            let this = if *last == Some(tick) { Duration::from_secs((next - now).max(1) as u64) } else { Duration::from_secs(2) };
            wait = wait.min(this);
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_slot_starts() {
        let ten = Duration::from_secs(600);
        assert_eq!(tick_of(1_200, ten), 1_200);
        assert_eq!(tick_of(1_799, ten), 1_200);
        assert_eq!(tick_of(1_800, ten), 1_800);
    }

    #[test]
    fn provision_sweeps_run_within_a_tenth_of_the_timeout() {
        assert_eq!(provision_sweep_period(Duration::from_secs(600)), Duration::from_secs(30));
        assert_eq!(provision_sweep_period(Duration::from_secs(100)), Duration::from_secs(10));
        assert_eq!(provision_sweep_period(Duration::from_secs(3)), Duration::from_secs(1));
    }
}
