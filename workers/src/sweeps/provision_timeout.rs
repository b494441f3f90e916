//! S1 provision timeout: a workspace `provisioning` for longer than its runtime's timeout
//! (its agent never registered, or its start never succeeded) → `failed`, with a canned
//! sentence saying so, a `WORKSPACE_PROVISION_FAILED` event and a rescue capture
//! (`provision_timeout`) — through `jobs::verdicts`, which re-checks the predicate in its
//! UPDATE, so a row that went online meanwhile is never failed and never rescued.

use molecule_domain::WorkspaceId;
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::sweeper::SweepArgs;
use molecule_jobs::{JobContext, verdicts};
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::time::Duration;

/// SPEC §5: MOLECULE_PROVISION_TIMEOUT_SECS defaults to 600.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// How long each runtime may provision.
#[derive(Clone, Debug)]
pub struct Timeouts {
    pub default: Duration,
    pub per_runtime: BTreeMap<String, Duration>,
}

impl Timeouts {
    pub fn uniform(default: Duration) -> Self {
        Timeouts { default, per_runtime: BTreeMap::new() }
    }

    pub fn of(&self, runtime: &str) -> Duration {
        self.per_runtime.get(runtime).copied().unwrap_or(self.default)
    }

    fn from_args(a: &SweepArgs) -> Self {
        Timeouts {
            default: a.timeout_s.map(Duration::from_secs).unwrap_or(DEFAULT_TIMEOUT),
            per_runtime: a.runtime_timeout_s.iter().map(|(k, v)| (k.clone(), Duration::from_secs(*v))).collect(),
        }
    }
}

/// What the workspace says once it timed out (no internal detail).
pub fn message(timeout: Duration) -> String {
    format!(
        "The workspace's agent did not register within {} s of its start. Its diagnostics were kept for support; \
         retry or contact your operator.",
        timeout.as_secs()
    )
}

/// Fails the workspaces provisioning for longer than their timeout: the ids that flipped.
pub async fn sweep(db: &PgPool, timeouts: &Timeouts, batch: i64) -> Result<Vec<WorkspaceId>, sqlx::Error> {
    let per_runtime: serde_json::Map<String, serde_json::Value> =
        timeouts.per_runtime.iter().map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_secs_f64()))).collect();
    let candidates: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "SELECT id, runtime FROM workspaces WHERE status = 'provisioning' \
           AND status_changed_at <= now() - make_interval(secs => COALESCE(($1::jsonb ->> runtime)::float8, $2)) \
         ORDER BY status_changed_at LIMIT $3",
    )
    .bind(serde_json::Value::Object(per_runtime))
    .bind(timeouts.default.as_secs_f64())
    .bind(batch)
    .fetch_all(db)
    .await?;
    let mut flipped = Vec::new();
    for (id, runtime) in candidates {
        let ws = WorkspaceId(id);
        let timeout = timeouts.of(&runtime);
        let mut tx = db.begin().await?;
        if let Some((org, rescue_job)) = verdicts::provision_timed_out(&mut tx, ws, timeout, &message(timeout)).await? {
            tx.commit().await?;
            tracing::info!(event = "sweep.provision_timeout", workspace_id = %ws, org_id = %org, rescue_job = %rescue_job,
                runtime, timeout_s = timeout.as_secs(), "provisioning timed out");
            flipped.push(ws);
        }
    }
    Ok(flipped)
}

pub async fn run(ctx: &JobContext, args: &SweepArgs) -> HandlerResult {
    let failed = sweep(&ctx.db, &Timeouts::from_args(args), super::BATCH).await.map_err(super::db)?;
    Ok(serde_json::json!({ "failed_workspaces": failed.iter().map(|w| w.to_string()).collect::<Vec<_>>() }))
}

#[cfg(test)]
mod tests {
    //! S1 against a real PostgreSQL: its predicate, re-checked in the verdict's UPDATE, and
    //! what it leaves on the workspace.
    use super::*;
    use molecule_domain::testing::fresh_db;

    async fn workspace(db: &PgPool, org: uuid::Uuid, status: &str, age_s: i64) -> uuid::Uuid {
        let id: uuid::Uuid = sqlx::query_scalar(
            "INSERT INTO workspaces (org_id, name, runtime, tier, status) VALUES ($1, 'w', 'echo', 3, $2::workspace_status) RETURNING id",
        )
        .bind(org)
        .bind(status)
        .fetch_one(db)
        .await
        .unwrap();
        // Backdate its entry into the status (the trigger sets it on status changes only).
        sqlx::query("UPDATE workspaces SET status_changed_at = now() - make_interval(secs => $2) WHERE id = $1")
            .bind(id)
            .bind(age_s as f64)
            .execute(db)
            .await
            .unwrap();
        id
    }

    async fn status(db: &PgPool, id: uuid::Uuid) -> (String, Option<String>) {
        sqlx::query_as("SELECT status::text, last_sample_error FROM workspaces WHERE id = $1").bind(id).fetch_one(db).await.unwrap()
    }

    async fn rescue_jobs(db: &PgPool, id: uuid::Uuid) -> Vec<serde_json::Value> {
        molecule_jobs::store::stats::payloads_of(db, molecule_jobs::JobKind::RescueCapture, WorkspaceId(id)).await.unwrap()
    }

