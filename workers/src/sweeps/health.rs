//! S4 health.
//!
//! - An `online` workspace the backend runs whose instance is definitely not running (the
//!   backend says so without error: an unsure answer is "alive, degraded signal", never a
//!   reason to restart) → `offline`, a `WORKSPACE_OFFLINE` event and one restart
//!   (coalesced), in one transaction whose UPDATE re-checks `online` — unless a restart is
//!   running right now (its stop is not a death), and unless the instance already died
//!   [`MAX_RESTARTS_PER_HOUR`] times in the last hour: then `failed`, saying why.
//! - An `external` workspace whose agent has not heartbeated within the staleness window
//!   → `awaiting_agent` (not `offline`: nothing of ours can restart it; its next heartbeat
//!   or registration brings it back).

use molecule_domain::{OrgId, WorkspaceId};
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::sweeper::SweepArgs;
use molecule_jobs::{JobContext, JobError};
use std::time::Duration;

use crate::Deps;

pub const DEFAULT_HEARTBEAT_STALE: Duration = Duration::from_secs(120);

/// `online` workspaces on the backend whose instance is gone → offline + restart; returns
/// their ids. Walks every online workspace in pages of `batch`.
pub async fn restart_dead(d: &Deps, batch: i64) -> Result<Vec<WorkspaceId>, JobError> {
    let Some(running) = super::running_workspaces(d).await? else { return Ok(vec![]) };
    let mut flipped = Vec::new();
    let mut after = uuid::Uuid::nil();
    loop {
        let page: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT id FROM workspaces WHERE status = 'online' AND runtime <> 'external' AND id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(batch)
        .fetch_all(&d.db)
        .await
        .map_err(super::db)?;
        let Some(last) = page.last().copied() else { break };
        after = last;
        for id in page.into_iter().filter(|id| !running.contains(id)) {
            let ws = WorkspaceId(id);
            // The list is a snapshot: ask about this one instance before acting.
            if let (false, None) = d.backend.is_running(ws).await {
                if offline_and_restart(&d.db, ws).await.map_err(super::db)? {
                    flipped.push(ws);
                }
            }
        }
    }
    Ok(flipped)
}

/// Restarts after which a workspace whose instance keeps dying is failed instead.
pub const MAX_RESTARTS_PER_HOUR: i64 = 3;

async fn offline_and_restart(db: &sqlx::PgPool, ws: WorkspaceId) -> Result<bool, sqlx::Error> {
    let mut tx = db.begin().await?;
    // A restart in progress (J3 holds this lock) stops the instance before it marks the
    // workspace `provisioning`: that is not a death, and a second restart would kill the
    // new instance. Taking the lock here also keeps a restart from starting until this
    // transaction ends.
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("molecule.restart.{ws}"))
        .fetch_one(&mut *tx)
        .await?;
    if !free {
        return Ok(false);
    }
    let recent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM structure_events WHERE workspace_id = $1 AND event_type = 'WORKSPACE_OFFLINE' \
         AND payload ->> 'reason' = 'instance_not_running' AND created_at > now() - interval '1 hour'",
    )
    .bind(ws.0)
    .fetch_one(&mut *tx)
    .await?;
    if recent >= MAX_RESTARTS_PER_HOUR {
        // Its instance keeps dying: restarting it again would loop. Failed, and it says why.
        let org: Option<uuid::Uuid> = sqlx::query_scalar(
            "UPDATE workspaces SET status = 'failed', last_sample_error = $2, updated_at = now() \
             WHERE id = $1 AND status = 'online' RETURNING org_id",
        )
        .bind(ws.0)
        .bind(format!(
            "The workspace's instance stopped {MAX_RESTARTS_PER_HOUR} times within an hour after being restarted; \
             it is no longer restarted automatically. Restart it when the cause is fixed."
        ))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(org) = org.map(OrgId) else { return Ok(false) };
        molecule_domain::events::record(&mut tx, org, ws.0, "WORKSPACE_FAILED", serde_json::json!({ "reason": "crash_loop" })).await?;
        tx.commit().await?;
        tracing::warn!(event = "sweep.health", workspace_id = %ws, org_id = %org, "instance keeps dying: failed");
        return Ok(true);
    }
    let org: Option<uuid::Uuid> = sqlx::query_scalar(
        "UPDATE workspaces SET status = 'offline', updated_at = now() WHERE id = $1 AND status = 'online' RETURNING org_id",
    )
    .bind(ws.0)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(org) = org.map(OrgId) else { return Ok(false) };
    molecule_domain::events::record(&mut tx, org, ws.0, "WORKSPACE_OFFLINE", serde_json::json!({ "reason": "instance_not_running" }))
        .await?;
    let r = molecule_jobs::restarts::request(&mut tx, org, ws, "instance_not_running").await?;
    tx.commit().await?;
    tracing::info!(event = "sweep.health", workspace_id = %ws, org_id = %org, restart_job = %r.job_id, "instance not running: offline, restart queued");
    Ok(true)
}

