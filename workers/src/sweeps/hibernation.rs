//! S5 hibernation: a workspace idle for the configured time — no A2A message to or from
//! it, no exec (`last_active_at`), or none since it came online — goes `hibernating`, and a
//! `stop` job (reason `hibernate`) takes its instance down and marks it `hibernated`
//! (never over `removed`). A restart wakes it. External workspaces are never hibernated:
//! nothing of ours runs them. With no idle time set, the sweep does nothing.

use molecule_domain::{OrgId, WorkspaceId};
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::sweeper::SweepArgs;
use molecule_jobs::{JobContext, JobKind, NewJob, enqueue};
use std::time::Duration;

/// The idle predicate over `workspaces` (`$1`: idle seconds). GREATEST skips a NULL
/// `last_active_at` (never used): then idle counts from its entry into `online`. A
/// workspace with A2A messages still on their way to it (or from it) is not idle.
macro_rules! idle {
    () => {
        "status = 'online' AND runtime <> 'external' \
         AND GREATEST(last_active_at, status_changed_at) < now() - make_interval(secs => $1) \
         AND NOT EXISTS (SELECT 1 FROM a2a_queue q WHERE (q.workspace_id = workspaces.id OR q.caller_id = workspaces.id) \
                         AND q.status IN ('queued', 'dispatched'))"
    };
}

/// Hibernates up to `batch` idle workspaces per transaction until none is left; returns them.
pub async fn sweep(db: &sqlx::PgPool, idle: Duration, batch: i64) -> Result<Vec<WorkspaceId>, sqlx::Error> {
    let mut all = Vec::new();
    loop {
        let mut tx = db.begin().await?;
        let rows: Vec<(uuid::Uuid, uuid::Uuid)> = sqlx::query_as(concat!(
            "UPDATE workspaces SET status = 'hibernating', updated_at = now() \
             WHERE status = 'online' AND id = ANY(ARRAY(SELECT id FROM workspaces WHERE ",
            idle!(),
            " LIMIT $2 FOR UPDATE SKIP LOCKED)) AND ",
            idle!(),
            " RETURNING id, org_id"
        ))
        .bind(idle.as_secs_f64())
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        // Each row and its stop job commit together: a hibernating workspace always has one.
        for (ws, org) in &rows {
            let (ws, org) = (WorkspaceId(*ws), OrgId(*org));
            let job = NewJob::new(JobKind::Stop, &serde_json::json!({ "workspace_id": ws, "reason": "hibernate" })).org(org).workspace(ws);
            let job_id = enqueue(&mut tx, &job).await?;
            molecule_domain::events::record(
                &mut tx,
                org,
                ws.0,
                "WORKSPACE_HIBERNATING",
                serde_json::json!({ "idle_s": idle.as_secs(), "job_id": job_id.to_string() }),
            )
            .await?;
            tracing::info!(event = "sweep.hibernation", workspace_id = %ws, org_id = %org, job_id = %job_id, "idle: hibernating");
        }
        tx.commit().await?;
        let n = rows.len();
        all.extend(rows.into_iter().map(|(ws, _)| WorkspaceId(ws)));
        if (n as i64) < batch {
            return Ok(all);
        }
    }
}

pub async fn run(ctx: &JobContext, args: &SweepArgs) -> HandlerResult {
    let Some(idle) = args.idle_s.filter(|s| *s > 0).map(Duration::from_secs) else {
        return Ok(serde_json::json!({ "skipped": "no idle time set (MOLECULE_HIBERNATE_IDLE_SECS)" }));
    };
    let hibernating = sweep(&ctx.db, idle, super::BATCH).await.map_err(super::db)?;
    Ok(serde_json::json!({ "hibernating": hibernating.iter().map(|w| w.to_string()).collect::<Vec<_>>() }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use molecule_domain::testing::fresh_db;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_idle_online_workspaces_hibernate_each_with_one_stop_job() {
        let (db, _) = fresh_db().await;
        let org: uuid::Uuid =
            sqlx::query_scalar("INSERT INTO organizations (name) VALUES ('o') RETURNING id").fetch_one(&db).await.unwrap();
        // (runtime, status, online since s ago, last active s ago)
        let add = |runtime: &'static str, status: &'static str, since: f64, active: Option<f64>| {
            let db = db.clone();
            async move {
                let id: uuid::Uuid = sqlx::query_scalar(
                    "INSERT INTO workspaces (org_id, name, runtime, tier, status, last_active_at) \
                     VALUES ($1, 'w', $2, 2, $3::workspace_status, now() - make_interval(secs => $4)) RETURNING id",
                )
                .bind(org)
                .bind(runtime)
                .bind(status)
                .bind(active)
                .fetch_one(&db)
                .await
                .unwrap();
                sqlx::query("UPDATE workspaces SET status_changed_at = now() - make_interval(secs => $2) WHERE id = $1")
                    .bind(id)
                    .bind(since)
                    .execute(&db)
                    .await
                    .unwrap();
                id
            }
        };
        let idle = add("echo", "online", 7200.0, Some(7200.0)).await;
        let never_used = add("echo", "online", 7200.0, None).await;
        let busy = add("echo", "online", 7200.0, Some(10.0)).await;
        // Idle by its clock, but a message is still on its way to it.
        let awaited = add("echo", "online", 7200.0, Some(7200.0)).await;
        sqlx::query("INSERT INTO a2a_queue (org_id, workspace_id, method, body) VALUES ($1, $2, 'message/send', '{}')")
            .bind(org)
            .bind(awaited)
            .execute(&db)
            .await
            .unwrap();
        let just_online = add("echo", "online", 10.0, Some(7200.0)).await;
        let external = add("external", "online", 7200.0, None).await;
        let removed = add("echo", "removed", 7200.0, None).await;

        let mut got = sweep(&db, Duration::from_secs(3600), 1).await.unwrap();
        got.sort_by_key(|w| w.0);
        let mut want = vec![WorkspaceId(idle), WorkspaceId(never_used)];
        want.sort_by_key(|w| w.0);
        assert_eq!(got, want);
        for (id, status, stops) in [
            (idle, "hibernating", 1),
            (never_used, "hibernating", 1),
            (busy, "online", 0),
            (awaited, "online", 0),
            (just_online, "online", 0),
            (external, "online", 0),
            (removed, "removed", 0),
        ] {
            let s: String = sqlx::query_scalar("SELECT status::text FROM workspaces WHERE id = $1").bind(id).fetch_one(&db).await.unwrap();
            let stops_of = molecule_jobs::store::stats::payloads_of(&db, molecule_jobs::JobKind::Stop, WorkspaceId(id)).await.unwrap();
            let n = stops_of.iter().filter(|p| p["reason"] == "hibernate").count() as i64;
            assert_eq!((s.as_str(), n), (status, stops), "{id}");
        }
        assert!(sweep(&db, Duration::from_secs(3600), 1).await.unwrap().is_empty());
    }
}
