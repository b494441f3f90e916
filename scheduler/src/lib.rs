//! The scheduler: fires sweeper jobs on their ticks. Each tick's job carries the
//! idempotency key (sweeper, tick), so any number of scheduler replicas fire it once.
//! This issue ships the retention sweep; the workspace sweepers (S1–S6) come later.

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
    tracing::info!(retention_every_s = cfg.retention_every.as_secs(), "scheduler started");
    let mut last_tick = None;
    loop {
        let now = chrono::Utc::now().timestamp();
        let tick = tick_of(now, cfg.retention_every);
        if last_tick != Some(tick) {
            let args = serde_json::json!({ "retention_s": cfg.job_retention.as_secs() });
            match fire(&db, "retention", tick, args).await {
                Ok(job_id) => {
                    tracing::info!(event = "sweep.fired", sweeper = "retention", tick, job_id, "sweep enqueued");
                    last_tick = Some(tick);
                }
                Err(e) => tracing::warn!(sweeper = "retention", error = %e, "cannot enqueue sweep; retrying"),
            }
        }
        let next = tick + cfg.retention_every.as_secs().max(1) as i64;
        let wait = if last_tick == Some(tick) { Duration::from_secs((next - now).max(1) as u64) } else { Duration::from_secs(2) };
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
}