/// External workspaces silent for `stale` → `awaiting_agent`; returns their ids.
pub async fn await_silent_agents(db: &sqlx::PgPool, stale: Duration, batch: i64) -> Result<Vec<WorkspaceId>, sqlx::Error> {
    let mut all = Vec::new();
    loop {
        let mut tx = db.begin().await?;
        // The predicate is in the UPDATE itself; SKIP LOCKED leaves rows a registration holds.
        let rows: Vec<(uuid::Uuid, uuid::Uuid)> = sqlx::query_as(
            "UPDATE workspaces SET status = 'awaiting_agent', updated_at = now() \
             WHERE id = ANY(ARRAY(SELECT id FROM workspaces WHERE runtime = 'external' AND status IN ('online', 'degraded') \
                                    AND COALESCE(last_heartbeat_at, status_changed_at) < now() - make_interval(secs => $1) \
                                  LIMIT $2 FOR UPDATE SKIP LOCKED)) \
               AND status IN ('online', 'degraded') \
               AND COALESCE(last_heartbeat_at, status_changed_at) < now() - make_interval(secs => $1) \
             RETURNING id, org_id",
        )
        .bind(stale.as_secs_f64())
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        for (ws, org) in &rows {
            molecule_domain::events::record(
                &mut tx,
                OrgId(*org),
                *ws,
                "WORKSPACE_AWAITING_AGENT",
                serde_json::json!({ "reason": "heartbeat_stale", "stale_s": stale.as_secs() }),
            )
            .await?;
            tracing::info!(event = "sweep.health", workspace_id = %ws, org_id = %org, "external agent silent: awaiting_agent");
        }
        tx.commit().await?;
        let n = rows.len();
        all.extend(rows.into_iter().map(|(ws, _)| WorkspaceId(ws)));
        if (n as i64) < batch {
            return Ok(all);
        }
    }
}

