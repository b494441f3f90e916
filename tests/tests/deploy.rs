//! The deployment files (infra/, issue 14): the Kubernetes manifests, the compose file and
//! the Dockerfile pass the offline validator (infra/k8s/validate.py: Kubernetes' and KEDA's
//! schemas, strict), every job queue has its pool, and each pool's KEDA trigger query,
//! run against a real database, returns exactly that pool's depth — the jobs its claim
//! would take right now.

use molecule_jobs::store::{self, Ack};
use molecule_jobs::{JobKind, JobState, NewJob, Outcome, enqueue};
use molecule_tests::{bin_path, fresh_db};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

#[derive(Deserialize, Debug, Clone)]
struct PoolManifest {
    pool: String,
    deployment: String,
    scaled_object: String,
    /// The ScaledObject's `depth` trigger query (what the claim would take now).
    query: String,
    /// Its `load` trigger query: depth plus the jobs running.
    load_query: String,
    target_query_value: f64,
}

#[derive(Deserialize, Debug)]
struct Report {
    kubernetes_version: String,
    commands_checked: usize,
    pools: Vec<PoolManifest>,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The validator's Python: the virtualenv tests/run.sh creates (MOLECULE_INFRA_VENV
/// overrides where). Missing is a failure, not a skip.
fn python() -> PathBuf {
    let venv = std::env::var_os("MOLECULE_INFRA_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/molecule-infra"));
    let py = venv.join("bin/python");
    assert!(
        py.exists(),
        "{} does not exist: run tests/run.sh, which creates the deployment validator's virtualenv \
         (kubernetes-validate) there",
        py.display()
    );
    py
}

/// Runs infra/k8s/validate.py once per test binary: every manifest against the schemas,
/// and every command line in them parsed by the real `molecule` binary.
fn report() -> &'static Report {
    static REPORT: OnceLock<Report> = OnceLock::new();
    REPORT.get_or_init(|| {
        let out = Command::new(python())
            .arg(repo().join("infra/k8s/validate.py"))
            .arg("--json")
            .arg("--molecule")
            .arg(bin_path("molecule"))
            .output()
            .expect("run infra/k8s/validate.py");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "infra/k8s/validate.py failed ({}):\n{stderr}{stdout}", out.status);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("validate.py --json printed no report ({e}):\n{stdout}"))
    })
}

#[test]
fn manifests_validate_and_every_queue_has_its_pool() {
    let r = report();
    assert!(!r.kubernetes_version.is_empty());
    // The api, scheduler, migrate and every pool's container, and compose's two.
    assert!(r.commands_checked >= 3 + JobKind::ALL.len(), "only {} command lines checked", r.commands_checked);
    let in_manifests: BTreeSet<&str> = r.pools.iter().map(|p| p.pool.as_str()).collect();
    let queues: BTreeSet<&str> = JobKind::ALL.iter().map(|k| k.queue()).collect();
    assert_eq!(
        in_manifests, queues,
        "infra/k8s has a worker Deployment and ScaledObject per pool; a new queue needs its pool-<queue>.yaml"
    );
    for p in &r.pools {
        assert!(p.target_query_value > 0.0, "{}: targetQueryValue", p.scaled_object);
        assert!(p.deployment.starts_with("molecule-worker-"), "{}", p.deployment);
    }
}

async fn push(db: &PgPool, job: NewJob) -> String {
    let mut conn = db.acquire().await.unwrap();
    enqueue(&mut conn, &job).await.unwrap().as_str().to_string()
}

fn job(kind: JobKind) -> NewJob {
    NewJob::new(kind, &json!({"deploy_test": true}))
}

/// Claims `n` jobs of `kind` with the runtime's own claim (they are `Running` after it).
async fn claim(db: &PgPool, kind: JobKind, n: i64) -> Vec<store::Claimed> {
    let got = store::claim_each_shard(db, kind.queue(), n, "deploy-test@localhost:1#t").await.unwrap();
    assert_eq!(got.len() as i64, n, "claimed {kind} jobs");
    got
}

