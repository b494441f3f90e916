//! Sweepers against a real PostgreSQL (SPEC §5): their predicates, re-checked in their
//! UPDATEs, and what they leave on the workspace.

use molecule_domain::WorkspaceId;
use molecule_jobs::verdicts;
use molecule_tests::fresh_db;
use molecule_workers::sweeps::provision_timeout;
use sqlx::PgPool;
use std::time::Duration;

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
    let rows: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT job FROM apalis.jobs WHERE job_type = 'rescue_capture' AND workspace_id = $1")
            .bind(id)
            .fetch_all(db)
            .await
            .unwrap();
    rows.iter().map(|b| serde_json::from_slice(b).unwrap()).collect()
}

/// S1: an agent that never called → `failed`, a canned reason, an event and one rescue
/// capture; young, online and removed rows are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_timeout_fails_only_workspaces_provisioning_too_long() {
    let (db, _) = fresh_db().await;
    let org: uuid::Uuid = sqlx::query_scalar("INSERT INTO organizations (name) VALUES ('o') RETURNING id").fetch_one(&db).await.unwrap();
    let stuck = workspace(&db, org, "provisioning", 700).await;
    let young = workspace(&db, org, "provisioning", 30).await;
    let online = workspace(&db, org, "online", 700).await;
    let removed = workspace(&db, org, "removed", 700).await;
    let timeout = Duration::from_secs(600);

    let flipped = provision_timeout::sweep(&db, timeout, 100).await.unwrap();
    assert_eq!(flipped, vec![WorkspaceId(stuck)]);
    assert_eq!(status(&db, stuck).await, ("failed".into(), Some(provision_timeout::message(timeout))));
    assert!(provision_timeout::message(timeout).contains("did not register within 600 s"));
    for (id, want) in [(young, "provisioning"), (online, "online"), (removed, "removed")] {
        assert_eq!(status(&db, id).await.0, want);
        assert!(rescue_jobs(&db, id).await.is_empty());
    }
    let rescue = rescue_jobs(&db, stuck).await;
    assert_eq!(rescue.len(), 1);
    assert_eq!(rescue[0]["trigger"], "provision_timeout");
    let ev: Vec<(String, serde_json::Value)> =
        sqlx::query_as("SELECT event_type, payload FROM structure_events WHERE workspace_id = $1").bind(stuck).fetch_all(&db).await.unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!((ev[0].0.as_str(), &ev[0].1["source"]), ("WORKSPACE_PROVISION_FAILED", &serde_json::json!("provision_timeout")));

    // A second sweep finds nothing more to do.
    assert!(provision_timeout::sweep(&db, timeout, 100).await.unwrap().is_empty());
    assert_eq!(rescue_jobs(&db, stuck).await.len(), 1);
}

/// The verdict re-checks the predicate: a row that went online, or was restarted
/// (provisioning anew), after the sweep selected it is neither failed nor rescued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_timeout_leaves_rows_that_changed_after_selection() {
    let (db, _) = fresh_db().await;
    let org: uuid::Uuid = sqlx::query_scalar("INSERT INTO organizations (name) VALUES ('o') RETURNING id").fetch_one(&db).await.unwrap();
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
