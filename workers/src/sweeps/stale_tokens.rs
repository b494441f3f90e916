//! S3 stale tokens: live tokens of workspaces whose instance is not running are revoked
//! (a stopped container's token must not outlive it) — but only tokens older than the
//! grace, and never of `removed`, `provisioning` or `external` workspaces.
//!
//! Seed 004's lesson: a restart stops the container and mints a new token a moment later.
//! A sweep that selected the workspace while it had no container and then revoked "every
//! live token" took the fresh one with it — an agent started with a revoked token, 401
//! forever. So the staleness predicate is in the UPDATE as well as in the SELECT: a token
//! minted after the selection is younger than the grace and cannot match. "No instance
//! running at all" is the case this sweep exists for; a backend that cannot be listed
//! ends the sweep without revoking anything, and with no backend it does nothing.

use molecule_jobs::JobContext;
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::sweeper::SweepArgs;
use std::collections::HashSet;
use std::time::Duration;

use crate::Deps;

pub const DEFAULT_GRACE: Duration = Duration::from_secs(300);

/// The one staleness predicate, over `workspace_auth_tokens t` joined to `workspaces w`,
/// with the grace in seconds as `$1`.
macro_rules! stale {
    () => {
        "t.revoked_at IS NULL AND t.created_at < now() - make_interval(secs => $1) \
         AND w.status NOT IN ('removed', 'provisioning') AND w.runtime <> 'external'"
    };
}

/// Revokes stale tokens of workspaces not in `running`; returns (workspace, tokens revoked).
pub async fn sweep(
    db: &sqlx::PgPool,
    running: &HashSet<uuid::Uuid>,
    grace: Duration,
    batch: i64,
) -> Result<Vec<(uuid::Uuid, u64)>, sqlx::Error> {
    // The running ones are left out in the query, so a batch is never filled with them.
    let running: Vec<uuid::Uuid> = running.iter().copied().collect();
    let candidates: Vec<uuid::Uuid> = sqlx::query_scalar(concat!(
        "SELECT DISTINCT t.workspace_id FROM workspace_auth_tokens t JOIN workspaces w ON w.id = t.workspace_id WHERE ",
        stale!(),
        " AND NOT (t.workspace_id = ANY($3)) ORDER BY t.workspace_id LIMIT $2"
    ))
    .bind(grace.as_secs_f64())
    .bind(batch)
    .bind(&running)
    .fetch_all(db)
    .await?;
    let mut revoked = Vec::new();
    for ws in candidates {
        let n = sqlx::query(concat!(
            "UPDATE workspace_auth_tokens t SET revoked_at = now() FROM workspaces w \
             WHERE w.id = t.workspace_id AND t.workspace_id = $2 AND ",
            stale!()
        ))
        .bind(grace.as_secs_f64())
        .bind(ws)
        .execute(db)
        .await?
        .rows_affected();
        if n > 0 {
            tracing::info!(event = "sweep.stale_tokens", workspace_id = %ws, revoked = n, "revoked stale tokens of a workspace with no running instance");
            revoked.push((ws, n));
        }
    }
    Ok(revoked)
}

