//! The job core across real processes: SIGKILL, SIGTERM, a database that goes away, and
//! `serve` on the embedded default. Workers are the `testworker` binary of this crate;
//! `serve` is the `molecule` binary.

use chrono::{DateTime, Utc};
use molecule_domain::JobId;
use molecule_domain::embedded_pg::EmbeddedPostgres;
use molecule_jobs::status::{self, JobView};
use molecule_jobs::{JobStatus, NewJob, enqueue};
use molecule_tests::{Proc, TEST_RUNS_TABLE, eventually, free_port, fresh_db, fresh_db_on, http_get, temp_dir};
use serde_json::json;
use sqlx::PgPool;
use std::process::Command;
use std::time::{Duration, Instant};

fn testworker(url: &str, env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_testworker"));
    cmd.env("DATABASE_URL", url);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc::spawn(cmd, "testworker")
}

async fn push(db: &PgPool, payload: serde_json::Value, max_attempts: i32) -> JobId {
    let mut conn = db.acquire().await.unwrap();
    enqueue(&mut conn, &NewJob::to_queue("test", &payload).max_attempts(max_attempts)).await.unwrap()
}

async fn wait_for(db: &PgPool, id: &JobId, want: JobStatus, within: Duration) -> JobView {
    eventually(within, &format!("job {id} to be {want:?}"), || async {
        status::get(db, id).await.ok().flatten().filter(|v| v.status == want)
    })
    .await
}

async fn runs(db: &PgPool, id: &JobId) -> Vec<(i32, i32, DateTime<Utc>)> {
    sqlx::query_as("SELECT attempt, pid, started_at FROM test_runs WHERE job_id = $1 ORDER BY started_at")
        .bind(id.as_str())
        .fetch_all(db)
        .await
        .unwrap()
}