pub async fn run(d: &Deps, _ctx: &JobContext, args: &SweepArgs) -> HandlerResult {
    // Both halves, whatever the other's fate: an engine that cannot list its instances
    // says nothing about external agents' heartbeats. Its error fails the sweep after.
    let restarted = restart_dead(d, super::BATCH).await;
    let stale = args.heartbeat_stale_s.map(Duration::from_secs).unwrap_or(DEFAULT_HEARTBEAT_STALE);
    let waiting = await_silent_agents(&d.db, stale, super::BATCH).await.map_err(super::db)?;
    let restarted = restarted?;
    Ok(serde_json::json!({
        "restarted": restarted.iter().map(|w| w.to_string()).collect::<Vec<_>>(),
        "awaiting_agent": waiting.iter().map(|w| w.to_string()).collect::<Vec<_>>(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use molecule_domain::testing::fresh_db;

    /// External agents: silent past the window → awaiting_agent (with an event); recent
    /// heartbeats, other runtimes and other statuses are left alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_external_agents_await_their_agent() {
        let (db, _) = fresh_db().await;
        let org: uuid::Uuid =
            sqlx::query_scalar("INSERT INTO organizations (name) VALUES ('o') RETURNING id").fetch_one(&db).await.unwrap();
        let add = |runtime: &'static str, status: &'static str, beat_s_ago: Option<f64>| {
            let db = db.clone();
            async move {
                sqlx::query_scalar::<_, uuid::Uuid>(
                    "INSERT INTO workspaces (org_id, name, runtime, tier, status, last_heartbeat_at) \
                     VALUES ($1, 'w', $2, 2, $3::workspace_status, now() - make_interval(secs => $4)) RETURNING id",
                )
                .bind(org)
                .bind(runtime)
                .bind(status)
                .bind(beat_s_ago)
                .fetch_one(&db)
                .await
                .unwrap()
            }
        };
        let silent = add("external", "online", Some(600.0)).await;
        let fresh = add("external", "online", Some(5.0)).await;
        let docker = add("echo", "online", Some(600.0)).await;
        let offline = add("external", "offline", Some(600.0)).await;
        // Never heartbeated: judged from when it came online.
        let never = add("external", "online", None).await;
        sqlx::query("UPDATE workspaces SET status_changed_at = now() - interval '1 hour' WHERE id = $1")
            .bind(never)
            .execute(&db)
            .await
            .unwrap();

        let mut got = await_silent_agents(&db, Duration::from_secs(120), 1).await.unwrap();
        got.sort_by_key(|w| w.0);
        let mut want = vec![WorkspaceId(silent), WorkspaceId(never)];
        want.sort_by_key(|w| w.0);
        assert_eq!(got, want, "in batches of one, all of them");
        for (id, status) in
            [(silent, "awaiting_agent"), (never, "awaiting_agent"), (fresh, "online"), (docker, "online"), (offline, "offline")]
        {
            let s: String = sqlx::query_scalar("SELECT status::text FROM workspaces WHERE id = $1").bind(id).fetch_one(&db).await.unwrap();
            assert_eq!(s, status, "{id}");
        }
        let events: i64 = sqlx::query_scalar("SELECT count(*) FROM structure_events WHERE event_type = 'WORKSPACE_AWAITING_AGENT'")
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(events, 2);
        assert!(await_silent_agents(&db, Duration::from_secs(120), 1).await.unwrap().is_empty());
    }

    /// S4's two halves are independent: while the engine cannot be listed, a silent
    /// external agent still goes `awaiting_agent` (its heartbeat is in the database), and
    /// the sweep then fails retryably for the half it could not do.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_external_agents_are_marked_while_the_engine_cannot_be_listed() {
        let (db, _) = fresh_db().await;
        let ws: uuid::Uuid = sqlx::query_scalar(
            "WITH o AS (INSERT INTO organizations (name) VALUES ('o') RETURNING id) \
             INSERT INTO workspaces (org_id, name, runtime, tier, status, last_heartbeat_at) \
             SELECT id, 'w', 'external', 2, 'online', now() - interval '10 minutes' FROM o RETURNING id",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        let deps = Deps::minimal(db.clone(), std::sync::Arc::new(crate::sweeps::Unlistable)).unwrap();
        let ctx = JobContext::outside_queue(db.clone(), "sweep");
        let args = SweepArgs::new(molecule_jobs::sweeper::Sweeper::Health);
        let out = run(&deps, &ctx, &args).await;
        assert!(matches!(&out, Err(JobError::Retryable(f)) if f.code == "sweep"), "{out:?}");
        let s: String = sqlx::query_scalar("SELECT status::text FROM workspaces WHERE id = $1").bind(ws).fetch_one(&db).await.unwrap();
        assert_eq!(s, "awaiting_agent");
    }

    /// The guards of a restart: none while a restart holds the workspace's lock, and after
    /// three deaths within the hour the workspace is failed instead of restarted again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_restart_while_one_runs_and_no_restart_loop() {
        let (db, _) = fresh_db().await;
        let (org, ws): (uuid::Uuid, uuid::Uuid) = sqlx::query_as(
            "WITH o AS (INSERT INTO organizations (name) VALUES ('o') RETURNING id) \
             INSERT INTO workspaces (org_id, name, runtime, tier, status) SELECT id, 'w', 'echo', 2, 'online' FROM o RETURNING org_id, id",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        let ws = WorkspaceId(ws);
        let restarts = || {
            let db = db.clone();
            async move { molecule_jobs::store::stats::payloads_of(&db, molecule_jobs::JobKind::Restart, ws).await.unwrap().len() as i64 }
        };
        // A restart is running (J3's lock is held): its stop is not a death.
        let (release, held) = tokio::sync::oneshot::channel::<()>();
        let (entered, inside) = tokio::sync::oneshot::channel();
        let holder = tokio::spawn({
            let db = db.clone();
            async move {
                crate::restart::one_at_a_time(&db, ws, async move {
                    entered.send(()).unwrap();
                    let _ = held.await;
                })
                .await
            }
        });
        inside.await.unwrap();
        assert!(!offline_and_restart(&db, ws).await.unwrap());
        assert_eq!(restarts().await, 0);
        release.send(()).unwrap();
        holder.await.unwrap().unwrap();

        assert!(offline_and_restart(&db, ws).await.unwrap());
        assert_eq!(restarts().await, 1);
        // It came back and died twice more within the hour: the fourth death fails it.
        for _ in 0..2 {
            sqlx::query("UPDATE workspaces SET status = 'online' WHERE id = $1").bind(ws.0).execute(&db).await.unwrap();
            assert!(offline_and_restart(&db, ws).await.unwrap());
        }
        sqlx::query("UPDATE workspaces SET status = 'online' WHERE id = $1").bind(ws.0).execute(&db).await.unwrap();
        assert!(offline_and_restart(&db, ws).await.unwrap());
        let (status, why): (String, Option<String>) =
            sqlx::query_as("SELECT status::text, last_sample_error FROM workspaces WHERE id = $1").bind(ws.0).fetch_one(&db).await.unwrap();
        assert_eq!(status, "failed");
        assert!(why.unwrap().contains("3 times within an hour"));
        let _ = org;
    }
}
