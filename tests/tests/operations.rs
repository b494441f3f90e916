//! Operators' views (issue 14, A16): `/metrics` and `/dashboard`, against a real
//! PostgreSQL, a real `molecule api` process, and a headless Chromium.

use molecule_domain::tokens;
use molecule_jobs::{JobError, JobKind, JobStatus, NewJob, PoolSpec, RetryPolicy, Runtime, RuntimeConfig, enqueue, handler_fn};
use molecule_tests::webdriver::Browser;
use molecule_tests::{Proc, bin_path, eventually, free_port, fresh_db, http, http_full, http_get, start_api};
use serde_json::json;
use sqlx::PgPool;
use std::process::Command;
use std::time::Duration;

const ADMIN: &str = "admin-token-for-the-operations-tests";

/// The value of one series of a Prometheus text exposition, by its exact name and labels
/// as rendered (`name{a="x",b="y"}`).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

async fn push_many(db: &PgPool, kind: JobKind, n: usize) {
    let mut conn = db.acquire().await.unwrap();
    for i in 0..n {
        enqueue(&mut conn, &NewJob::new(kind, &json!({"n": i}))).await.unwrap();
    }
}

async fn metrics_text(addr: &str) -> String {
    let (status, body) = http_get(addr, "/metrics").await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// Acceptance: `molecule api` alone (no pools in it) with 25 pending provision jobs shows
/// depth 25 for provision, and its HTTP histograms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_alone_reports_depth_from_the_database_and_its_histograms() {
    let (db, url) = fresh_db().await;
    push_many(&db, JobKind::Provision, 25).await;
    push_many(&db, JobKind::Exec, 3).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(bin_path("molecule"));
    cmd.arg("api").env("DATABASE_URL", &url).env("LISTEN_ADDR", &addr).env("ADMIN_TOKEN", ADMIN);
    let _api = Proc::spawn(cmd, "api-metrics");
    eventually(Duration::from_secs(30), "GET /readyz = 200", || async {
        matches!(http_get(&addr, "/readyz").await, Ok((200, _))).then_some(())
    })
    .await;
    assert_eq!(http_get(&addr, "/healthz").await.unwrap().0, 200);
    assert_eq!(http_get(&addr, "/no/such/route").await.unwrap().0, 404);
    let ws = uuid::Uuid::new_v4();
    assert_eq!(http(&addr, "GET", &format!("/workspaces/{ws}"), None, None, None).await.status, 401);

    let m = metrics_text(&addr).await;
    assert_eq!(sample(&m, r#"molecule_queue_depth{queue="provision",state="pending"}"#), Some(25.0), "{m}");
    assert_eq!(sample(&m, r#"molecule_queue_depth{queue="exec",state="pending"}"#), Some(3.0));
    assert_eq!(sample(&m, r#"molecule_queue_depth{queue="stop",state="pending"}"#), Some(0.0), "every product queue, even empty");
    assert_eq!(sample(&m, r#"molecule_pool_workers{queue="provision"}"#), Some(0.0), "no pools in `molecule api`");
    assert!(sample(&m, r#"molecule_queue_oldest_pending_age_seconds{queue="provision"}"#).is_some_and(|a| a >= 0.0));
    assert_eq!(sample(&m, "molecule_metrics_database_up"), Some(1.0));
    assert!(m.contains("# TYPE molecule_http_request_duration_seconds histogram"), "{m}");
    // Per route template, never per path: the workspace id is not in any series.
    assert!(m.contains(r#"molecule_http_request_duration_seconds_bucket{method="GET",route="/healthz",status="200",le="0.005"}"#));
    assert_eq!(sample(&m, r#"molecule_http_requests_total{method="GET",route="/workspaces/{id}",status="401"}"#), Some(1.0));
    assert_eq!(sample(&m, r#"molecule_http_requests_total{method="GET",route="unmatched",status="404"}"#), Some(1.0));
    assert!(!m.contains(&ws.to_string()));

    // Read again once a second at most, whoever scrapes: five more show soon.
    push_many(&db, JobKind::Provision, 5).await;
    eventually(Duration::from_secs(5), "the new depth", || async {
        (sample(&metrics_text(&addr).await, r#"molecule_queue_depth{queue="provision",state="pending"}"#) == Some(30.0)).then_some(())
    })
    .await;
    // Made-up methods share one series (a flood of them cannot grow /metrics).
    for m in ["FOO", "BAR"] {
        assert_eq!(http(&addr, m, "/healthz", None, None, None).await.status, 405);
    }
    let m = metrics_text(&addr).await;
    assert!(!m.contains("FOO") && !m.contains("BAR"));
    let other: f64 = m
        .lines()
        .filter(|l| l.starts_with(r#"molecule_http_requests_total{method="other","#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(other, 2.0, "{m}");
}

fn quick() -> RuntimeConfig {
    RuntimeConfig {
        lease: Duration::from_secs(30),
        heartbeat: Duration::from_secs(1),
        poll_interval: Duration::from_millis(200),
        grace: Duration::from_secs(5),
        batch: 50,
        node: "ops".into(),
        ..Default::default()
    }
}

/// The pools' counters and histograms, and the redactor's hits, through `/metrics` of
/// this process (one recorder per process, installed before the pools start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_count_their_jobs_and_the_redactor_its_hits() {
    molecule_api::metrics::install().expect("the recorder installs");
    let (db, _) = fresh_db().await;
    let retry = RetryPolicy { base: Duration::from_millis(20), cap: Duration::from_millis(50), max_attempts: 5 };
    let ok = handler_fn(|_ctx| async { Ok(json!({"ok": true})) });
    let flaky =
        handler_fn(
            |ctx| async move { if ctx.attempt == 1 { Err(JobError::retryable("backend", "first try fails")) } else { Ok(json!(null)) } },
        );
    let doomed = handler_fn(|_ctx| async { Err(JobError::retryable("backend", "always fails")) });
    let rt = Runtime::start(
        db.clone(),
        quick(),
        vec![PoolSpec::new("m_ok", 2, retry, ok), PoolSpec::new("m_flaky", 2, retry, flaky), PoolSpec::new("m_doomed", 2, retry, doomed)],
    );
    let mut ids = Vec::new();
    {
        let mut conn = db.acquire().await.unwrap();
        for (q, n, attempts) in [("m_ok", 3, 5), ("m_flaky", 2, 5), ("m_doomed", 1, 2)] {
            for _ in 0..n {
                ids.push(enqueue(&mut conn, &NewJob::to_queue(q, &json!({})).max_attempts(attempts)).await.unwrap());
            }
        }
    }
    for id in &ids {
        eventually(Duration::from_secs(20), "every job to end", || async {
            molecule_jobs::status::get(&db, id).await.unwrap().filter(|v| matches!(v.status, JobStatus::Succeeded | JobStatus::Dead))
        })
        .await;
    }
    let addr = start_api(db.clone(), molecule_tests::open_auth()).await;
    // Acks are counted once written, by each pool's own acker: wait for every count.
    let expected: &[(&str, f64)] = &[
        (r#"molecule_jobs_enqueued_total{queue="m_ok"}"#, 3.0),
        (r#"molecule_jobs_started_total{queue="m_ok"}"#, 3.0),
        (r#"molecule_job_attempts_total{queue="m_ok",event="succeeded"}"#, 3.0),
        // Two jobs, two attempts each: the first fails and is retried.
        (r#"molecule_jobs_started_total{queue="m_flaky"}"#, 4.0),
        (r#"molecule_job_attempts_total{queue="m_flaky",event="failed"}"#, 2.0),
        (r#"molecule_job_attempts_total{queue="m_flaky",event="retried"}"#, 2.0),
        (r#"molecule_job_attempts_total{queue="m_flaky",event="succeeded"}"#, 2.0),
        (r#"molecule_job_attempts_total{queue="m_doomed",event="failed"}"#, 2.0),
        (r#"molecule_job_attempts_total{queue="m_doomed",event="retried"}"#, 1.0),
        (r#"molecule_job_attempts_total{queue="m_doomed",event="dead"}"#, 1.0),
        (r#"molecule_jobs_stale_acks_total{queue="m_ok"}"#, 0.0),
        (r#"molecule_job_duration_seconds_count{queue="m_ok",outcome="succeeded"}"#, 3.0),
        (r#"molecule_job_duration_seconds_bucket{queue="m_flaky",outcome="retried",le="+Inf"}"#, 2.0),
    ];
    let m = eventually(Duration::from_secs(10), "every count to reach its value", || async {
        let m = metrics_text(&addr).await;
        expected.iter().all(|(s, want)| sample(&m, s) == Some(*want)).then_some(m)
    })
    .await;
    rt.shutdown().await;
    assert!(m.contains("# TYPE molecule_job_duration_seconds histogram"));
    assert_eq!(sample(&m, r#"molecule_job_attempts_total{queue="m_ok",event="dead"}"#), Some(0.0), "no other event for m_ok");

    // The redactor counts what it replaces, per rule family.
    let aws = r#"molecule_redactions_total{family="aws"}"#;
    let before = sample(&metrics_text(&addr).await, aws).unwrap_or(0.0);
    let redacted = molecule_domain::redact::global().redact("keys AKIAQWERTYUIOPASDFGH and ASIAQWERTYUIOPASDFGH");
    assert!(!redacted.contains("QWERTYUIOP"));
    assert_eq!(sample(&metrics_text(&addr).await, aws), Some(before + 2.0));
}

struct Tenants {
    db: PgPool,
    addr: String,
    acme_token: String,
    acme: molecule_domain::OrgId,
    other_token: String,
    acme_failed_job: String,
    other_failed_job: String,
}

/// Two orgs, each with a workspace and a job that failed for good; the API in this
/// process with ADMIN_TOKEN set.
async fn tenants() -> Tenants {
    let (db, _) = fresh_db().await;
    let mut conn = db.acquire().await.unwrap();
    let (acme, acme_token) = tokens::create_org(&mut conn, "acme").await.unwrap();
    let (other, other_token) = tokens::create_org(&mut conn, "other").await.unwrap();
    drop(conn);
    let auth = molecule_api::AuthConfig { admin_token: Some(ADMIN.into()), ..molecule_tests::open_auth() };
    let addr = start_api(db.clone(), auth).await;
    for (t, name) in [(&acme_token, "<b>acme's</b> workspace"), (&other_token, "other's workspace")] {
        let body = json!({"name": name, "runtime": "external"}).to_string();
        assert_eq!(http(&addr, "POST", "/workspaces", Some(t), Some(&body), None).await.status, 202);
    }
    // One job per org that fails permanently: tenants read its code and sentence.
    let failing = handler_fn(|_ctx| async { Err(JobError::permanent("image_missing", "pull of registry.internal/secret-image failed")) });
    let rt = Runtime::start(
        db.clone(),
        quick(),
        vec![PoolSpec::new(
            "d_fail",
            1,
            RetryPolicy { base: Duration::from_millis(20), cap: Duration::from_millis(50), max_attempts: 3 },
            failing,
        )],
    );
    let mut conn = db.acquire().await.unwrap();
    let a = enqueue(&mut conn, &NewJob::to_queue("d_fail", &json!({})).org(acme)).await.unwrap();
    let o = enqueue(&mut conn, &NewJob::to_queue("d_fail", &json!({})).org(other)).await.unwrap();
    drop(conn);
    for id in [&a, &o] {
        eventually(Duration::from_secs(20), "the job to be failed", || async {
            molecule_jobs::status::get(&db, id).await.unwrap().filter(|v| v.status == JobStatus::Failed)
        })
        .await;
    }
    rt.shutdown().await;
    Tenants { db, addr, acme_token, acme, other_token, acme_failed_job: a.to_string(), other_failed_job: o.to_string() }
}

fn set_cookie(r: &molecule_tests::Resp) -> String {
    let c = r.header("set-cookie").expect("a session cookie").to_string();
    assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Path=/dashboard"), "{c}");
    c.split(';').next().unwrap().to_string()
}

async fn get_with(addr: &str, path: &str, headers: &[(&str, &str)]) -> molecule_tests::Resp {
    http_full(addr, "GET", path, None, None, headers, Duration::from_secs(15)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_behind_auth_and_shows_each_viewer_its_own() {
    let t = tenants().await;
    let public = molecule_jobs::failures::public("image_missing");

    // No auth: the login page, for every page.
    for path in ["/dashboard", "/dashboard/jobs", "/dashboard/workspaces", &format!("/dashboard/jobs/{}", t.acme_failed_job)] {
        let r = http(&t.addr, "GET", path, None, None, None).await;
        assert_eq!((r.status, r.header("location")), (303, Some("/dashboard/login")), "{path}");
        assert!(!r.body.contains("image_missing"));
    }
    // A wrong bearer, or a workspace's token: 401.
    assert_eq!(http(&t.addr, "GET", "/dashboard", Some("mol_org_nope"), None, None).await.status, 401);
    let mut conn = t.db.acquire().await.unwrap();
    let ws: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM workspaces WHERE org_id = $1").bind(t.acme.0).fetch_one(&mut *conn).await.unwrap();
    let ws_token = tokens::create_workspace_token(&mut conn, molecule_domain::WorkspaceId(ws)).await.unwrap();
    assert_eq!(http(&t.addr, "GET", "/dashboard", Some(&ws_token), None, None).await.status, 401);

    // The operator (bearer) sees both orgs' failed jobs, and the detail on the job's page.
    let jobs = http(&t.addr, "GET", "/dashboard/jobs?status=failed", Some(ADMIN), None, None).await;
    assert_eq!(jobs.status, 200);
    assert!(jobs.header("content-type").unwrap().starts_with("text/html"));
    assert!(jobs.body.contains(&t.acme_failed_job) && jobs.body.contains(&t.other_failed_job));
    assert!(jobs.body.contains(&pages_text(&public)));
    let job = http(&t.addr, "GET", &format!("/dashboard/jobs/{}", t.acme_failed_job), Some(ADMIN), None, None).await;
    assert!(job.body.contains("registry.internal/secret-image"), "operators read the detail");
    let overview = http(&t.addr, "GET", "/dashboard", Some(ADMIN), None, None).await;
    assert!(overview.body.contains("id=\"workers\""), "operators see the workers");

    // An org (logged in by form): its own job only, never the detail, never the other org's.
    let login = post_form(&t.addr, "/dashboard/login", &format!("token={}", t.acme_token), &[]).await;
    assert_eq!((login.status, login.header("location")), (303, Some("/dashboard")));
    let cookie = set_cookie(&login);
    assert!(!cookie.contains(&t.acme_token), "the cookie is a session, not the token");
    let with = [("Cookie", cookie.as_str())];
    let jobs = get_with(&t.addr, "/dashboard/jobs", &with).await;
    assert_eq!(jobs.status, 200);
    assert!(jobs.body.contains(&t.acme_failed_job) && !jobs.body.contains(&t.other_failed_job));
    assert!(jobs.body.contains(&pages_text(&public)));
    let mine = get_with(&t.addr, &format!("/dashboard/jobs/{}", t.acme_failed_job), &with).await;
    assert_eq!(mine.status, 200);
    assert!(!mine.body.contains("secret-image"), "tenants never read the failure's detail");
    assert_eq!(get_with(&t.addr, &format!("/dashboard/jobs/{}", t.other_failed_job), &with).await.status, 404);
    let overview = get_with(&t.addr, "/dashboard", &with).await;
    assert!(!overview.body.contains("id=\"workers\""));
    let wss = get_with(&t.addr, "/dashboard/workspaces", &with).await;
    assert!(wss.body.contains("&lt;b&gt;acme&#39;s&lt;/b&gt; workspace"), "names are escaped: {}", wss.body);
    assert!(!wss.body.contains("other's workspace"));

    // A bad token at the login form: 401 and the form again, no cookie.
    let bad = post_form(&t.addr, "/dashboard/login", "token=mol_org_wrong", &[]).await;
    assert_eq!(bad.status, 401);
    assert!(bad.header("set-cookie").is_none());
    // A login form posted from elsewhere, or by something that is not a browser's form: refused.
    let forged = http_full(
        &t.addr,
        "POST",
        "/dashboard/login",
        None,
        Some(&format!("token={}", t.other_token)),
        &[("Content-Type", "application/x-www-form-urlencoded"), ("Origin", "https://evil.example")],
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(forged.status, 403);
    let bare = http(
        &t.addr,
        "POST",
        "/dashboard/login",
        None,
        Some(&format!("token={}", t.other_token)),
        Some("application/x-www-form-urlencoded"),
    )
    .await;
    assert_eq!(bare.status, 403);
    assert!(bare.header("set-cookie").is_none());

    // Revoking the org token ends its sessions; logging out ends a session.
    let (_, second) = tokens::create_org_token(&mut conn, t.acme, None).await.unwrap();
    let login2 = post_form(&t.addr, "/dashboard/login", &format!("token={second}"), &[]).await;
    let cookie2 = set_cookie(&login2);
    let token_id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM org_tokens WHERE org_id = $1 ORDER BY created_at LIMIT 1")
        .bind(t.acme.0)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(tokens::revoke_org_token(&mut conn, t.acme, token_id).await.unwrap());
    assert_eq!(get_with(&t.addr, "/dashboard", &with).await.status, 303, "the revoked token's session ended");
    assert_eq!(get_with(&t.addr, "/dashboard", &[("Cookie", cookie2.as_str())]).await.status, 200);
    let out = post_form(&t.addr, "/dashboard/logout", "", &[("Cookie", cookie2.as_str())]).await;
    assert_eq!(out.status, 303);
    assert_eq!(get_with(&t.addr, "/dashboard", &[("Cookie", cookie2.as_str())]).await.status, 303);
}

/// A form posted the way a browser posts the dashboard's own forms (same `Origin`).
async fn post_form(addr: &str, path: &str, body: &str, extra: &[(&str, &str)]) -> molecule_tests::Resp {
    let origin = format!("http://{addr}");
    let mut headers = vec![("Content-Type", "application/x-www-form-urlencoded"), ("Origin", origin.as_str())];
    headers.extend_from_slice(extra);
    http_full(addr, "POST", path, None, Some(body), &headers, Duration::from_secs(15)).await
}

/// The text a page shows for a sentence (the HTML escapes quotes).
fn pages_text(s: &str) -> String {
    molecule_api::dashboard::esc(s)
}

/// Acceptance: what a person sees in Chromium — the login, the queue page, a failed
/// job's error; and no page without logging in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_logs_in_with_chromium_and_reads_a_failed_jobs_error() {
    let t = tenants().await;
    let base = format!("http://{}", t.addr);
    let b = Browser::start().await;

    b.goto(&format!("{base}/dashboard/jobs")).await;
    assert_eq!(b.url().await, format!("{base}/dashboard/login"), "no page without auth");
    assert!(b.text("main").await.contains("Token"));

    b.type_into("#token", &t.acme_token).await;
    b.click("#login").await;
    let home = format!("{base}/dashboard");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b.url().await != home && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(b.url().await, home, "the login did not land on the dashboard; the page says: {}", b.text("main").await);
    let queues = b.text("#queues").await;
    assert!(queues.contains("d_fail") && queues.contains("provision"), "the queue page lists the queues: {queues}");
    let cookies = b.cookies().await;
    let session = cookies.iter().find(|c| c["name"] == "molecule_session").expect("the session cookie");
    assert_eq!(session["httpOnly"], true);
    assert_eq!(b.script_visible_cookies().await, "", "the page's scripts cannot read the session");

    b.goto(&format!("{base}/dashboard/jobs?status=failed")).await;
    let jobs = b.text("#jobs").await;
    let public = molecule_jobs::failures::public("image_missing");
    assert!(jobs.contains(&t.acme_failed_job), "{jobs}");
    assert!(jobs.contains(&public), "the failed job's error is on the page: {jobs}");
    assert!(!jobs.contains(&t.other_failed_job), "another org's job is not");

    b.goto(&format!("{base}/dashboard/jobs/{}", t.acme_failed_job)).await;
    let page = b.text("#job").await;
    assert!(page.contains("failed") && page.contains(&public), "{page}");

    b.click("header button").await;
    let login = format!("{base}/dashboard/login");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b.url().await != login && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(b.url().await, login, "logging out leads to the login page");
    b.goto(&format!("{base}/dashboard")).await;
    assert_eq!(b.url().await, format!("{base}/dashboard/login"), "logged out");
    b.quit().await;
}

/// A worker process without the API serves its own `/metrics`: its pools' counters live
/// only in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_serves_its_own_counters() {
    let (db, url) = fresh_db().await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(bin_path("molecule"));
    cmd.args(["worker", "--pool", "console=1", "--metrics-listen", &addr]).env("DATABASE_URL", &url).env("MOLECULE_BACKEND", "none");
    let _worker = Proc::spawn(cmd, "worker-metrics");
    eventually(Duration::from_secs(30), "the worker's /healthz", || async {
        matches!(http_get(&addr, "/healthz").await, Ok((200, _))).then_some(())
    })
    .await;
    // No backend: the console job fails for good, and the worker counts it.
    push_many(&db, JobKind::Console, 1).await;
    let m = eventually(Duration::from_secs(20), "the worker to count the dead console job", || async {
        let m = metrics_text(&addr).await;
        (sample(&m, r#"molecule_job_attempts_total{queue="console",event="dead"}"#) == Some(1.0)).then_some(m)
    })
    .await;
    assert_eq!(sample(&m, r#"molecule_jobs_started_total{queue="console"}"#), Some(1.0));
    // The database's gauges are cached for a second: the page that counted the job may
    // predate the worker's first heartbeat row (the job can be claimed, tried and dead
    // within that second), so they are waited for.
    eventually(Duration::from_secs(5), "its own worker row, read from the database", || async {
        (sample(&metrics_text(&addr).await, r#"molecule_pool_workers{queue="console"}"#) == Some(1.0)).then_some(())
    })
    .await;
    // Depth is read from the database (a second at most behind): the job is no longer due.
    eventually(Duration::from_secs(5), "console's depth to read 0", || async {
        (sample(&metrics_text(&addr).await, r#"molecule_queue_depth{queue="console",state="pending"}"#) == Some(0.0)).then_some(())
    })
    .await;
}