async fn setup() -> (PgPool, String) {
    let (db, url) = fresh_db().await;
    sqlx::query(TEST_RUNS_TABLE).execute(&db).await.unwrap();
    (db, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_survives_a_sigkill_between_attempts() {
    let (db, url) = setup().await;
    let base_ms = 1500;
    let env = [("TW_BASE_MS", "1500"), ("TW_POLL_MS", "200")];
    let mut w1 = testworker(&url, &env);
    let id = push(&db, json!({"fail_times": 2}), 5).await;
    // First attempt failed and its retry is scheduled: kill the worker now.
    wait_for(&db, &id, JobStatus::Retrying, Duration::from_secs(15)).await;
    w1.kill9();
    let _w2 = testworker(&url, &env);
    let v = wait_for(&db, &id, JobStatus::Succeeded, Duration::from_secs(30)).await;
    assert_eq!(v.attempts, 3);
    let r = runs(&db, &id).await;
    assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 2, 3]);
    assert_ne!(r[0].1, r[2].1, "the last attempt ran in the restarted process");
    let gap1 = (r[1].2 - r[0].2).num_milliseconds();
    let gap2 = (r[2].2 - r[1].2).num_milliseconds();
    assert!(gap1 >= base_ms, "first retry after {gap1} ms < base {base_ms} ms");
    assert!(gap2 > gap1, "backoff did not grow across the restart: {gap1} then {gap2} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_killed_mid_run_is_run_again_elsewhere_after_the_lease() {
    let (db, url) = setup().await;
    let env = [("TW_LEASE_MS", "2000"), ("TW_POLL_MS", "200")];
    let mut w1 = testworker(&url, &env);
    let long = push(&db, json!({"sleep_first_ms": 60000}), 5).await;
    eventually(Duration::from_secs(15), "the long job to start", || async { (!runs(&db, &long).await.is_empty()).then_some(()) }).await;
    // Other work queued behind it must not be lost either.
    let mut others = Vec::new();
    for i in 0..40 {
        others.push(push(&db, json!({"i": i}), 5).await);
    }
    let killed_at = Instant::now();
    w1.kill9();
    let _w2 = testworker(&url, &env);
    let v = wait_for(&db, &long, JobStatus::Succeeded, Duration::from_secs(30)).await;
    let recovered_after = killed_at.elapsed();
    for id in &others {
        wait_for(&db, id, JobStatus::Succeeded, Duration::from_secs(20)).await;
    }
    let r = runs(&db, &long).await;
    assert_eq!(r.len(), 2, "exactly one re-run: {r:?}");
    assert_ne!(r[0].1, r[1].1, "re-run by another process");
    assert_eq!(v.attempts, 2);
    assert!(v.attempt_log[0]["error"].as_str().unwrap().starts_with("worker_lost: "));
    assert!(v.attempt_log[0].get("worker").is_none(), "no worker id (host, pid) in a tenant's view");
    assert!(recovered_after >= Duration::from_millis(1500), "re-run before the lease ran out ({recovered_after:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_jobs_finish_and_exits_zero() {
    let (db, url) = setup().await;
    let mut w = testworker(&url, &[("TW_GRACE_MS", "15000"), ("TW_CONCURRENCY", "4")]);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(push(&db, json!({"sleep_ms": 2000}), 1).await);
    }
    eventually(Duration::from_secs(15), "all three jobs to start", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM test_runs").fetch_one(&db).await.unwrap();
        (n == 3).then_some(())
    })
    .await;
    w.signal(libc::SIGTERM);
    let st = w.wait_exit(Duration::from_secs(15)).expect("worker exits after SIGTERM");
    assert_eq!(st.code(), Some(0), "exit status {st:?}");
    for id in &ids {
        let v = status::get(&db, id).await.unwrap().unwrap();
        assert_eq!(v.status, JobStatus::Succeeded, "job {id} did not finish within the grace period");
        assert_eq!(v.attempts, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_grace_period_hands_unfinished_jobs_back() {
    let (db, url) = setup().await;
    let mut w = testworker(&url, &[("TW_GRACE_MS", "500")]);
    let id = push(&db, json!({"sleep_ms": 3000}), 3).await;
    eventually(Duration::from_secs(15), "the job to start", || async { (!runs(&db, &id).await.is_empty()).then_some(()) }).await;
    w.signal(libc::SIGTERM);
    let st = w.wait_exit(Duration::from_secs(10)).expect("worker exits after SIGTERM");
    assert_eq!(st.code(), Some(0));
    let v = status::get(&db, &id).await.unwrap().unwrap();
    assert_eq!(v.status, JobStatus::Pending, "released, not lost");
    assert_eq!(v.attempts, 0, "the interrupted attempt does not count");
    // And the next worker runs it.
    let _w2 = testworker(&url, &[]);
    wait_for(&db, &id, JobStatus::Succeeded, Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_recover_by_themselves_when_postgres_stops_for_ten_seconds() {
    // Its own cluster: this test stops it.
    let dir = temp_dir("bounce");
    let mut pg = start_embedded(&dir).await.unwrap();
    let (db, url) = fresh_db_on(&pg.database_url()).await;
    sqlx::query(TEST_RUNS_TABLE).execute(&db).await.unwrap();
    let mut w = testworker(&url, &[("TW_CONCURRENCY", "4"), ("TW_POLL_MS", "200")]);
    let mut ids = Vec::new();
    for i in 0..200 {
        ids.push(push(&db, json!({"i": i, "sleep_ms": 100}), 10).await);
    }
    eventually(Duration::from_secs(15), "work to be under way", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM test_runs").fetch_one(&db).await.unwrap();
        (n >= 4).then_some(())
    })
    .await;
    db.close().await;
    let mut pg = tokio::task::spawn_blocking(move || {
        pg.stop();
        std::thread::sleep(Duration::from_secs(10));
        pg.start_again().unwrap();
        pg
    })
    .await
    .unwrap();
    assert!(w.child.try_wait().unwrap().is_none(), "the worker died while the database was down");
    let db = molecule_domain::db::connect(&url, 4).await.unwrap();
    for id in &ids {
        wait_for(&db, id, JobStatus::Succeeded, Duration::from_secs(60)).await;
    }
    assert!(w.child.try_wait().unwrap().is_none(), "the worker is still running");
    w.signal(libc::SIGTERM);
    assert_eq!(w.wait_exit(Duration::from_secs(15)).and_then(|s| s.code()), Some(0));
    db.close().await;
    tokio::task::spawn_blocking(move || pg.stop()).await.unwrap();
}

fn serve(dir: &std::path::Path, port: u16) -> Proc {
    let mut cmd = Command::new(molecule_tests::bin_path("molecule"));
    cmd.current_dir(dir)
        .env_remove("DATABASE_URL")
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("MOLECULE_SHUTDOWN_GRACE_SECS", "5");
    Proc::spawn(cmd, "serve")
}

async fn ready_within(addr: &str, within: Duration) -> Duration {
    let t0 = Instant::now();
    eventually(within, "GET /readyz = 200", || async { matches!(http_get(addr, "/readyz").await, Ok((200, _))).then_some(()) }).await;
    t0.elapsed()
}

/// URL of the embedded cluster a `serve` in `dir` runs (port from postmaster.pid).
fn embedded_url(dir: &std::path::Path) -> String {
    let pw = std::fs::read_to_string(dir.join(".molecule/pg.password")).unwrap();
    let pid = std::fs::read_to_string(dir.join(".molecule/pg/postmaster.pid")).unwrap();
    let port = pid.lines().nth(3).unwrap().trim();
    format!("postgres://postgres:{}@127.0.0.1:{port}/postgres", pw.trim())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_database_url_runs_on_its_own_postgres_and_keeps_data() {
    let dir = temp_dir("serve");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");

    let mut s1 = serve(&dir, port);
    let took = ready_within(&addr, Duration::from_secs(30)).await;
    eprintln!("first start ready in {took:?}");
    assert_eq!(http_get(&addr, "/healthz").await.unwrap().0, 200);
    let db = molecule_domain::db::connect(&embedded_url(&dir), 2).await.unwrap();
    sqlx::query("INSERT INTO organizations (name) VALUES ('kept-across-restarts')").execute(&db).await.unwrap();
    db.close().await;
    s1.signal(libc::SIGTERM);
    assert_eq!(s1.wait_exit(Duration::from_secs(30)).and_then(|s| s.code()), Some(0));
    assert!(!dir.join(".molecule/pg/postmaster.pid").exists(), "serve stopped its PostgreSQL on exit");

    let mut s2 = serve(&dir, port);
    let took = ready_within(&addr, Duration::from_secs(30)).await;
    eprintln!("second start ready in {took:?}");
    let db = molecule_domain::db::connect(&embedded_url(&dir), 2).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM organizations WHERE name = 'kept-across-restarts'").fetch_one(&db).await.unwrap();
    assert_eq!(n, 1, "data kept across restarts");
    db.close().await;
    s2.signal(libc::SIGTERM);
    assert_eq!(s2.wait_exit(Duration::from_secs(30)).and_then(|s| s.code()), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_cli_prints_tokens_once_and_no_token_reaches_the_logs() {
    let (db, url) = fresh_db().await;
    let bin = molecule_tests::bin_path("molecule");
    let out = Command::new(&bin).args(["org", "create", "acme", "--json"]).env("DATABASE_URL", &url).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["org_id", "token"], "exactly org_id and token");
    let org_id = v["org_id"].as_str().unwrap().to_string();
    let token = v["token"].as_str().unwrap().to_string();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM org_tokens WHERE org_id = $1::uuid AND token_sha256 = sha256($2::bytea)")
        .bind(&org_id)
        .bind(token.as_bytes())
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(stored, 1, "stored as its sha256 only");
    let plain: i64 = sqlx::query_scalar("SELECT count(*) FROM org_tokens WHERE position($1::bytea in token_sha256) > 0")
        .bind(token.as_bytes())
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(plain, 0);

    let out = Command::new(&bin).args(["org", "token", "create", &org_id, "--json"]).env("DATABASE_URL", &url).output().unwrap();
    assert!(out.status.success());
    let second: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let second_token = second["token"].as_str().unwrap().to_string();

    // serve (API only on the test database), JSON logs captured.
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let log = temp_dir("logs").join("api.log");
    let mut cmd = Command::new(&bin);
    cmd.args(["api"]).env("DATABASE_URL", &url).env("LISTEN_ADDR", &addr).env("RUST_LOG", "debug");
    cmd.stderr(std::fs::File::create(&log).unwrap()).stdout(std::process::Stdio::null());
    let mut api = Proc { child: cmd.spawn().unwrap(), name: "api".into(), log: log.clone() };
    ready_within(&addr, Duration::from_secs(30)).await;
    let auth = |t: String| {
        let addr = addr.clone();
        async move { molecule_tests::http(&addr, "GET", "/workspaces", Some(&t), None, None).await }
    };
    assert_eq!(auth(token.clone()).await.status, 200);
    assert_eq!(auth(second_token.clone()).await.status, 200);
    assert_eq!(auth("mol_org_0123456789abcdef".into()).await.status, 401);

    let out = Command::new(&bin)
        .args(["org", "token", "revoke", &org_id, second["token_id"].as_str().unwrap()])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(auth(second_token.clone()).await.status, 401, "a revoked token stops working at once");
    assert_eq!(auth(token.clone()).await.status, 200);

    api.signal(libc::SIGTERM);
    assert_eq!(api.wait_exit(Duration::from_secs(15)).and_then(|s| s.code()), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("\"request_id\""), "request ids are logged");
    for secret in [&token, &second_token] {
        let hexpart = &secret[secret.len() - 64..];
        assert!(!text.contains(&hexpart[..12]), "a token (or part of one) reached the log");
    }
    assert!(!text.contains("mol_org_0123456789abcdef"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_startup_still_stops_cleanly() {
    let dir = temp_dir("early-term");
    let mut s = serve(&dir, free_port());
    // The embedded cluster is up but serve is still starting its roles.
    eventually(Duration::from_secs(30), "the embedded cluster to start", || async {
        dir.join(".molecule/pg/postmaster.pid").exists().then_some(())
    })
    .await;
    s.signal(libc::SIGTERM);
    let st = s.wait_exit(Duration::from_secs(30)).expect("serve exits after an early SIGTERM");
    assert_eq!(st.code(), Some(0), "a graceful exit, not death by signal: {st:?}");
    assert!(!dir.join(".molecule/pg/postmaster.pid").exists(), "and it stopped its PostgreSQL");
}

/// `serve` and `molecule org create` started together on one data directory (README: the
/// second runs "in another shell in the same directory") get one cluster, and it runs
/// until the last of them stops. Before start.lock/users.lock both ran initdb and pg_ctl,
/// and the first to finish stopped the cluster under the other (`serve` then exited with
/// "cannot connect to PostgreSQL"). Two threads stand in for the two processes: the
/// locks are per open file, as between processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_starting_one_embedded_cluster_together_share_it_until_the_last_stops() {
    let dir = temp_dir("shared-cluster");
    let (a, b) = tokio::task::spawn_blocking({
        let (d1, d2) = (dir.clone(), dir.clone());
        move || {
            let t1 = std::thread::spawn(move || EmbeddedPostgres::start(&d1));
            let t2 = std::thread::spawn(move || EmbeddedPostgres::start(&d2));
            (t1.join().unwrap(), t2.join().unwrap())
        }
    })
    .await
    .unwrap();
    let (a, b) = (a.expect("the first start"), b.expect("the second start"));
    assert_eq!(a.port(), b.port(), "one cluster");
    assert_eq!(u8::from(a.adopted()) + u8::from(b.adopted()), 1, "one started it, the other adopted it");
    let (mut starter, mut adopter) = if a.adopted() { (b, a) } else { (a, b) };
    let (url, port) = (adopter.database_url(), adopter.port());

    tokio::task::spawn_blocking(move || starter.stop()).await.unwrap();
    assert_answers(&url, "the cluster outlives its starter while another user remains").await;

    tokio::task::spawn_blocking(move || adopter.stop()).await.unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "the last user's stop stops the cluster");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A start that fails on a cluster another process runs (here: its password file cannot
/// be read) leaves that cluster alone; before, dropping the failed handle stopped it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_does_not_stop_a_cluster_another_process_uses() {
    let dir = temp_dir("failed-start");
    let mut running = start_embedded(&dir).await.expect("the first start");
    let pw = running.data_dir().with_file_name("pg.password");
    let kept = pw.with_file_name("pg.password.kept");
    std::fs::rename(&pw, &kept).unwrap();
    std::fs::create_dir(&pw).unwrap();
    let second = start_embedded(&dir).await.map(|_| ());
    assert!(second.is_err(), "a password file that is a directory cannot be read");
    assert_answers(&running.database_url(), "the running cluster is untouched").await;
    std::fs::remove_dir(&pw).unwrap();
    std::fs::rename(&kept, &pw).unwrap();
    tokio::task::spawn_blocking(move || running.stop()).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A second `serve` started in the same directory (its port taken by the first) exits
/// with an error and leaves the first one's PostgreSQL running: it had adopted the
/// cluster, and before users.lock every serve stopped its cluster on exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_in_the_same_directory_fails_without_stopping_the_first_ones_postgres() {
    let dir = temp_dir("second-serve");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut first = serve(&dir, port);
    ready_within(&addr, Duration::from_secs(30)).await;

    let mut second = serve(&dir, port);
    let st = second.wait_exit(Duration::from_secs(60)).expect("the second serve exits: its port is taken");
    assert_ne!(st.code(), Some(0), "{st:?}");

    let db = molecule_domain::db::connect(&embedded_url(&dir), 2).await.expect("the first serve's PostgreSQL still runs");
    sqlx::query("INSERT INTO organizations (name) VALUES ('after-the-second-serve')").execute(&db).await.unwrap();
    db.close().await;
    assert_eq!(http_get(&addr, "/readyz").await.unwrap().0, 200, "and the first serve is still ready");

    first.signal(libc::SIGTERM);
    assert_eq!(first.wait_exit(Duration::from_secs(30)).and_then(|s| s.code()), Some(0));
    assert!(!dir.join(".molecule/pg/postmaster.pid").exists(), "the last user stopped it");
    let _ = std::fs::remove_dir_all(&dir);
}

/// [`EmbeddedPostgres::start`] off the async threads (it waits for initdb and pg_ctl).
async fn start_embedded(dir: &std::path::Path) -> Result<EmbeddedPostgres, molecule_domain::embedded_pg::EmbeddedPgError> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&dir)).await.unwrap()
}

/// The cluster at `url` takes a connection and answers a query.
async fn assert_answers(url: &str, what: &str) {
    let db = molecule_domain::db::connect(url, 1).await.expect(what);
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&db).await.unwrap();
    assert_eq!(one, 1, "{what}");
    db.close().await;
}
