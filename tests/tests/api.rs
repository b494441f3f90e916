//! The REST API against a real PostgreSQL and the real HTTP server (SPEC §3, X1, X2, X6).

use molecule_api::{AuthConfig, OrgPin};
use molecule_domain::tokens;
use molecule_domain::{OrgId, WorkspaceId};
use molecule_tests::{Resp, fresh_db, http, open_auth, start_api};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::time::{Duration, Instant};

async fn org(db: &PgPool, name: &str) -> (OrgId, String) {
    let mut c = db.acquire().await.unwrap();
    tokens::create_org(&mut c, name).await.unwrap()
}

async fn get(addr: &str, path: &str, t: Option<&str>) -> Resp {
    http(addr, "GET", path, t, None, None).await
}

async fn post(addr: &str, path: &str, t: Option<&str>, body: Value) -> Resp {
    http(addr, "POST", path, t, Some(&body.to_string()), None).await
}

async fn create_ws(addr: &str, t: &str, body: Value) -> (String, Option<String>) {
    let r = post(addr, "/workspaces", Some(t), body).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let v = r.json();
    (v["workspace"]["id"].as_str().unwrap().to_string(), v["job_id"].as_str().map(str::to_string))
}

async fn count(db: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string())).fetch_one(db).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_answers_202_with_a_job_and_row_and_job_commit_together() {
    let (db, _) = fresh_db().await;
    let addr = start_api(db.clone(), open_auth()).await;
    let (org_id, t) = org(&db, "acme").await;

    let (ws, job) = create_ws(&addr, &t, json!({"name": "alpha", "runtime": "echo", "tier": 3})).await;
    let job = job.expect("a provision job");
    let r = get(&addr, &format!("/jobs/{job}"), Some(&t)).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["kind"], "provision");
    assert_eq!(v["workspace_id"], ws.as_str());
    assert_eq!(v["org_id"], org_id.to_string());
    let w = get(&addr, &format!("/workspaces/{ws}"), Some(&t)).await.json();
    assert_eq!(w["status"], "provisioning");
    assert_eq!(w["tier"], 3);

    // External runtime: awaiting_agent, poll, and no job.
    let r = post(&addr, "/workspaces", Some(&t), json!({"name": "ext", "runtime": "external"})).await;
    assert_eq!(r.status, 202);
    let v = r.json();
    assert_eq!(v["workspace"]["status"], "awaiting_agent");
    assert_eq!(v["workspace"]["delivery_mode"], "poll");
    assert!(v["job_id"].is_null());

    // Force the job push to fail inside the transaction: neither the row nor a job remains.
    sqlx::raw_sql(
        "CREATE FUNCTION fail_push() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'injected'; END $$ LANGUAGE plpgsql;
         CREATE TRIGGER fail_push BEFORE INSERT ON apalis.jobs FOR EACH ROW EXECUTE FUNCTION fail_push();",
    )
    .execute(&db)
    .await
    .unwrap();
    let before_ws = count(&db, "SELECT count(*) FROM workspaces").await;
    let before_jobs = count(&db, "SELECT count(*) FROM apalis.jobs").await;
    let r = post(&addr, "/workspaces", Some(&t), json!({"name": "doomed", "runtime": "echo"})).await;
    assert_eq!(r.status, 500, "{}", r.body);
    assert_eq!(r.code(), "internal");
    assert!(!r.body.contains("injected"), "no internals in the response");
    assert_eq!(count(&db, "SELECT count(*) FROM workspaces").await, before_ws, "the row was rolled back");
    assert_eq!(count(&db, "SELECT count(*) FROM workspaces WHERE name = 'doomed'").await, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM apalis.jobs").await, before_jobs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_hides_other_orgs_and_refuses_bad_tokens() {
    let (db, _) = fresh_db().await;
    let addr = start_api(db.clone(), open_auth()).await;
    let (_a, ta) = org(&db, "a").await;
    let (_b, tb) = org(&db, "b").await;
    let (ws, job) = create_ws(&addr, &ta, json!({"name": "a1", "runtime": "echo"})).await;
    let job = job.unwrap();

    // A revoked org token of org A.
    let mut c = db.acquire().await.unwrap();
    let org_a: OrgId = _a;
    let (revoked_id, revoked) = tokens::create_org_token(&mut c, org_a, Some("old")).await.unwrap();
    assert!(tokens::revoke_org_token(&mut c, org_a, revoked_id).await.unwrap());
    // A workspace token whose workspace is removed.
    let (gone, _) = create_ws(&addr, &ta, json!({"name": "gone", "runtime": "echo"})).await;
    let gone_token = tokens::create_workspace_token(&mut c, gone.parse::<WorkspaceId>().unwrap()).await.unwrap();
    assert_eq!(http(&addr, "DELETE", &format!("/workspaces/{gone}"), Some(&ta), None, None).await.status, 202);
    drop(c);

    let by_id: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", format!("/workspaces/{ws}"), None),
        ("GET", format!("/workspaces/{ws}/events"), None),
        ("GET", format!("/workspaces/{ws}/rescue"), None),
        ("GET", format!("/workspaces/{ws}/console"), None),
        ("POST", format!("/workspaces/{ws}/restart"), None),
        ("DELETE", format!("/workspaces/{ws}"), None),
        ("GET", format!("/jobs/{job}"), None),
        ("POST", format!("/jobs/{job}/cancel"), None),
        ("POST", format!("/jobs/{job}/retry"), None),
    ];
    for (m, path, _) in &by_id {
        let r = http(&addr, m, path, Some(&tb), None, None).await;
        assert_eq!(r.status, 404, "org B on {m} {path}: {}", r.body);
        assert_eq!(r.code(), "not_found");
    }
    // Org B's listings do not show org A's rows.
    let v = get(&addr, "/workspaces", Some(&tb)).await.json();
    assert_eq!(v["items"].as_array().unwrap().len(), 0);
    let v = get(&addr, "/jobs", Some(&tb)).await.json();
    assert_eq!(v["items"].as_array().unwrap().len(), 0);
    let v = get(&addr, &format!("/jobs?workspace_id={ws}"), Some(&tb)).await.json();
    assert_eq!(v["items"].as_array().unwrap().len(), 0);

    let mut all: Vec<(&str, String)> = by_id.iter().map(|(m, p, _)| (*m, p.clone())).collect();
    all.extend([("GET", "/workspaces".to_string()), ("POST", "/workspaces".to_string()), ("GET", "/jobs".to_string())]);
    for (m, path) in &all {
        let body = (*m == "POST" && path == "/workspaces").then(|| json!({"name": "x", "runtime": "echo"}).to_string());
        for (who, tok) in [
            ("no token", None),
            ("revoked token", Some(revoked.as_str())),
            ("removed workspace's token", Some(gone_token.as_str())),
            ("garbage", Some("mol_org_nope")),
        ] {
            let r = http(&addr, m, path, tok, body.as_deref(), None).await;
            assert_eq!(r.status, 401, "{who} on {m} {path}: {}", r.body);
            assert_eq!(r.code(), "unauthorized");
        }
    }
    // Nothing of org A was touched by any of that.
    let w = get(&addr, &format!("/workspaces/{ws}"), Some(&ta)).await.json();
    assert_eq!(w["status"], "provisioning");
    assert_eq!(count(&db, "SELECT count(*) FROM apalis.jobs WHERE job_type = 'restart'").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_token_sees_only_its_own_workspace() {
    let (db, _) = fresh_db().await;
    let addr = start_api(db.clone(), open_auth()).await;
    let (_o, t) = org(&db, "a").await;
    let (mine, _) = create_ws(&addr, &t, json!({"name": "mine", "runtime": "echo"})).await;
    let (other, _) = create_ws(&addr, &t, json!({"name": "other", "runtime": "echo"})).await;
    let mut c = db.acquire().await.unwrap();
    let wt = tokens::create_workspace_token(&mut c, mine.parse().unwrap()).await.unwrap();
    assert_eq!(get(&addr, &format!("/workspaces/{mine}"), Some(&wt)).await.status, 200);
    assert_eq!(get(&addr, &format!("/workspaces/{other}"), Some(&wt)).await.status, 404);
    let v = get(&addr, "/workspaces", Some(&wt)).await.json();
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    assert_eq!(v["items"][0]["id"], mine.as_str());
    let r = post(&addr, "/workspaces", Some(&wt), json!({"name": "x", "runtime": "echo"})).await;
    assert_eq!(r.status, 403);
    let r = post(&addr, &format!("/workspaces/{mine}/restart"), Some(&wt), json!({})).await;
    assert_eq!(r.status, 403);
    let jobs = get(&addr, "/jobs", Some(&wt)).await.json();
    assert!(jobs["items"].as_array().unwrap().iter().all(|j| j["workspace_id"] == mine.as_str()));
    assert_eq!(jobs["items"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_org_pin_fails_closed_before_any_query() {
    // A pool to a port where nothing listens: any query would fail as database_unavailable,
    // so a platform_misconfigured answer proves that no query ran.
    // (127.0.0.254:9: loopback, and nothing of ours ever listens there.)
    let db = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy("postgres://nobody:x@127.0.0.254:9/none")
        .unwrap();
    let pinned_empty =
        AuthConfig { admin_token: None, dev: false, org_pin: OrgPin::from_env_value(Some("")).unwrap(), allow_loopback_agents: false };
    let addr = start_api(db.clone(), pinned_empty).await;
    let id = uuid::Uuid::new_v4();
    for (m, path) in [
        ("GET", format!("/workspaces/{id}")),
        ("GET", format!("/workspaces/{id}/rescue")),
        ("GET", "/workspaces".into()),
        ("GET", "/jobs".into()),
        ("DELETE", format!("/workspaces/{id}")),
    ] {
        let r = http(&addr, m, &path, Some("mol_org_0000"), None, None).await;
        assert_eq!(r.status, 503, "{m} {path}: {}", r.body);
        assert_eq!(r.code(), "platform_misconfigured");
    }
    // The same server with no pin does try the database (and says so).
    let addr = start_api(db, open_auth()).await;
    let t0 = Instant::now();
    let r = get(&addr, "/workspaces", Some("mol_org_0000")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.code(), "database_unavailable");
    assert!(t0.elapsed() < Duration::from_secs(5), "database down must answer quickly, took {:?}", t0.elapsed());
    assert!(OrgPin::from_env_value(Some("not-a-uuid")).is_err());
}

/// A15: `GET /queues` counts each state of a pool's jobs, the age of its oldest due one and
/// its live workers' concurrency; an org token reads its own org's jobs only (workers 0:
/// they are the platform's), a workspace token nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_count_each_state_and_an_org_reads_its_own() {
    let (db, _) = fresh_db().await;
    let (a, a_token) = org(&db, "a").await;
    let (b, _) = org(&db, "b").await;
    let addr = start_api(db.clone(), AuthConfig { admin_token: Some("s3cret-admin".into()), ..open_auth() }).await;
    let mut conn = db.acquire().await.unwrap();
    // A job of pool q15 in `org`, then set as `set` says.
    async fn job(db: &PgPool, org: OrgId, set: &str) {
        let mut c = db.acquire().await.unwrap();
        let id = molecule_jobs::enqueue(&mut c, &molecule_jobs::NewJob::to_queue("q15", &json!({})).org(org)).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE apalis.jobs SET {set} WHERE id = $1")))
            .bind(id.as_str())
            .execute(&mut *c)
            .await
            .unwrap();
    }
    let failed_now = "attempt_log = jsonb_build_array(jsonb_build_object('attempt', 1, 'failed_at', now(), 'error', 'x'))";
    job(&db, a, "run_at = now() - interval '40 seconds'").await;
    job(&db, a, "run_at = now() + interval '1 hour'").await;
    job(&db, a, "status = 'Running', lock_at = now()").await;
    job(&db, a, &format!("status = 'Failed', run_at = now() + interval '1 minute', {failed_now}")).await;
    job(&db, a, &format!("status = 'Killed', outcome = 'failed', done_at = now(), {failed_now}")).await;
    job(&db, a, &format!("status = 'Killed', outcome = 'dead', done_at = now(), {failed_now}")).await;
    job(&db, b, "run_at = now() - interval '5 minutes'").await;
    sqlx::query(
        "INSERT INTO apalis.workers (id, worker_type, storage_name, layers, last_seen, started_at) \
         VALUES ('w-q15', 'q15', 'molecule', 'concurrency=4', now(), now())",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    let q15 = |v: Value| v.as_array().unwrap().iter().find(|q| q["queue"] == "q15").cloned().unwrap_or_else(|| panic!("no q15: {v}"));

    let all = q15(get(&addr, "/queues", Some("s3cret-admin")).await.json());
    let counts = |q: &Value, k: &str| q[k].as_i64().unwrap_or(-1);
    let keys = ["pending", "scheduled", "running", "retrying", "failed_last_hour", "dead_last_hour", "workers_alive", "concurrency"];
    assert_eq!(keys.map(|k| counts(&all, k)), [2, 1, 1, 1, 3, 1, 1, 4], "{all}");
    assert!(all["oldest_pending_age_s"].as_f64().unwrap() >= 300.0, "org b's job is the oldest: {all}");

    let own = q15(get(&addr, "/queues", Some(&a_token)).await.json());
    assert_eq!(keys.map(|k| counts(&own, k)), [1, 1, 1, 1, 3, 1, 0, 0], "{own}");
    let age = own["oldest_pending_age_s"].as_f64().unwrap();
    assert!((40.0..300.0).contains(&age), "org a's own oldest: {own}");

    let ws: uuid::Uuid =
        sqlx::query_scalar("INSERT INTO workspaces (org_id, name, runtime, tier) VALUES ($1, 'w', 'echo', 2) RETURNING id")
            .bind(a.0)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    let ws_token = tokens::create_workspace_token(&mut conn, WorkspaceId(ws)).await.unwrap();
    assert_eq!(get(&addr, "/queues", Some(&ws_token)).await.status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_gate() {
    let (db, _) = fresh_db().await;
    let (_o, org_token) = org(&db, "a").await;
    let off = start_api(db.clone(), open_auth()).await;
    let r = get(&off, "/queues", None).await;
    assert_eq!(r.status, 403, "unset ADMIN_TOKEN outside dev mode refuses");
    assert_eq!(get(&off, "/queues", Some(&org_token)).await.status, 200, "an org token reads its own org's queues");
    assert_eq!(get(&off, "/queues", Some("mol_org_nope")).await.status, 401);

    let dev = start_api(db.clone(), AuthConfig { admin_token: None, dev: true, org_pin: OrgPin::Any, allow_loopback_agents: false }).await;
    assert_eq!(get(&dev, "/queues", None).await.status, 200);
    // A bearer is still checked in dev mode: an org's own view, or 401.
    assert_eq!(get(&dev, "/queues", Some(&org_token)).await.status, 200);
    assert_eq!(get(&dev, "/queues", Some("mol_org_nope")).await.status, 401);

    // A server pinned to one org: another org's token is refused, an empty pin fails closed.
    let (other, _) = org(&db, "b").await;
    let pinned = start_api(db.clone(), AuthConfig { org_pin: OrgPin::Only(other), ..open_auth() }).await;
    assert_eq!(get(&pinned, "/queues", Some(&org_token)).await.status, 401);
    let broken = start_api(db.clone(), AuthConfig { org_pin: OrgPin::Misconfigured, ..open_auth() }).await;
    assert_eq!(get(&broken, "/queues", Some(&org_token)).await.status, 503);

    let on = start_api(
        db.clone(),
        AuthConfig { admin_token: Some("s3cret-admin".into()), dev: false, org_pin: OrgPin::Any, allow_loopback_agents: false },
    )
    .await;
    assert_eq!(get(&on, "/queues", None).await.status, 401);
    assert_eq!(get(&on, "/queues", Some("s3cret-admi")).await.status, 401);
    assert_eq!(get(&on, "/queues", Some(&org_token)).await.status, 200);
    let r = get(&on, "/queues", Some("s3cret-admin")).await;
    assert_eq!(r.status, 200);
    let queues = r.json();
    let names: Vec<&str> = queues.as_array().unwrap().iter().map(|q| q["queue"].as_str().unwrap()).collect();
    for q in ["provision", "stop", "restart", "rescue_capture", "exec", "a2a_dispatch", "sweep", "console"] {
        assert!(names.contains(&q), "{q} missing from {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_the_tree_once_with_one_stop_job_each() {
    let (db, _) = fresh_db().await;
    let addr = start_api(db.clone(), open_auth()).await;
    let (_o, t) = org(&db, "a").await;
    let (root, _) = create_ws(&addr, &t, json!({"name": "root", "runtime": "echo"})).await;
    let (c1, _) = create_ws(&addr, &t, json!({"name": "c1", "runtime": "echo", "parent_id": root})).await;
    let (_c2, _) = create_ws(&addr, &t, json!({"name": "c2", "runtime": "echo", "parent_id": root})).await;
    let (_g1, _) = create_ws(&addr, &t, json!({"name": "g1", "runtime": "echo", "parent_id": c1})).await;
    let (bystander, _) = create_ws(&addr, &t, json!({"name": "other", "runtime": "echo"})).await;

    let r = http(&addr, "DELETE", &format!("/workspaces/{root}"), Some(&t), None, None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let v = r.json();
    assert_eq!(v["removed"].as_array().unwrap().len(), 4);
    assert_eq!(v["job_ids"].as_array().unwrap().len(), 4);
    assert_eq!(count(&db, "SELECT count(*) FROM workspaces WHERE status = 'removed'").await, 4);
    assert_eq!(count(&db, "SELECT count(*) FROM apalis.jobs WHERE job_type = 'stop'").await, 4);
    assert_eq!(
        count(&db, "SELECT count(DISTINCT workspace_id) FROM apalis.jobs WHERE job_type = 'stop' AND convert_from(job, 'UTF8')::jsonb ->> 'reason' = 'delete'").await,
        4
    );
    let b = get(&addr, &format!("/workspaces/{bystander}"), Some(&t)).await.json();
    assert_eq!(b["status"], "provisioning");

    // Again: nothing new.
    let r = http(&addr, "DELETE", &format!("/workspaces/{root}"), Some(&t), None, None).await;
    assert_eq!(r.status, 202);
    assert_eq!(r.json()["job_ids"].as_array().unwrap().len(), 0);
    assert_eq!(count(&db, "SELECT count(*) FROM apalis.jobs WHERE job_type = 'stop'").await, 4);
    // Removed workspaces leave the listing; their events say why.
    let list = get(&addr, "/workspaces", Some(&t)).await.json();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let ev = get(&addr, &format!("/workspaces/{root}/events"), Some(&t)).await.json();
    let types: Vec<&str> = ev.as_array().unwrap().iter().map(|e| e["event_type"].as_str().unwrap()).collect();
    assert_eq!(types, ["WORKSPACE_REMOVED", "WORKSPACE_CREATED"]);
    // A child cannot be created under a removed parent.
    let r = post(&addr, "/workspaces", Some(&t), json!({"name": "late", "runtime": "echo", "parent_id": root})).await;
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_parent"));
}

/// A3: a child created while its parent's delete is in flight is refused, not left live
/// under a removed parent (the delete answered without it) — under the deleted workspace
/// and under any of its descendants. The delete is held inside its transaction, after it
/// locked the tree, by a lock on the job table taken here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_created_while_its_parent_is_deleted_is_refused() {
    let (db, _) = fresh_db().await;
    let addr = start_api(db.clone(), open_auth()).await;
    let (_o, t) = org(&db, "a").await;
    let waiting = |n: i64| {
        let db = db.clone();
        async move {
            let w =
                count(&db, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'").await;
            (w >= n).then_some(())
        }
    };
    for under_root in [true, false] {
        let (root, _) = create_ws(&addr, &t, json!({"name": "root", "runtime": "echo"})).await;
        let (child, _) = create_ws(&addr, &t, json!({"name": "child", "runtime": "echo", "parent_id": root})).await;
        let parent = if under_root { root.clone() } else { child };

        let mut blocker = db.begin().await.unwrap();
        sqlx::query("LOCK TABLE apalis.jobs IN SHARE MODE").execute(&mut *blocker).await.unwrap();
        let delete = {
            let (addr, t, root) = (addr.clone(), t.clone(), root.clone());
            tokio::spawn(async move { http(&addr, "DELETE", &format!("/workspaces/{root}"), Some(&t), None, None).await })
        };
        molecule_tests::eventually(Duration::from_secs(20), "the delete waits on the job table", || waiting(1)).await;
        let create = {
            let (addr, t) = (addr.clone(), t.clone());
            let body = json!({"name": "late", "runtime": "echo", "parent_id": parent});
            tokio::spawn(async move { post(&addr, "/workspaces", Some(&t), body).await })
        };
        molecule_tests::eventually(Duration::from_secs(20), "the create waits", || waiting(2)).await;
        blocker.commit().await.unwrap();

        let (deleted, created) = (delete.await.unwrap(), create.await.unwrap());
        assert_eq!(deleted.status, 202, "{}", deleted.body);
        assert_eq!((created.status, created.code().as_str()), (400, "invalid_parent"), "under the root: {under_root}: {}", created.body);
        assert_eq!(count(&db, "SELECT count(*) FROM workspaces WHERE status <> 'removed'").await, 0, "under the root: {under_root}");
    }
}

/// A5: an exec without `timeout_s` runs with the default 30 s, one over the cap with
/// 120 s: in the answer and in the job the worker reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_without_a_timeout_gets_the_default_and_a_long_one_the_cap() {
    let (db, _) = fresh_db().await;
    let addr = start_api(db.clone(), open_auth()).await;
    let (_o, t) = org(&db, "a").await;
    let (ws, _) = create_ws(&addr, &t, json!({"name": "w", "runtime": "echo", "tier": 3})).await;
    sqlx::query("UPDATE workspaces SET status = 'online' WHERE id = $1::uuid").bind(&ws).execute(&db).await.unwrap();
    for (body, want) in [(json!({"argv": ["true"]}), 30), (json!({"argv": ["true"], "timeout_s": 86400}), 120)] {
        let r = post(&addr, &format!("/workspaces/{ws}/exec"), Some(&t), body).await;
        assert_eq!(r.status, 202, "{}", r.body);
        assert_eq!(r.json()["timeout_s"], want, "{}", r.body);
        let job: i64 = sqlx::query_scalar("SELECT (convert_from(job, 'UTF8')::jsonb ->> 'timeout_s')::int8 FROM apalis.jobs WHERE id = $1")
            .bind(r.json()["job_id"].as_str().unwrap())
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(job, want);
    }
}

/// A3: a delete chosen as a deadlock's victim (40P01: here a transaction that holds the
/// tree's later row, then waits for its first) runs again instead of answering 503: its
/// transaction was rolled back whole, so the second run removes the tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_chosen_as_a_deadlock_victim_runs_again() {
    let (db, _) = fresh_db().await;
    let addr = start_api(db.clone(), open_auth()).await;
    let (_o, t) = org(&db, "a").await;
    let (root, _) = create_ws(&addr, &t, json!({"name": "root", "runtime": "echo"})).await;
    let (child, _) = create_ws(&addr, &t, json!({"name": "child", "runtime": "echo", "parent_id": root})).await;
    let mut ids: Vec<uuid::Uuid> = [&root, &child].iter().map(|s| s.parse().unwrap()).collect();
    ids.sort();
    let (first, last) = (ids[0], ids[1]);

    let mut other = db.begin().await.unwrap();
    // This side never checks for the deadlock first: the delete's session finds it.
    sqlx::query("SET LOCAL deadlock_timeout = '60s'").execute(&mut *other).await.unwrap();
    sqlx::query("SELECT 1 FROM workspaces WHERE id = $1 FOR UPDATE").bind(last).execute(&mut *other).await.unwrap();
    let delete = {
        let (addr, t, root) = (addr.clone(), t.clone(), root.clone());
        tokio::spawn(async move { http(&addr, "DELETE", &format!("/workspaces/{root}"), Some(&t), None, None).await })
    };
    // The delete holds the first row and waits for the last.
    molecule_tests::eventually(Duration::from_secs(20), "the delete waits for the last row", || {
        let db = db.clone();
        async move {
            let w =
                count(&db, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'").await;
            (w >= 1).then_some(())
        }
    })
    .await;
    // Waiting for the first row closes the cycle; the delete is rolled back, so this gets it.
    sqlx::query("SELECT 1 FROM workspaces WHERE id = $1 FOR UPDATE").bind(first).execute(&mut *other).await.unwrap();
    other.commit().await.unwrap();

    let deleted = delete.await.unwrap();
    assert_eq!(deleted.status, 202, "{}", deleted.body);
    assert_eq!(deleted.json()["removed"].as_array().map(Vec::len), Some(2), "{}", deleted.body);
    assert_eq!(count(&db, "SELECT count(*) FROM workspaces WHERE status <> 'removed'").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_restarts_coalesce_into_one_job() {
    let (db, _) = fresh_db().await;
    let addr = start_api(db.clone(), open_auth()).await;
    let (_o, t) = org(&db, "a").await;
    let (ws, _) = create_ws(&addr, &t, json!({"name": "w", "runtime": "echo"})).await;
    let path = format!("/workspaces/{ws}/restart");
    let (a, b) = tokio::join!(post(&addr, &path, Some(&t), json!({})), post(&addr, &path, Some(&t), json!({})));
    assert_eq!((a.status, b.status), (202, 202), "{} / {}", a.body, b.body);
    let (a, b) = (a.json(), b.json());
    assert_eq!(a["job_id"], b["job_id"]);
    assert_ne!(a["coalesced"], b["coalesced"], "exactly one created the job");
    assert_eq!(count(&db, "SELECT count(*) FROM apalis.jobs WHERE job_type = 'restart'").await, 1);
    let ev = get(&addr, &format!("/workspaces/{ws}/events"), Some(&t)).await.json();
    assert_eq!(ev[0]["event_type"], "RESTART_REQUESTED");

    // Once that restart is no longer pending, a new one is queued.
    let job = a["job_id"].as_str().unwrap();
    assert_eq!(post(&addr, &format!("/jobs/{job}/cancel"), Some(&t), json!({})).await.status, 200);
    let c = post(&addr, &path, Some(&t), json!({})).await.json();
    assert_ne!(c["job_id"], a["job_id"]);
    assert_eq!(c["coalesced"], false);

    let (ext, _) = create_ws(&addr, &t, json!({"name": "e", "runtime": "external"})).await;
    let r = post(&addr, &format!("/workspaces/{ext}/restart"), Some(&t), json!({})).await;
    assert_eq!((r.status, r.code().as_str()), (409, "not_restartable"));
    assert_eq!(http(&addr, "DELETE", &format!("/workspaces/{ws}"), Some(&t), None, None).await.status, 202);
    let r = post(&addr, &path, Some(&t), json!({})).await;
    assert_eq!((r.status, r.code().as_str()), (409, "workspace_removed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_listing_filters_paginates_and_cancel_retry_check_state() {
    let (db, _) = fresh_db().await;
    let addr = start_api(db.clone(), open_auth()).await;
    let (_o, t) = org(&db, "a").await;
    let mut ws = Vec::new();
    for i in 0..5 {
        ws.push(create_ws(&addr, &t, json!({"name": format!("w{i}"), "runtime": "echo"})).await);
    }
    let page1 = get(&addr, "/jobs?limit=2&kind=provision", Some(&t)).await.json();
    assert_eq!(page1["items"].as_array().unwrap().len(), 2);
    let cursor = page1["next_cursor"].as_str().unwrap().to_string();
    let page2 = get(&addr, &format!("/jobs?limit=2&kind=provision&cursor={cursor}"), Some(&t)).await.json();
    let page3 =
        get(&addr, &format!("/jobs?limit=2&kind=provision&cursor={}", page2["next_cursor"].as_str().unwrap()), Some(&t)).await.json();
    assert_eq!(page3["items"].as_array().unwrap().len(), 1);
    assert!(page3["next_cursor"].is_null());
    let mut seen: Vec<String> = [&page1, &page2, &page3]
        .iter()
        .flat_map(|p| p["items"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()))
        .collect();
    seen.dedup();
    assert_eq!(seen.len(), 5, "pages neither skip nor repeat");

    let (w0, j0) = (&ws[0].0, ws[0].1.clone().unwrap());
    let only = get(&addr, &format!("/jobs?workspace_id={w0}"), Some(&t)).await.json();
    assert_eq!(only["items"].as_array().unwrap().len(), 1);
    assert_eq!(only["items"][0]["id"], j0.as_str());
    let pending = get(&addr, "/jobs?status=pending", Some(&t)).await.json();
    assert_eq!(pending["items"].as_array().unwrap().len(), 5);
    assert_eq!(get(&addr, "/jobs?status=dead", Some(&t)).await.json()["items"].as_array().unwrap().len(), 0);

    // Cancel: pending → cancelled; again → 409. Retry a cancelled job → pending.
    let r = post(&addr, &format!("/jobs/{j0}/cancel"), Some(&t), json!({})).await;
    assert_eq!((r.status, r.json()["status"].as_str().unwrap().to_string()), (200, "cancelled".into()));
    let r = post(&addr, &format!("/jobs/{j0}/cancel"), Some(&t), json!({})).await;
    assert_eq!((r.status, r.code().as_str()), (409, "invalid_state"));
    let r = post(&addr, &format!("/jobs/{}/retry", ws[1].1.clone().unwrap()), Some(&t), json!({})).await;
    assert_eq!((r.status, r.code().as_str()), (409, "invalid_state"), "a pending job is not retried");
    let r = post(&addr, &format!("/jobs/{j0}/retry"), Some(&t), json!({})).await;
    assert_eq!((r.status, r.json()["status"].as_str().unwrap().to_string()), (200, "pending".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_4xx() {
    let (db, _) = fresh_db().await;
    let addr = start_api(db.clone(), open_auth()).await;
    let (_o, t) = org(&db, "a").await;
    let t = Some(t.as_str());
    let (ws, job) = create_ws(&addr, t.unwrap(), json!({"name": "w", "runtime": "echo"})).await;
    let job = job.unwrap();

    let cases: Vec<(&str, String, Option<String>, Option<&str>, u16, &str)> = vec![
        ("POST", "/workspaces".into(), Some("{\"name\": ".into()), None, 400, "invalid_json"),
        ("POST", "/workspaces".into(), Some("[1,2]".into()), None, 400, "invalid_body"),
        ("POST", "/workspaces".into(), Some(json!({"name": "x"}).to_string()), None, 400, "invalid_body"),
        ("POST", "/workspaces".into(), Some(json!({"name": "x", "runtime": "echo", "tierr": 3}).to_string()), None, 400, "invalid_body"),
        ("POST", "/workspaces".into(), Some(json!({"name": "x", "runtime": "echo", "tier": "3"}).to_string()), None, 400, "invalid_body"),
        ("POST", "/workspaces".into(), Some(json!({"name": "x", "runtime": "nope"}).to_string()), None, 400, "invalid_runtime"),
        ("POST", "/workspaces".into(), Some(json!({"name": "  ", "runtime": "echo"}).to_string()), None, 400, "invalid_name"),
        ("POST", "/workspaces".into(), Some(json!({"name": "a\u{7}b", "runtime": "echo"}).to_string()), None, 400, "invalid_name"),
        ("POST", "/workspaces".into(), Some(json!({"name": "x".repeat(201), "runtime": "echo"}).to_string()), None, 400, "invalid_name"),
        ("POST", "/workspaces".into(), Some(json!({"name": "x", "runtime": "echo", "tier": 5}).to_string()), None, 400, "invalid_tier"),
        ("POST", "/workspaces".into(), Some(json!({"name": "x", "runtime": "echo", "tier": 0}).to_string()), None, 400, "invalid_tier"),
        (
            "POST",
            "/workspaces".into(),
            Some(json!({"name": "x", "runtime": "echo", "delivery_mode": "carrier-pigeon"}).to_string()),
            None,
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/workspaces".into(),
            Some(json!({"name": "x", "runtime": "echo", "parent_id": "nope"}).to_string()),
            None,
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/workspaces".into(),
            Some(json!({"name": "x", "runtime": "echo", "parent_id": uuid::Uuid::new_v4()}).to_string()),
            None,
            400,
            "invalid_parent",
        ),
        (
            "POST",
            "/workspaces".into(),
            Some(json!({"name": "x", "runtime": "echo"}).to_string()),
            Some("text/plain"),
            415,
            "unsupported_media_type",
        ),
        ("GET", "/workspaces/not-a-uuid".into(), None, None, 400, "invalid_id"),
        ("GET", format!("/workspaces/{}", uuid::Uuid::new_v4()), None, None, 404, "not_found"),
        ("GET", "/jobs/not-a-ulid".into(), None, None, 400, "invalid_id"),
        ("GET", format!("/jobs/{}", job.to_lowercase()), None, None, 400, "invalid_id"),
        ("GET", "/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV".into(), None, None, 404, "not_found"),
        ("POST", "/jobs/not-a-ulid/cancel".into(), Some("{}".into()), None, 400, "invalid_id"),
        ("GET", "/workspaces?limit=0".into(), None, None, 400, "invalid_query"),
        ("GET", "/workspaces?limit=abc".into(), None, None, 400, "invalid_query"),
        ("GET", "/workspaces?bogus=1".into(), None, None, 400, "invalid_query"),
        ("GET", "/workspaces?cursor=nope".into(), None, None, 400, "invalid_cursor"),
        ("GET", format!("/workspaces?cursor={}", uuid::Uuid::new_v4()), None, None, 400, "invalid_cursor"),
        ("GET", "/jobs?status=exploded".into(), None, None, 400, "invalid_query"),
        ("GET", "/jobs?kind=teleport".into(), None, None, 400, "invalid_query"),
        ("GET", "/jobs?workspace_id=zzz".into(), None, None, 400, "invalid_id"),
        ("GET", "/jobs?cursor=zzz".into(), None, None, 400, "invalid_cursor"),
        ("GET", format!("/workspaces/{ws}/events?limit=500"), None, None, 400, "invalid_query"),
        ("GET", "/no/such/route".into(), None, None, 404, "not_found"),
        ("PUT", "/workspaces".into(), Some("{}".into()), None, 405, "method_not_allowed"),
        ("PATCH", format!("/jobs/{job}"), Some("{}".into()), None, 405, "method_not_allowed"),
        // PostgreSQL stores no NUL in text: a filter with one is the caller's error (X6).
        ("GET", format!("/workspaces/{ws}/activity?type=%00"), None, None, 400, "invalid_text"),
        ("GET", format!("/workspaces/{ws}/activity?source=a%00b"), None, None, 400, "invalid_text"),
    ];
    for (m, path, body, ct, status, code) in cases {
        let r = http(&addr, m, &path, t, body.as_deref(), ct).await;
        assert_eq!(r.status, status, "{m} {path} {body:?}: {}", r.body);
        assert_eq!(r.code(), code, "{m} {path}: {}", r.body);
        assert!(r.json()["detail"].as_str().is_some_and(|d| !d.is_empty()), "{m} {path}: no detail");
    }
    // A NUL in an A2A message: a JSON-RPC error naming the field, nothing stored.
    let nul = json!({"jsonrpc": "2.0", "id": 7, "method": "message/send",
        "params": {"message": {"role": "user", "parts": [{"kind": "text", "text": "a\u{0}b"}]}}});
    let r = post(&addr, &format!("/workspaces/{ws}/a2a"), t, nul).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["data"]["field"], "params.message.parts[0].text", "{}", r.body);
    assert_eq!(count(&db, "SELECT count(*) FROM a2a_queue").await + count(&db, "SELECT count(*) FROM activity_logs").await, 0);
    // Over the 1 MiB body cap.
    let big = json!({"name": "x".repeat(1 << 20), "runtime": "echo"}).to_string();
    let r = http(&addr, "POST", "/workspaces", t, Some(&big), None).await;
    assert_eq!((r.status, r.code().as_str()), (413, "payload_too_large"));
    assert_eq!(count(&db, "SELECT count(*) FROM workspaces").await, 1, "no bad request wrote anything");
    // Every response carries a request id.
    let r = get(&addr, "/healthz", None).await;
    assert!(r.header("x-request-id").is_some_and(|v| v.len() == 26));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_documents_every_route() {
    let (db, _) = fresh_db().await;
    let addr = start_api(db, open_auth()).await;
    let r = get(&addr, "/openapi.json", None).await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    let paths = doc["paths"].as_object().unwrap();
    for (p, m) in [
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/workspaces", "post"),
        ("/workspaces", "get"),
        ("/workspaces/{id}", "get"),
        ("/workspaces/{id}", "delete"),
        ("/workspaces/{id}/restart", "post"),
        ("/workspaces/{id}/events", "get"),
        ("/jobs", "get"),
        ("/jobs/{id}", "get"),
        ("/jobs/{id}/cancel", "post"),
        ("/jobs/{id}/retry", "post"),
        ("/queues", "get"),
        ("/registry/register", "post"),
        ("/registry/heartbeat", "post"),
        ("/workspaces/{id}/rescue", "get"),
        ("/workspaces/{id}/console", "get"),
        ("/workspaces/{id}/exec", "post"),
        ("/admin/workspaces/{id}/bootstrap-failed", "post"),
    ] {
        assert!(paths.get(p).and_then(|x| x.get(m)).is_some(), "{m} {p} is not documented");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_register_and_heartbeat() {
    let (db, _) = fresh_db().await;
    let strict =
        start_api(db.clone(), AuthConfig { admin_token: None, dev: false, org_pin: OrgPin::Any, allow_loopback_agents: false }).await;
    let local = start_api(db.clone(), open_auth()).await;
    let (_o, t) = org(&db, "a").await;
    let (ws, _) = create_ws(&strict, &t, json!({"name": "agent", "runtime": "echo"})).await;
    let mut c = db.acquire().await.unwrap();
    let wt = tokens::create_workspace_token(&mut c, ws.parse().unwrap()).await.unwrap();
    drop(c);

    // Org tokens are not agents.
    let r = post(&strict, "/registry/register", Some(&t), json!({"url": "http://127.0.0.1:9000"})).await;
    assert_eq!(r.status, 403);
    // X5: internal targets are refused; loopback only with the explicit flag.
    for url in ["http://10.0.0.7:8000", "http://169.254.169.254/", "http://192.168.0.2", "ftp://example.com", "http://127.0.0.1:9000"] {
        let r = post(&strict, "/registry/register", Some(&wt), json!({"url": url})).await;
        assert_eq!((r.status, r.code().as_str()), (400, "invalid_url"), "{url}: {}", r.body);
        assert!(!r.body.contains("10.0.0.7"), "the refusal does not echo addresses");
    }
    let r = post(&strict, "/registry/register", Some(&wt), json!({})).await;
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_url"), "push needs a url");
    assert_eq!(get(&strict, &format!("/workspaces/{ws}"), Some(&t)).await.json()["status"], "provisioning", "refusals change nothing");
    let r = post(&local, "/registry/register", Some(&wt), json!({"url": "http://10.0.0.7:8000"})).await;
    assert_eq!(r.status, 400, "the loopback flag does not open private ranges");

    // Lazy heal: no inbound secret yet → minted now and stored.
    let before: Option<String> =
        sqlx::query_scalar("SELECT platform_inbound_secret FROM workspaces WHERE id = $1::uuid").bind(&ws).fetch_one(&db).await.unwrap();
    assert!(before.is_none());
    let r = post(&local, "/registry/register", Some(&wt), json!({"url": "http://127.0.0.1:9000", "agent_card": {"name": "x"}})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["status"], "online");
    assert_eq!(v["delivery_mode"], "push");
    let secret = v["platform_inbound_secret"].as_str().unwrap().to_string();
    let stored: Option<String> =
        sqlx::query_scalar("SELECT platform_inbound_secret FROM workspaces WHERE id = $1::uuid").bind(&ws).fetch_one(&db).await.unwrap();
    assert_eq!(stored.as_deref(), Some(secret.as_str()));
    // Registering again keeps the secret and adds no second online event.
    let again = post(&local, "/registry/register", Some(&wt), json!({"url": "http://127.0.0.1:9000"})).await.json();
    assert_eq!(again["platform_inbound_secret"], secret.as_str());
    let ev = get(&local, &format!("/workspaces/{ws}/events"), Some(&t)).await.json();
    assert_eq!(ev.as_array().unwrap().iter().filter(|e| e["event_type"] == "WORKSPACE_ONLINE").count(), 1);
    let r = post(&local, "/registry/heartbeat", Some(&wt), json!({})).await;
    assert_eq!((r.status, r.json()["status"].as_str().unwrap().to_string()), (200, "online".into()));

    // External workspaces poll: no URL needed; the stored poll mode is kept.
    let (ext, _) = {
        let r = post(&local, "/workspaces", Some(&t), json!({"name": "ext", "runtime": "external"})).await;
        (r.json()["workspace"]["id"].as_str().unwrap().to_string(), ())
    };
    let mut c = db.acquire().await.unwrap();
    let et = tokens::create_workspace_token(&mut c, ext.parse().unwrap()).await.unwrap();
    drop(c);
    let r = post(&strict, "/registry/register", Some(&et), json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["delivery_mode"], "poll");
    assert_eq!(r.json()["status"], "online");
}

/// Issue 8, item 3: the URL the platform assigned to a container it started (recorded as
/// `assigned_url` by the provision job) is trusted from that workspace's token without the
/// loopback flag; every other URL — another port, another workspace's assigned URL, an
/// external agent's loopback URL — still meets X5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_assigned_agent_url_is_trusted_and_nothing_else_is() {
    let (db, _) = fresh_db().await;
    let strict =
        start_api(db.clone(), AuthConfig { admin_token: None, dev: false, org_pin: OrgPin::Any, allow_loopback_agents: false }).await;
    let (_o, t) = org(&db, "a").await;
    let (a, _) = create_ws(&strict, &t, json!({"name": "a", "runtime": "echo"})).await;
    let (b, _) = create_ws(&strict, &t, json!({"name": "b", "runtime": "echo"})).await;
    for (ws, url) in [(&a, "http://127.0.0.1:41001"), (&b, "http://127.0.0.1:41002")] {
        sqlx::query("UPDATE workspaces SET assigned_url = $2 WHERE id = $1::uuid").bind(ws).bind(url).execute(&db).await.unwrap();
    }
    let mut c = db.acquire().await.unwrap();
    let at = tokens::create_workspace_token(&mut c, a.parse().unwrap()).await.unwrap();
    let bt = tokens::create_workspace_token(&mut c, b.parse().unwrap()).await.unwrap();
    drop(c);

    // Refused: a loopback URL that is not A's assigned one, A's URL presented with B's token, and
    // the same port under another name.
    for (tok, url) in [(&at, "http://127.0.0.1:41009"), (&bt, "http://127.0.0.1:41001"), (&at, "http://localhost:41001")] {
        let r = post(&strict, "/registry/register", Some(tok), json!({"url": url})).await;
        assert_eq!((r.status, r.code().as_str()), (400, "invalid_url"), "{url}: {}", r.body);
        assert!(r.json()["detail"].as_str().unwrap().contains("loopback"), "{}", r.body);
    }
    // Trusted: each workspace's own assigned URL with its own token.
    for (ws, tok, url) in [(&a, &at, "http://127.0.0.1:41001"), (&b, &bt, "http://127.0.0.1:41002")] {
        let r = post(&strict, "/registry/register", Some(tok), json!({"url": url, "delivery_mode": "push"})).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["status"], "online");
        let w = get(&strict, &format!("/workspaces/{ws}"), Some(&t)).await.json();
        assert_eq!((w["status"].as_str(), w["url"].as_str()), (Some("online"), Some(url)));
        assert!(w["last_sample_error"].is_null(), "going online clears the refusal: {w}");
    }
    // An external agent has no assigned URL: loopback is refused.
    let r = post(&strict, "/workspaces", Some(&t), json!({"name": "ext", "runtime": "external"})).await;
    let ext = r.json()["workspace"]["id"].as_str().unwrap().to_string();
    let mut c = db.acquire().await.unwrap();
    let et = tokens::create_workspace_token(&mut c, ext.parse().unwrap()).await.unwrap();
    drop(c);
    let r = post(&strict, "/registry/register", Some(&et), json!({"url": "http://127.0.0.1:41001", "delivery_mode": "push"})).await;
    assert_eq!(r.status, 400, "{}", r.body);
}

/// Issue 8, item 4: a refused registration is written on the workspace, once per distinct
/// reason, and a later successful registration clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_registration_says_why_on_the_workspace() {
    let (db, _) = fresh_db().await;
    let strict =
        start_api(db.clone(), AuthConfig { admin_token: None, dev: false, org_pin: OrgPin::Any, allow_loopback_agents: false }).await;
    let (_o, t) = org(&db, "a").await;
    let (ws, _) = create_ws(&strict, &t, json!({"name": "w", "runtime": "echo"})).await;
    let mut c = db.acquire().await.unwrap();
    let wt = tokens::create_workspace_token(&mut c, ws.parse().unwrap()).await.unwrap();
    drop(c);
    let refused = |r: &Resp| r.status == 400 && r.code() == "invalid_url";
    // An agent retrying the same refused URL three times: one event, one message.
    for _ in 0..3 {
        assert!(refused(&post(&strict, "/registry/register", Some(&wt), json!({"url": "http://127.0.0.1:9000"})).await));
    }
    let w = get(&strict, &format!("/workspaces/{ws}"), Some(&t)).await.json();
    assert_eq!(w["status"], "provisioning");
    assert_eq!(
        w["last_sample_error"].as_str(),
        Some("The agent's registration was refused: url refused: the URL resolves to a loopback address.")
    );
    let refusals = |ev: &Value| {
        ev.as_array().unwrap().iter().filter(|e| e["event_type"] == "WORKSPACE_REGISTRATION_REFUSED").cloned().collect::<Vec<_>>()
    };
    let ev = get(&strict, &format!("/workspaces/{ws}/events"), Some(&t)).await.json();
    assert_eq!(refusals(&ev).len(), 1, "{ev}");
    // Another reason is another event; its message names no address.
    assert!(refused(&post(&strict, "/registry/register", Some(&wt), json!({"url": "http://10.1.2.3:9000"})).await));
    let w = get(&strict, &format!("/workspaces/{ws}"), Some(&t)).await.json();
    let msg = w["last_sample_error"].as_str().unwrap();
    assert!(msg.contains("private address") && !msg.contains("10.1.2.3"), "{msg}");
    let ev = get(&strict, &format!("/workspaces/{ws}/events"), Some(&t)).await.json();
    assert_eq!(refusals(&ev).len(), 2, "{ev}");
    // The platform-assigned URL then brings it online and clears the message.
    sqlx::query("UPDATE workspaces SET assigned_url = 'http://127.0.0.1:41077' WHERE id = $1::uuid").bind(&ws).execute(&db).await.unwrap();
    let r = post(&strict, "/registry/register", Some(&wt), json!({"url": "http://127.0.0.1:41077"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let w = get(&strict, &format!("/workspaces/{ws}"), Some(&t)).await.json();
    assert_eq!(w["status"], "online");
    assert!(w["last_sample_error"].is_null(), "{w}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_failed_flips_once_and_queues_one_rescue() {
    let (db, _) = fresh_db().await;
    let admin = "adm1n-token";
    let addr = start_api(
        db.clone(),
        AuthConfig { admin_token: Some(admin.into()), dev: false, org_pin: OrgPin::Any, allow_loopback_agents: false },
    )
    .await;
    let (_o, t) = org(&db, "a").await;
    let (ws, _) = create_ws(&addr, &t, json!({"name": "stuck", "runtime": "echo"})).await;
    let path = format!("/admin/workspaces/{ws}/bootstrap-failed");
    let log = format!(
        "{}\nboot: exporting OPENAI_API_KEY=sk-proj-4fJk29XzQ8LmN0pR7sT1uVwY3aBcDeFgHiJkLmNo\nagent never registered",
        "x".repeat(10_000)
    );
    let body = json!({"error": "agent never registered within 10 min", "log_tail": log});

    assert_eq!(post(&addr, &path, Some(&t), body.clone()).await.status, 401, "org tokens are not admin");
    let r = post(&addr, &path, Some(admin), body.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!((v["flipped"].as_bool(), v["status"].as_str()), (Some(true), Some("failed")));
    let job = v["job_id"].as_str().unwrap().to_string();
    let j = get(&addr, &format!("/jobs/{job}"), Some(&t)).await.json();
    assert_eq!(j["kind"], "rescue_capture");

    let w = get(&addr, &format!("/workspaces/{ws}"), Some(&t)).await.json();
    let sample = w["last_sample_error"].as_str().unwrap();
    assert!(sample.starts_with("agent never registered within 10 min"));
    assert!(sample.len() < 4096 + 1200, "bounded: {} bytes", sample.len());
    assert!(sample.ends_with("agent never registered"), "the tail is the end of the log");
    assert!(!sample.contains("sk-proj-4fJk"), "redacted before it is stored");

    // Idempotent: a second verdict (and one on a non-provisioning workspace) adds nothing.
    let again = post(&addr, &path, Some(admin), body.clone()).await.json();
    assert_eq!((again["flipped"].as_bool(), again["status"].as_str()), (Some(false), Some("failed")));
    let (online, _) = create_ws(&addr, &t, json!({"name": "fine", "runtime": "external"})).await;
    let r = post(&addr, &format!("/admin/workspaces/{online}/bootstrap-failed"), Some(admin), json!({})).await.json();
    assert_eq!((r["flipped"].as_bool(), r["status"].as_str()), (Some(false), Some("awaiting_agent")));
    assert_eq!(count(&db, "SELECT count(*) FROM apalis.jobs WHERE job_type = 'rescue_capture'").await, 1);
    assert_eq!(count(&db, "SELECT count(*) FROM structure_events WHERE event_type = 'WORKSPACE_PROVISION_FAILED'").await, 1);
    let r = post(&addr, &format!("/admin/workspaces/{}/bootstrap-failed", uuid::Uuid::new_v4()), Some(admin), json!({})).await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescue_read_serves_the_latest_bundle_to_its_org_only() {
    let (db, _) = fresh_db().await;
    let addr = start_api(db.clone(), open_auth()).await;
    let (org_a, ta) = org(&db, "a").await;
    let (_b, tb) = org(&db, "b").await;
    let (ws, _) = create_ws(&addr, &ta, json!({"name": "w", "runtime": "echo"})).await;
    let path = format!("/workspaces/{ws}/rescue");
    let r = get(&addr, &path, Some(&ta)).await;
    assert_eq!((r.status, r.code().as_str()), (404, "not_found"), "no bundle yet");
    let big = "y".repeat(100 * 1024);
    sqlx::query(
        "INSERT INTO rescue_bundles (workspace_id, org_id, trigger, captured_at, sections) VALUES \
         ($1::uuid, $2, 'provision_timeout', now() - interval '1 hour', '{\"docker_ps\": \"old\"}'), \
         ($1::uuid, $2, 'bootstrap_failed', now(), jsonb_build_object('docker_ps', 'new', 'agent_logs', $3::text))",
    )
    .bind(&ws)
    .bind(org_a.0)
    .bind(&big)
    .execute(&db)
    .await
    .unwrap();
    let r = get(&addr, &path, Some(&ta)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["trigger"], "bootstrap_failed");
    assert_eq!(v["sections"]["docker_ps"], "new");
    assert_eq!(v["sections"]["agent_logs"].as_str().unwrap().len(), 64 * 1024, "sections are capped at 64 KiB");
    let r = get(&addr, &path, Some(&tb)).await;
    assert_eq!(r.status, 404, "another org sees nothing");
    // A8: no instance yet: 409; a Docker container (started, no instance id): a clear 501
    // (after the same org check).
    let r = get(&addr, &format!("/workspaces/{ws}/console"), Some(&ta)).await;
    assert_eq!((r.status, r.code().as_str()), (409, "no_instance_yet"), "{}", r.body);
    sqlx::query("UPDATE workspaces SET container_name = 'ws-x' WHERE id = $1::uuid").bind(&ws).execute(&db).await.unwrap();
    let r = get(&addr, &format!("/workspaces/{ws}/console"), Some(&ta)).await;
    assert_eq!((r.status, r.code().as_str()), (501, "not_implemented"));
    assert!(r.json()["detail"].as_str().unwrap().contains("Docker"));
    assert_eq!(get(&addr, &format!("/workspaces/{ws}/console"), Some(&tb)).await.status, 404);
    // A bundle row of another org for this workspace id is never served (strict org_id = $2).
    sqlx::query("DELETE FROM rescue_bundles").execute(&db).await.unwrap();
    let other: uuid::Uuid = sqlx::query_scalar("SELECT id FROM organizations WHERE name = 'b'").fetch_one(&db).await.unwrap();
    sqlx::query("INSERT INTO rescue_bundles (workspace_id, org_id, trigger, sections) VALUES ($1::uuid, $2, 'bootstrap_failed', '{}')")
        .bind(&ws)
        .bind(other)
        .execute(&db)
        .await
        .unwrap();
    assert_eq!(get(&addr, &path, Some(&ta)).await.status, 404);
}

/// Issue 12: a failure's detail is for operators (`GET /admin/jobs/:id`), never in the
/// tenant's view of the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failures_detail_is_shown_to_operators_only() {
    let (db, _) = fresh_db().await;
    let admin = "adm1n-token";
    let addr = start_api(
        db.clone(),
        AuthConfig { admin_token: Some(admin.into()), dev: false, org_pin: OrgPin::Any, allow_loopback_agents: false },
    )
    .await;
    let (_o, t) = org(&db, "a").await;
    let (_ws, job) = create_ws(&addr, &t, json!({"name": "w", "runtime": "echo"})).await;
    let job = job.unwrap();
    // What the runtime writes for a failed attempt (jobs::runtime::acker).
    sqlx::query("UPDATE apalis.jobs SET status = 'Killed', outcome = 'dead', last_error = $2, last_error_detail = $3 WHERE id = $1")
        .bind(&job)
        .bind(molecule_jobs::failures::public("image_missing"))
        .bind("image_missing: image registry.internal:5000/workspace-template-echo:latest is not available")
        .execute(&db)
        .await
        .unwrap();
    let tenant = get(&addr, &format!("/jobs/{job}"), Some(&t)).await;
    assert_eq!(tenant.status, 200);
    assert!(!tenant.body.contains("registry.internal") && !tenant.body.contains("last_error_detail"), "{}", tenant.body);
    assert!(tenant.json()["last_error"].as_str().unwrap().starts_with("image_missing: "));
    assert_eq!(get(&addr, &format!("/admin/jobs/{job}"), Some(&t)).await.status, 401, "org tokens are not admin");
    let op = get(&addr, &format!("/admin/jobs/{job}"), Some(admin)).await;
    assert_eq!(op.status, 200, "{}", op.body);
    assert!(op.json()["last_error_detail"].as_str().unwrap().contains("registry.internal:5000"));
    assert_eq!(op.json()["id"], job.as_str());
}