pub async fn run(d: &Deps, _ctx: &JobContext, args: &SweepArgs) -> HandlerResult {
    let Some(running) = super::running_workspaces(d).await? else {
        return Ok(serde_json::json!({ "skipped": "no backend" }));
    };
    let grace = args.grace_s.map(Duration::from_secs).unwrap_or(DEFAULT_GRACE);
    let revoked = sweep(&d.db, &running, grace, super::BATCH).await.map_err(super::db)?;
    Ok(serde_json::json!({ "workspaces": revoked.len(), "tokens": revoked.iter().map(|(_, n)| n).sum::<u64>() }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use molecule_domain::testing::fresh_db;
    use molecule_domain::{WorkspaceId, tokens};

    async fn workspace(db: &sqlx::PgPool, org: uuid::Uuid, status: &str, runtime: &str) -> uuid::Uuid {
        sqlx::query_scalar(
            "INSERT INTO workspaces (org_id, name, runtime, tier, status) VALUES ($1, 'w', $3, 2, $2::workspace_status) RETURNING id",
        )
        .bind(org)
        .bind(status)
        .bind(runtime)
        .fetch_one(db)
        .await
        .unwrap()
    }

    async fn live(db: &sqlx::PgPool, ws: uuid::Uuid) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM workspace_auth_tokens WHERE workspace_id = $1 AND revoked_at IS NULL")
            .bind(ws)
            .fetch_one(db)
            .await
            .unwrap()
    }

    /// Seed 004 against a real PostgreSQL: the predicate in the UPDATE spares a token
    /// minted after the selection; running, removed, provisioning and external
    /// workspaces keep theirs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_stale_tokens_of_stopped_workspaces_are_revoked() {
        let (db, _) = fresh_db().await;
        let org: uuid::Uuid =
            sqlx::query_scalar("INSERT INTO organizations (name) VALUES ('o') RETURNING id").fetch_one(&db).await.unwrap();
        let stopped = workspace(&db, org, "online", "echo").await;
        let restarting = workspace(&db, org, "offline", "echo").await;
        let running = workspace(&db, org, "online", "echo").await;
        let removed = workspace(&db, org, "removed", "echo").await;
        let provisioning = workspace(&db, org, "provisioning", "echo").await;
        let external = workspace(&db, org, "online", "external").await;
        let mut c = db.acquire().await.unwrap();
        for ws in [stopped, restarting, running, removed, provisioning, external] {
            tokens::create_workspace_token(&mut c, WorkspaceId(ws)).await.unwrap();
        }
        sqlx::query("UPDATE workspace_auth_tokens SET created_at = now() - interval '10 minutes'").execute(&db).await.unwrap();
        // The restart mints its new token a second ago, after a sweep would have selected it.
        tokens::create_workspace_token(&mut c, WorkspaceId(restarting)).await.unwrap();
        sqlx::query(
            "UPDATE workspace_auth_tokens SET created_at = now() - interval '1 second' WHERE workspace_id = $1 AND revoked_at IS NULL \
                     AND created_at > now() - interval '1 minute'",
        )
        .bind(restarting)
        .execute(&db)
        .await
        .unwrap();

        let running_set = HashSet::from([running]);
        let revoked = sweep(&db, &running_set, DEFAULT_GRACE, 100).await.unwrap();
        let mut got: Vec<(uuid::Uuid, u64)> = revoked;
        got.sort();
        let mut want = vec![(stopped, 1), (restarting, 1)];
        want.sort();
        assert_eq!(got, want);
        assert_eq!(live(&db, stopped).await, 0);
        assert_eq!(live(&db, restarting).await, 1, "the fresh token survives");
        for ws in [running, removed, provisioning, external] {
            assert_eq!(live(&db, ws).await, 1, "{ws} keeps its token");
        }
        assert!(sweep(&db, &running_set, DEFAULT_GRACE, 100).await.unwrap().is_empty());
    }

    /// S3: with no backend wired the sweep does nothing; with an engine that cannot be
    /// listed it fails retryably. Either way no token is revoked: "nothing runs" is never
    /// assumed from a list it did not get.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_token_is_revoked_without_a_list_of_what_runs() {
        let (db, _) = fresh_db().await;
        let org: uuid::Uuid =
            sqlx::query_scalar("INSERT INTO organizations (name) VALUES ('o') RETURNING id").fetch_one(&db).await.unwrap();
        let stopped = workspace(&db, org, "offline", "echo").await;
        let mut c = db.acquire().await.unwrap();
        tokens::create_workspace_token(&mut c, WorkspaceId(stopped)).await.unwrap();
        sqlx::query("UPDATE workspace_auth_tokens SET created_at = now() - interval '1 hour'").execute(&mut *c).await.unwrap();
        let ctx = molecule_jobs::JobContext::outside_queue(db.clone(), "sweep");
        let args = SweepArgs::new(molecule_jobs::sweeper::Sweeper::StaleTokens);
        let none = Deps::minimal(db.clone(), std::sync::Arc::new(molecule_backends::NoBackend)).unwrap();
        assert_eq!(run(&none, &ctx, &args).await.unwrap()["skipped"], "no backend");
        let down = Deps::minimal(db.clone(), std::sync::Arc::new(crate::sweeps::Unlistable)).unwrap();
        let out = run(&down, &ctx, &args).await;
        assert!(matches!(&out, Err(molecule_jobs::JobError::Retryable(f)) if f.code == "sweep"), "{out:?}");
        assert_eq!(live(&db, stopped).await, 1);
        // The same token, with a list that shows nothing running: revoked (the check bites).
        let revoked = sweep(&db, &Default::default(), Duration::from_secs(300), 100).await.unwrap();
        assert_eq!((revoked.len(), live(&db, stopped).await), (1, 0));
    }
}
