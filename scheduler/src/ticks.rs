//! The `scheduler_ticks` table: one row per (sweeper, tick) fired. The insert that claims
//! a tick and the enqueue of its job share one transaction, so a tick either fired once
//! with its job, or not at all.

use chrono::{DateTime, Utc};
use molecule_jobs::sweeper::SweepArgs;
use molecule_jobs::{JobKind, NewJob, enqueue};
use sqlx::PgPool;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fired {
    /// This call claimed the tick; its sweep job.
    Now(String),
    /// Another replica (or an earlier call) fired it.
    Already,
}

/// Fires `args.sweeper` for `tick` unless it already fired. The job expires at `expires`
/// (the sweeper's next tick): a backlog of sweeps (workers down, a long sweep ahead) is
/// not worked off one stale run after another.
pub async fn fire(db: &PgPool, args: &SweepArgs, tick: DateTime<Utc>, expires: Option<DateTime<Utc>>) -> Result<Fired, sqlx::Error> {
    let mut tx = db.begin().await?;
    let claimed: Option<i32> = sqlx::query_scalar(
        "INSERT INTO scheduler_ticks (sweeper, tick) VALUES ($1, $2) ON CONFLICT (sweeper, tick) DO NOTHING RETURNING 1",
    )
    .bind(args.sweeper.name())
    .bind(tick)
    .fetch_optional(&mut *tx)
    .await?;
    if claimed.is_none() {
        return Ok(Fired::Already);
    }
    let mut job = NewJob::new(JobKind::Sweep, args).idempotency_key(format!("{}:{}", args.sweeper, tick.timestamp()));
    if let Some(at) = expires {
        job = job.expires_at(at);
    }
    let job_id = enqueue(&mut tx, &job).await?.to_string();
    sqlx::query("UPDATE scheduler_ticks SET job_id = $3 WHERE sweeper = $1 AND tick = $2")
        .bind(args.sweeper.name())
        .bind(tick)
        .bind(&job_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Fired::Now(job_id))
}

/// Forgets ticks fired longer ago than `keep`; returns how many.
pub async fn prune(db: &PgPool, keep: Duration) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query("DELETE FROM scheduler_ticks WHERE fired_at < now() - make_interval(secs => $1)")
        .bind(keep.as_secs_f64())
        .execute(db)
        .await?
        .rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;
    use molecule_domain::testing::fresh_db;
    use molecule_jobs::sweeper::Sweeper;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tick_fires_once_even_after_its_job_is_pruned() {
        let (db, _) = fresh_db().await;
        let args = SweepArgs::new(Sweeper::A2aTtl);
        let tick = Utc::now();
        let Fired::Now(job) = fire(&db, &args, tick, None).await.unwrap() else { panic!("first fire") };
        assert_eq!(fire(&db, &args, tick, None).await.unwrap(), Fired::Already);
        // Job retention deleted the job (and its idempotency key): the tick still holds.
        assert!(molecule_jobs::status::delete(&db, &molecule_domain::JobId::from_db(job.clone())).await.unwrap());
        assert_eq!(fire(&db, &args, tick, None).await.unwrap(), Fired::Already);
        assert_eq!(molecule_jobs::store::stats::count_all(&db).await.unwrap(), 0);
        // Another sweeper's same tick is its own.
        assert!(matches!(fire(&db, &SweepArgs::new(Sweeper::Health), tick, None).await.unwrap(), Fired::Now(_)));
        sqlx::query("UPDATE scheduler_ticks SET fired_at = now() - interval '40 days'").execute(&db).await.unwrap();
        assert_eq!(prune(&db, Duration::from_secs(30 * 24 * 3600)).await.unwrap(), 2);
    }
}
