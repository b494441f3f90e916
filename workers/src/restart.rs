//! J3 restart: stop, then provision again on the same backend, one restart at a time per
//! workspace. New secrets are minted (the old token stops working); the workspace is
//! `provisioning` until its agent registers again.

use molecule_domain::{WorkspaceId, WorkspaceStatus};
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::{JobContext, JobError};
use serde_json::json;
use std::time::Duration;

use crate::Deps;
use crate::provision::{db_err, load};

pub async fn run(d: &Deps, ctx: &JobContext, ws: WorkspaceId) -> HandlerResult {
    match one_at_a_time(&d.db, ws, restart(d, ctx, ws)).await? {
        Some(res) => res,
        None => Err(wait_turn(d, ctx, "another restart of this workspace is running").await),
    }
}

/// How soon a job that found the restart lock held looks again.
pub const TURN_RETRY: Duration = Duration::from_secs(5);
/// How long after its enqueue (or its last retry by hand) a job may keep waiting its turn
/// without using attempts.
pub const TURN_WAIT: Duration = Duration::from_secs(600);

/// The answer of a job that found the workspace's restart lock held (J1, J3): its turn
/// comes when the holder is done, which is no failure of its own, so it snoozes (the
/// attempt does not count: a restart queued during a first image pull, which the holder
/// runs under the lock, must not run out of attempts). It pulls nothing while it waits.
/// Snoozes are not capped by the job core: once the job is [`TURN_WAIT`] old, it fails
/// retryably instead, so a lock that stays taken ends it after its attempts.
pub(crate) async fn wait_turn(d: &Deps, ctx: &JobContext, detail: &'static str) -> JobError {
    // No row (a job run outside the queue): young.
    match molecule_jobs::status::queued_before(&d.db, &ctx.id, TURN_WAIT).await {
        Ok(Some(true)) => JobError::retryable("restart_in_progress", format!("{detail}; waited its turn {TURN_WAIT:?} already")),
        Ok(_) => JobError::snooze(TURN_RETRY, "restart_in_progress", detail),
        Err(e) => db_err(e),
    }
}

/// Runs `work` holding the workspace's restart lock, or answers None when another
/// holds it ([`crate::exclusive`]): a restart, a launch (J1, on every backend) or a
/// restart's or hibernation's stop.
pub async fn one_at_a_time<T>(
    db: &sqlx::PgPool,
    ws: WorkspaceId,
    work: impl std::future::Future<Output = T>,
) -> Result<Option<T>, JobError> {
    crate::exclusive::one_at_a_time(db, &format!("molecule.restart.{ws}"), work).await
}

async fn restart(d: &Deps, ctx: &JobContext, ws: WorkspaceId) -> HandlerResult {
    let Some(row) = load(d, ws).await? else {
        return Ok(json!({ "skipped": "workspace does not exist" }));
    };
    if matches!(row.status, WorkspaceStatus::Removed) {
        return Ok(json!({ "skipped": "workspace is removed" }));
    }
    tracing::info!(event = "restart.pre_stop", workspace_id = %ws, org_id = %row.org, job_id = %ctx.id);
    d.backend.stop(ws).await.map_err(|e| match e {
        molecule_backends::BackendError::NoBackend => JobError::NoBackend,
        other => JobError::retryable("backend", other.to_string()),
    })?;
    // status_changed_at too: a restart of a workspace already provisioning starts S1's clock anew.
    sqlx::query("UPDATE workspaces SET status = 'provisioning', status_changed_at = now(), updated_at = now() WHERE id = $1 AND status <> 'removed'")
        .bind(ws.0)
        .execute(&d.db)
        .await
        .map_err(db_err)?;
    let row = match load(d, ws).await? {
        Some(r) if r.status == WorkspaceStatus::Provisioning => r,
        _ => return Ok(json!({ "skipped": "workspace removed during restart" })),
    };
    crate::provision::start(d, ctx, ws, &row).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use molecule_domain::testing::fresh_db;
    use std::time::Duration;

    /// A small pool, so a leaked lock would stay on a connection the next caller reuses.
    async fn small_pool() -> sqlx::PgPool {
        let (_, url) = fresh_db().await;
        sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&url).await.unwrap()
    }

    /// Tries to take the lock until it is free (the server ends a dropped connection's
    /// session, and its locks, a moment after the socket closes).
    async fn lock_becomes_free(db: &sqlx::PgPool, ws: WorkspaceId) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while one_at_a_time(db, ws, async {}).await.unwrap().is_none() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the lock was released within 10 s");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_restart_of_the_same_workspace_is_refused_while_the_first_runs() {
        let db = small_pool().await;
        let ws = WorkspaceId(uuid::Uuid::new_v4());
        let (entered, inside) = tokio::sync::oneshot::channel();
        let (release, done) = tokio::sync::oneshot::channel::<()>();
        let first = tokio::spawn({
            let db = db.clone();
            async move {
                one_at_a_time(&db, ws, async {
                    entered.send(()).unwrap();
                    done.await.unwrap()
                })
                .await
                .unwrap()
            }
        });
        inside.await.unwrap();
        assert!(one_at_a_time(&db, ws, async {}).await.unwrap().is_none(), "held by the first");
        let other = WorkspaceId(uuid::Uuid::new_v4());
        assert!(one_at_a_time(&db, other, async {}).await.unwrap().is_some(), "another workspace is not blocked");
        release.send(()).unwrap();
        assert!(first.await.unwrap().is_some());
        assert!(one_at_a_time(&db, ws, async {}).await.unwrap().is_some(), "released on return");
    }

    /// The restart's work needs the pool while the lock is held: holding the lock must not
    /// take one of the pool's connections (with a pool of one, that would wait forever).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn holding_the_lock_takes_no_connection_from_the_pool() {
        let (_, url) = fresh_db().await;
        let db =
            sqlx::postgres::PgPoolOptions::new().max_connections(1).acquire_timeout(Duration::from_secs(3)).connect(&url).await.unwrap();
        let ws = WorkspaceId(uuid::Uuid::new_v4());
        let n = one_at_a_time(&db, ws, async { sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&db).await })
            .await
            .unwrap()
            .expect("lock taken");
        assert_eq!(n.expect("the work got the pool's connection"), 1);
    }

    /// The leak of the session lock this replaced: a panicking or aborted restart must
    /// leave the workspace restartable, on every connection of the pool.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_lock_is_released_when_the_restart_panics_or_is_aborted() {
        let db = small_pool().await;
        let ws = WorkspaceId(uuid::Uuid::new_v4());
        let panicked = tokio::spawn({
            let db = db.clone();
            async move { one_at_a_time(&db, ws, async { panic!("restart handler bug") }).await }
        })
        .await;
        assert!(panicked.unwrap_err().is_panic());
        lock_becomes_free(&db, ws).await;
        let (entered, inside) = tokio::sync::oneshot::channel();
        let aborted = tokio::spawn({
            let db = db.clone();
            async move {
                one_at_a_time(&db, ws, async {
                    entered.send(()).unwrap();
                    std::future::pending::<()>().await
                })
                .await
            }
        });
        inside.await.unwrap();
        aborted.abort();
        assert!(aborted.await.unwrap_err().is_cancelled());
        lock_becomes_free(&db, ws).await;
        let held: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())").fetch_one(&db).await.unwrap();
        assert_eq!(held, 0);
    }
}