    /// S1: an agent that never called → `failed`, a canned reason, an event and one rescue
    /// capture; young, online and removed rows are left alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn provision_timeout_fails_only_workspaces_provisioning_too_long() {
        let (db, _) = fresh_db().await;
        let org: uuid::Uuid =
            sqlx::query_scalar("INSERT INTO organizations (name) VALUES ('o') RETURNING id").fetch_one(&db).await.unwrap();
        let stuck = workspace(&db, org, "provisioning", 700).await;
        let young = workspace(&db, org, "provisioning", 30).await;
        let online = workspace(&db, org, "online", 700).await;
        let removed = workspace(&db, org, "removed", 700).await;
        let timeout = Duration::from_secs(600);

        let flipped = sweep(&db, &Timeouts::uniform(timeout), 100).await.unwrap();
        assert_eq!(flipped, vec![WorkspaceId(stuck)]);
        assert_eq!(status(&db, stuck).await, ("failed".into(), Some(message(timeout))));
        assert!(message(timeout).contains("did not register within 600 s"));
        for (id, want) in [(young, "provisioning"), (online, "online"), (removed, "removed")] {
            assert_eq!(status(&db, id).await.0, want);
            assert!(rescue_jobs(&db, id).await.is_empty());
        }
        let rescue = rescue_jobs(&db, stuck).await;
        assert_eq!(rescue.len(), 1);
        assert_eq!(rescue[0]["trigger"], "provision_timeout");
        let ev: Vec<(String, serde_json::Value)> =
            sqlx::query_as("SELECT event_type, payload FROM structure_events WHERE workspace_id = $1")
                .bind(stuck)
                .fetch_all(&db)
                .await
                .unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].0.as_str(), &ev[0].1["source"]), ("WORKSPACE_PROVISION_FAILED", &serde_json::json!("provision_timeout")));

        // A second sweep finds nothing more to do.
        assert!(sweep(&db, &Timeouts::uniform(timeout), 100).await.unwrap().is_empty());
        assert_eq!(rescue_jobs(&db, stuck).await.len(), 1);
    }

    /// The verdict re-checks the predicate: a row that went online, or was restarted
    /// (provisioning anew), after the sweep selected it is neither failed nor rescued.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn provision_timeout_leaves_rows_that_changed_after_selection() {
        let (db, _) = fresh_db().await;
        let org: uuid::Uuid =
            sqlx::query_scalar("INSERT INTO organizations (name) VALUES ('o') RETURNING id").fetch_one(&db).await.unwrap();
        let timeout = Duration::from_secs(600);
        let went_online = workspace(&db, org, "provisioning", 700).await;
        let restarted = workspace(&db, org, "provisioning", 700).await;
        // Between the sweep's SELECT and its UPDATE: one registers, one is restarted
        // (online → provisioning again, which the trigger stamps as a new entry).
        sqlx::query("UPDATE workspaces SET status = 'online' WHERE id = $1").bind(went_online).execute(&db).await.unwrap();
        sqlx::query("UPDATE workspaces SET status = 'online' WHERE id = $1").bind(restarted).execute(&db).await.unwrap();
        sqlx::query("UPDATE workspaces SET status = 'provisioning' WHERE id = $1").bind(restarted).execute(&db).await.unwrap();
        for id in [went_online, restarted] {
            let mut tx = db.begin().await.unwrap();
            let got = verdicts::provision_timed_out(&mut tx, WorkspaceId(id), timeout, "x").await.unwrap();
            tx.commit().await.unwrap();
            assert!(got.is_none(), "{id} must not flip");
            assert!(rescue_jobs(&db, id).await.is_empty());
        }
        assert_eq!(status(&db, went_online).await.0, "online");
        assert_eq!(status(&db, restarted).await.0, "provisioning");
        let age: f64 = sqlx::query_scalar("SELECT extract(epoch FROM now() - status_changed_at)::float8 FROM workspaces WHERE id = $1")
            .bind(restarted)
            .fetch_one(&db)
            .await
            .unwrap();
        assert!(age < 60.0, "a status change restamps status_changed_at: {age}");
    }

    /// Per-runtime timeouts replace the default for their runtime only.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_runtime_may_have_its_own_timeout() {
        let (db, _) = fresh_db().await;
        let org: uuid::Uuid =
            sqlx::query_scalar("INSERT INTO organizations (name) VALUES ('o') RETURNING id").fetch_one(&db).await.unwrap();
        let quick = workspace(&db, org, "provisioning", 120).await; // echo, 2 minutes in
        let slow: uuid::Uuid = sqlx::query_scalar(
            "INSERT INTO workspaces (org_id, name, runtime, tier, status) VALUES ($1, 'w', 'claude-code', 3, 'provisioning') RETURNING id",
        )
        .bind(org)
        .fetch_one(&db)
        .await
        .unwrap();
        sqlx::query("UPDATE workspaces SET status_changed_at = now() - interval '700 seconds' WHERE id = $1")
            .bind(slow)
            .execute(&db)
            .await
            .unwrap();
        let timeouts = Timeouts {
            default: Duration::from_secs(600),
            per_runtime: [("echo".to_string(), Duration::from_secs(60)), ("claude-code".to_string(), Duration::from_secs(900))].into(),
        };
        assert_eq!(sweep(&db, &timeouts, 100).await.unwrap(), vec![WorkspaceId(quick)]);
        assert_eq!(status(&db, quick).await, ("failed".into(), Some(message(Duration::from_secs(60)))));
        assert_eq!(status(&db, slow).await.0, "provisioning", "past the default, within its own");
    }
}