/// Acks a claimed job with the runtime's own ack.
async fn ack(db: &PgPool, c: &store::Claimed, state: JobState, outcome: Option<Outcome>, delay_ms: i64) {
    let error = (state != JobState::Done).then(|| "deploy test".to_string());
    let a = Ack {
        id: c.id.clone(),
        fence: c.fence,
        state,
        outcome,
        delay_ms,
        error: error.clone(),
        error_detail: error,
        result: None,
        batch: c.batch,
        tid: Some(c.tid.clone()),
    };
    let w = store::write_acks(db, &[a], &[]).await.unwrap();
    assert_eq!(w.stale, vec![], "ack applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pools_keda_query_returns_its_own_depth() {
    let pools = report().pools.clone();
    let (db, _) = fresh_db().await;
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let earlier = chrono::Utc::now() - chrono::Duration::seconds(5);

    // provision: 7 due, and beside them one running, one done, one due in an hour.
    for _ in 0..9 {
        push(&db, job(JobKind::Provision)).await;
    }
    let claimed = claim(&db, JobKind::Provision, 2).await;
    ack(&db, &claimed[0], JobState::Done, Some(Outcome::Succeeded), 0).await;
    push(&db, job(JobKind::Provision).run_at(later)).await;
    // exec: 3 due, and one dead.
    for _ in 0..4 {
        push(&db, job(JobKind::Exec)).await;
    }
    let claimed = claim(&db, JobKind::Exec, 1).await;
    ack(&db, &claimed[0], JobState::Killed, Some(Outcome::Dead), 0).await;
    // stop: a failed attempt due for its retry now counts (the claim takes it); one whose
    // retry is an hour away does not.
    for _ in 0..2 {
        push(&db, job(JobKind::Stop)).await;
    }
    let claimed = claim(&db, JobKind::Stop, 2).await;
    ack(&db, &claimed[0], JobState::Failed, None, 0).await;
    ack(&db, &claimed[1], JobState::Failed, None, 3_600_000).await;
    // a2a_dispatch: one of its 4 is past its expires_at: still claimed (and ended `expired`).
    for _ in 0..3 {
        push(&db, job(JobKind::A2aDispatch)).await;
    }
    push(&db, job(JobKind::A2aDispatch).expires_at(earlier)).await;
    for (kind, n) in [(JobKind::Restart, 2), (JobKind::Sweep, 5), (JobKind::RescueCapture, 6)] {
        for _ in 0..n {
            push(&db, job(kind)).await;
        }
    }
    // console: only a job due in an hour. And a queue no pool serves.
    push(&db, job(JobKind::Console).run_at(later)).await;
    for _ in 0..3 {
        push(&db, NewJob::to_queue("not_a_pool", &json!({}))).await;
    }

    // Distinct depths, so a query that reads another pool's queue cannot pass.
    let expected: HashMap<&str, i64> = [
        ("provision", 7),
        ("exec", 3),
        ("stop", 1),
        ("restart", 2),
        ("a2a_dispatch", 4),
        ("sweep", 5),
        ("rescue_capture", 6),
        ("console", 0),
    ]
    .into_iter()
    .collect();

    let mut depth = HashMap::new();
    for p in &pools {
        let got: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(p.query.clone()))
            .fetch_one(&db)
            .await
            .unwrap_or_else(|e| panic!("{}'s KEDA query fails: {e}\n{}", p.scaled_object, p.query));
        let want = expected.get(p.pool.as_str()).copied().unwrap_or(0);
        assert_eq!(got, want, "{}'s KEDA query returned {got} for pool {}, not its depth {want}:\n{}", p.scaled_object, p.pool, p.query);
        depth.insert(p.pool.clone(), got);
    }
    assert_eq!(depth.get("provision"), Some(&7));
    assert_eq!(depth.get("exec"), Some(&3));

    // The load trigger adds the running jobs (provision: the one claimed and not acked).
    let running: HashMap<&str, i64> = [("provision", 1)].into_iter().collect();
    for p in &pools {
        let got: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(p.load_query.clone()))
            .fetch_one(&db)
            .await
            .unwrap_or_else(|e| panic!("{}'s load query fails: {e}\n{}", p.scaled_object, p.load_query));
        let want = depth[&p.pool] + running.get(p.pool.as_str()).copied().unwrap_or(0);
        assert_eq!(got, want, "{}'s load query returned {got} for pool {}, not depth + running = {want}", p.scaled_object, p.pool);
    }

    // And that depth is exactly what the pool's claim takes right now.
    for p in &pools {
        let took = store::claim_each_shard(&db, &p.pool, 10_000, "deploy-test@localhost:1#check").await.unwrap();
        assert_eq!(
            took.len() as i64,
            depth[&p.pool],
            "pool {}: its claim took {} jobs, its KEDA depth said {}",
            p.pool,
            took.len(),
            depth[&p.pool]
        );
    }
}
