//! S7 retention: each kind of row past its own retention is deleted, oldest first, in
//! batches (no statement holds many locks or runs long): finished jobs with their exec
//! output and long-silent worker rows, activity rows, finished A2A queue rows, exec audit
//! rows, lifecycle events and rescue bundles. Each table's statement lives with the code
//! that owns the table.

use molecule_jobs::handler::HandlerResult;
use molecule_jobs::sweeper::{Retention, SweepArgs};
use molecule_jobs::{JobContext, maintenance};
use serde::Serialize;
use std::time::Duration;

use crate::Deps;

#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    pub jobs: u64,
    pub output_chunks: u64,
    pub workers: u64,
    pub activity: u64,
    pub a2a: u64,
    pub audit: u64,
    pub events: u64,
    pub rescue_bundles: u64,
}

pub async fn sweep(db: &sqlx::PgPool, r: &Retention, batch: i64) -> Result<Pruned, sqlx::Error> {
    let s = Duration::from_secs;
    let jobs = maintenance::prune_finished(db, s(r.jobs_s), batch).await?;
    let pruned = Pruned {
        jobs: jobs.jobs,
        output_chunks: jobs.output_chunks,
        workers: jobs.workers,
        activity: molecule_domain::activity::prune(db, s(r.activity_s), batch).await?,
        a2a: molecule_domain::a2a::queue::prune_finished(db, s(r.a2a_s), batch).await?,
        audit: crate::exec::audit::prune(db, s(r.audit_s), batch).await?,
        events: molecule_domain::events::prune(db, s(r.events_s), batch).await?,
        rescue_bundles: crate::rescue::prune(db, s(r.rescue_s), batch).await?,
    };
    Ok(pruned)
}

pub async fn run(_d: &Deps, ctx: &JobContext, args: &SweepArgs) -> HandlerResult {
    let mut r = args.retention.clone().unwrap_or_default();
    if let (None, Some(jobs_s)) = (&args.retention, args.retention_s) {
        r.jobs_s = jobs_s; // a job fired before per-table retention
    }
    let pruned = sweep(&ctx.db, &r, super::BATCH).await.map_err(super::db)?;
    tracing::info!(event = "sweep.retention", ?pruned, job_id = %ctx.id, "pruned old rows");
    Ok(serde_json::to_value(pruned).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use molecule_domain::testing::fresh_db;

    /// Old rows of every table go, in batches smaller than their number; new ones and
    /// unfinished A2A rows stay.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn old_rows_are_pruned_in_batches_and_new_ones_stay() {
        let (db, _) = fresh_db().await;
        let (org, ws): (uuid::Uuid, uuid::Uuid) = sqlx::query_as(
            "WITH o AS (INSERT INTO organizations (name) VALUES ('o') RETURNING id) \
             INSERT INTO workspaces (org_id, name, runtime, tier) SELECT id, 'w', 'echo', 2 FROM o RETURNING org_id, id",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        // Five old and two new rows in each table (old = 100 days).
        for age in [100.0 * 86400.0; 5].into_iter().chain([0.0; 2]) {
            let at = "now() - make_interval(secs => $3)";
            for sql in [
                format!("INSERT INTO activity_logs (workspace_id, org_id, type, created_at) VALUES ($1, $2, 'a2a_receive', {at})"),
                format!("INSERT INTO structure_events (workspace_id, org_id, event_type, created_at) VALUES ($1, $2, 'X', {at})"),
                format!("INSERT INTO audit_events (workspace_id, org_id, actor, action, created_at) VALUES ($1, $2, 'a', 'exec', {at})"),
                format!(
                    "INSERT INTO rescue_bundles (workspace_id, org_id, trigger, sections, captured_at) VALUES ($1, $2, 'bootstrap_failed', '{{}}', {at})"
                ),
                format!(
                    "INSERT INTO a2a_queue (workspace_id, org_id, method, body, status, updated_at) VALUES ($1, $2, 'message/send', '{{}}', 'completed', {at})"
                ),
            ] {
                sqlx::query(sqlx::AssertSqlSafe(sql)).bind(ws).bind(org).bind(age).execute(&db).await.unwrap();
            }
        }
        // An old A2A row still waiting is not finished: it stays.
        sqlx::query(
            "INSERT INTO a2a_queue (workspace_id, org_id, method, body, status, updated_at) \
                     VALUES ($1, $2, 'message/send', '{}', 'queued', now() - interval '100 days')",
        )
        .bind(ws)
        .bind(org)
        .execute(&db)
        .await
        .unwrap();
        let day = 86400;
        let r =
            Retention { jobs_s: 7 * day, activity_s: 30 * day, a2a_s: 7 * day, audit_s: 90 * day, events_s: 30 * day, rescue_s: 30 * day };
        let pruned = sweep(&db, &r, 2).await.unwrap();
        assert_eq!(pruned, Pruned { activity: 5, a2a: 5, audit: 5, events: 5, rescue_bundles: 5, ..Pruned::default() });
        for (table, left) in [("activity_logs", 2), ("structure_events", 2), ("audit_events", 2), ("rescue_bundles", 2), ("a2a_queue", 3)] {
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}"))).fetch_one(&db).await.unwrap();
            assert_eq!(n, left, "{table}");
        }
        assert_eq!(sweep(&db, &r, 2).await.unwrap(), Pruned::default());
    }
}
