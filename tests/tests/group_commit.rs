//! Group commit on the enqueuing routes (issue 15, api/src/batch.rs): requests that wait
//! for a lane share one transaction, and each still gets its own answer (A1, A5, X1).
//! Real PostgreSQL, the real HTTP server. Every lane is held inside a batch by a table
//! lock the test takes, so which requests share a batch is known, not hoped for.

use molecule_api::AppState;
use molecule_domain::{OrgId, tokens};
use molecule_tests::{Resp, eventually, fresh_db, http, open_auth};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::collections::HashSet;
use std::time::Duration;

/// The server, its batches allowed to wait a minute for a lock: the tests below hold
/// them on one on purpose, for as long as a slow machine takes to line requests up.
async fn start(db: &PgPool) -> (String, AppState) {
    start_waiting(db, Duration::from_secs(60)).await
}

async fn start_waiting(db: &PgPool, lock_wait: Duration) -> (String, AppState) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let state = AppState::with_limits(db.clone(), open_auth(), molecule_api::streams::DEFAULT_STREAMS_PER_ORG, lock_wait);
    tokio::spawn(molecule_api::serve_with(listener, state.clone(), std::future::pending(), Default::default()));
    (addr, state)
}

async fn org(db: &PgPool, name: &str) -> (OrgId, String) {
    let mut c = db.acquire().await.unwrap();
    tokens::create_org(&mut c, name).await.unwrap()
}

async fn workspace(db: &PgPool, org: OrgId, tier: i16, status: &str) -> uuid::Uuid {
    sqlx::query_scalar(
        "INSERT INTO workspaces (org_id, name, runtime, tier, status) VALUES ($1, 'w', 'echo', $2, $3::workspace_status) RETURNING id",
    )
    .bind(org.0)
    .bind(tier)
    .bind(status)
    .fetch_one(db)
    .await
    .unwrap()
}

fn post(addr: &str, path: String, t: &str, body: Value) -> tokio::task::JoinHandle<Resp> {
    let (addr, t) = (addr.to_string(), t.to_string());
    tokio::spawn(async move { http(&addr, "POST", &path, Some(&t), Some(&body.to_string()), None).await })
}

async fn lock_waiters(db: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE relation = $1::regclass AND NOT granted \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind(table)
    .fetch_one(db)
    .await
    .unwrap()
}

/// Takes `table` against writes, then sends `lane_request` once per lane, each after the
/// one before waits on the lock: every lane is then inside a batch of its own, and what
/// is sent next waits for a lane. Commit the blocker to let them all run.
async fn hold_every_lane(
    db: &PgPool,
    table: &str,
    lane_request: impl Fn() -> tokio::task::JoinHandle<Resp>,
) -> (sqlx::Transaction<'static, sqlx::Postgres>, Vec<tokio::task::JoinHandle<Resp>>) {
    hold_every_lane_in(db, table, "SHARE", lane_request).await
}

/// [`hold_every_lane`] with the lock `mode` (ACCESS EXCLUSIVE holds readers too).
async fn hold_every_lane_in(
    db: &PgPool,
    table: &str,
    mode: &str,
    lane_request: impl Fn() -> tokio::task::JoinHandle<Resp>,
) -> (sqlx::Transaction<'static, sqlx::Postgres>, Vec<tokio::task::JoinHandle<Resp>>) {
    let mut blocker = db.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("LOCK TABLE {table} IN {mode} MODE"))).execute(&mut *blocker).await.unwrap();
    let mut held = Vec::new();
    for n in 1..=molecule_api::batch::lanes() as i64 {
        held.push(lane_request());
        eventually(Duration::from_secs(10), "a lane waits on the lock", || async { (lock_waiters(db, table).await >= n).then_some(()) })
            .await;
    }
    (blocker, held)
}

async fn xmin(db: &PgPool, sql: &str, id: &str) -> String {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string())).bind(id).fetch_one(db).await.unwrap()
}

async fn job_xmin(db: &PgPool, job: &str) -> String {
    xmin(db, "SELECT xmin::text FROM apalis.jobs WHERE id = $1", job).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execs_waiting_for_a_lane_share_one_transaction_and_each_gets_its_own_answer() {
    let (db, _) = fresh_db().await;
    let (addr, state) = start(&db).await;
    let (a, t) = org(&db, "a").await;
    let (b, _) = org(&db, "b").await;
    let online = workspace(&db, a, 3, "online").await;
    let degraded = workspace(&db, a, 4, "degraded").await;
    let low_tier = workspace(&db, a, 2, "online").await;
    let starting = workspace(&db, a, 3, "provisioning").await;
    let removed = workspace(&db, a, 3, "removed").await;
    let theirs = workspace(&db, b, 3, "online").await;
    let exec = |ws: uuid::Uuid| post(&addr, format!("/workspaces/{ws}/exec"), &t, json!({"argv": ["true"], "timeout_s": 7}));

    let (blocker, held) = hold_every_lane(&db, "apalis.jobs", || exec(online)).await;
    let cases = [
        (online, 202, ""),
        (low_tier, 403, "forbidden"),
        (degraded, 202, ""),
        (starting, 409, "workspace_not_running"),
        (theirs, 404, "not_found"),
        (removed, 404, "not_found"),
        (uuid::Uuid::new_v4(), 404, "not_found"),
        (online, 202, ""),
    ];
    let batch: Vec<_> = cases.iter().map(|(ws, ..)| exec(*ws)).collect();
    eventually(Duration::from_secs(10), "the batch waits for a lane", || async { (state.execs.waiting() == cases.len()).then_some(()) })
        .await;
    blocker.commit().await.unwrap();

    let mut lone = HashSet::new();
    for h in held {
        let r = h.await.unwrap();
        assert_eq!(r.status, 202, "{}", r.body);
        lone.insert(job_xmin(&db, r.json()["job_id"].as_str().unwrap()).await);
    }
    assert_eq!(lone.len(), molecule_api::batch::lanes(), "each lane's first request committed alone");
    let mut together = HashSet::new();
    for ((ws, status, code), h) in cases.iter().zip(batch) {
        let r = h.await.unwrap();
        assert_eq!(r.status, *status, "exec in {ws}: {}", r.body);
        if *status != 202 {
            assert_eq!(r.code(), *code, "exec in {ws}");
            continue;
        }
        let v = r.json();
        assert_eq!(v["timeout_s"], 7);
        let job = v["job_id"].as_str().unwrap();
        let (kind, of): (String, uuid::Uuid) =
            sqlx::query_as("SELECT job_type, workspace_id FROM apalis.jobs WHERE id = $1").bind(job).fetch_one(&db).await.unwrap();
        assert_eq!((kind.as_str(), of), ("exec", *ws), "the answer names this request's own job");
        together.insert(job_xmin(&db, job).await);
    }
    assert_eq!(together.len(), 1, "the requests that waited committed in one transaction");
    assert!(together.is_disjoint(&lone));
    let refused: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE workspace_id = ANY($1)")
        .bind(vec![low_tier, starting, removed, theirs])
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(refused, 0, "a refused exec queues nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_waiting_for_a_lane_share_one_transaction_and_a_failing_one_fails_alone() {
    let (db, _) = fresh_db().await;
    let (addr, state) = start(&db).await;
    let (a, t) = org(&db, "a").await;
    let (b, _) = org(&db, "b").await;
    let parent = workspace(&db, a, 2, "online").await;
    let theirs = workspace(&db, b, 2, "online").await;
    let create = |body: Value| post(&addr, "/workspaces".into(), &t, body);
    let lane = || create(json!({"name": "lane", "runtime": "echo"}));

    // Round 1: everything in the batch can be written — one transaction for all of it.
    let (blocker, held) = hold_every_lane(&db, "workspaces", lane).await;
    let bodies = [
        (json!({"name": "one", "runtime": "echo", "tier": 3}), 202),
        (json!({"name": "child", "runtime": "echo", "parent_id": parent}), 202),
        (json!({"name": "orphan", "runtime": "echo", "parent_id": theirs}), 400),
        (json!({"name": "ext", "runtime": "external"}), 202),
        (json!({"name": "two", "runtime": "echo", "delivery_mode": "poll"}), 202),
    ];
    let batch: Vec<_> = bodies.iter().map(|(body, _)| create(body.clone())).collect();
    eventually(Duration::from_secs(10), "the batch waits for a lane", || async { (state.creates.waiting() == bodies.len()).then_some(()) })
        .await;
    blocker.commit().await.unwrap();
    for h in held {
        assert_eq!(h.await.unwrap().status, 202);
    }
    let mut together = HashSet::new();
    for ((body, status), h) in bodies.iter().zip(batch) {
        let r = h.await.unwrap();
        assert_eq!(r.status, *status, "{body}: {}", r.body);
        if *status != 202 {
            assert_eq!(r.code(), "invalid_parent");
            continue;
        }
        let v = r.json();
        let ws = v["workspace"]["id"].as_str().unwrap();
        assert_eq!(v["workspace"]["name"], body["name"], "the answer is this request's own workspace");
        assert_eq!(v["workspace"]["parent_id"], body.get("parent_id").cloned().unwrap_or(Value::Null));
        assert_eq!(v["workspace"]["tier"], body.get("tier").cloned().unwrap_or(json!(2)));
        let external = body["runtime"] == "external";
        assert_eq!(v["workspace"]["delivery_mode"], if external || body["name"] == "two" { "poll" } else { "push" });
        assert_eq!(v["job_id"].is_null(), external, "{body}: a provision job unless external");
        together.insert(xmin(&db, "SELECT xmin::text FROM workspaces WHERE id = $1::uuid", ws).await);
        let event: (String, Option<String>) = sqlx::query_as(
            "SELECT xmin::text, payload->>'job_id' FROM structure_events WHERE workspace_id = $1::uuid AND event_type = 'WORKSPACE_CREATED'",
        )
        .bind(ws)
        .fetch_one(&db)
        .await
        .unwrap();
        assert_eq!(event.1.as_deref(), v["job_id"].as_str(), "the event names the workspace's own job");
        together.insert(event.0);
        if let Some(job) = v["job_id"].as_str() {
            let of: uuid::Uuid =
                sqlx::query_scalar("SELECT workspace_id FROM apalis.jobs WHERE id = $1").bind(job).fetch_one(&db).await.unwrap();
            assert_eq!(of.to_string(), ws);
            together.insert(job_xmin(&db, job).await);
        }
    }
    assert_eq!(together.len(), 1, "rows, events and jobs of the waiting requests committed in one transaction");
    let orphans: i64 = sqlx::query_scalar("SELECT count(*) FROM workspaces WHERE name = 'orphan'").fetch_one(&db).await.unwrap();
    assert_eq!(orphans, 0);

    // Round 2: one request in the batch is refused by the database — it fails alone and
    // the others still commit, each in a transaction of its own.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_doomed() RETURNS trigger AS $$ BEGIN
             IF NEW.name = 'doomed' THEN RAISE EXCEPTION 'injected'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql;
         CREATE TRIGGER refuse_doomed BEFORE INSERT ON workspaces FOR EACH ROW EXECUTE FUNCTION refuse_doomed();",
    )
    .execute(&db)
    .await
    .unwrap();
    let (blocker, held) = hold_every_lane(&db, "workspaces", lane).await;
    let names = ["g1", "doomed", "g2"];
    let batch: Vec<_> = names.iter().map(|n| create(json!({"name": n, "runtime": "echo"}))).collect();
    eventually(Duration::from_secs(10), "the batch waits for a lane", || async { (state.creates.waiting() == names.len()).then_some(()) })
        .await;
    blocker.commit().await.unwrap();
    for h in held {
        assert_eq!(h.await.unwrap().status, 202);
    }
    let mut alone = HashSet::new();
    for (name, h) in names.iter().zip(batch) {
        let r = h.await.unwrap();
        if *name == "doomed" {
            assert_eq!((r.status, r.code()), (500, "internal".to_string()), "{}", r.body);
            assert!(!r.body.contains("injected"), "no internals in the response");
            continue;
        }
        assert_eq!(r.status, 202, "{name}: {}", r.body);
        let v = r.json();
        let ws = v["workspace"]["id"].as_str().unwrap();
        alone.insert(xmin(&db, "SELECT xmin::text FROM workspaces WHERE id = $1::uuid", ws).await);
        assert!(v["job_id"].is_string());
    }
    assert_eq!(alone.len(), 2, "after the batch failed, g1 and g2 committed apart");
    let doomed: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM workspaces WHERE name = 'doomed') \
              + (SELECT count(*) FROM structure_events e WHERE NOT EXISTS (SELECT 1 FROM workspaces w WHERE w.id = e.workspace_id)) \
              + (SELECT count(*) FROM apalis.jobs j WHERE NOT EXISTS (SELECT 1 FROM workspaces w WHERE w.id = j.workspace_id))",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(doomed, 0, "nothing of the refused request was written");
}

/// X1, X2: lookups that wait for a lane share one statement, and each token still
/// authenticates its own owner — or nobody (revoked, its workspace removed, unknown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_lookups_waiting_for_a_lane_share_one_statement_and_each_finds_its_own_owner() {
    let (db, _) = fresh_db().await;
    let (addr, state) = start(&db).await;
    let (a, ta) = org(&db, "a").await;
    let (b, tb) = org(&db, "b").await;
    let ws_a = workspace(&db, a, 2, "online").await;
    let ws_a2 = workspace(&db, a, 2, "online").await;
    let ws_b = workspace(&db, b, 2, "online").await;
    let gone = workspace(&db, a, 2, "online").await;
    let mut c = db.acquire().await.unwrap();
    let tw = tokens::create_workspace_token(&mut c, molecule_domain::WorkspaceId(ws_a)).await.unwrap();
    let t_gone = tokens::create_workspace_token(&mut c, molecule_domain::WorkspaceId(gone)).await.unwrap();
    let (revoked_id, t_revoked) = tokens::create_org_token(&mut c, a, Some("old")).await.unwrap();
    sqlx::query("UPDATE org_tokens SET revoked_at = now() WHERE id = $1").bind(revoked_id).execute(&mut *c).await.unwrap();
    sqlx::query("UPDATE workspaces SET status = 'removed' WHERE id = $1").bind(gone).execute(&mut *c).await.unwrap();
    let unknown = tokens::mint_org_token().secret;
    let read = |t: &str, ws: uuid::Uuid| {
        let (addr, t) = (addr.clone(), t.to_string());
        tokio::spawn(async move { http(&addr, "GET", &format!("/workspaces/{ws}"), Some(&t), None, None).await })
    };

    let (blocker, held) = hold_every_lane_in(&db, "org_tokens", "ACCESS EXCLUSIVE", || read(&ta, ws_a)).await;
    let cases = [
        (&ta, ws_a, 200),
        (&tb, ws_a, 404),
        (&tb, ws_b, 200),
        (&tw, ws_a, 200),
        (&tw, ws_a2, 404),
        (&ta, ws_b, 404),
        (&t_revoked, ws_a, 401),
        (&t_gone, gone, 401),
        (&unknown, ws_a, 401),
        (&ta, ws_a2, 200),
    ];
    let batch: Vec<_> = cases.iter().map(|(t, ws, _)| read(t, *ws)).collect();
    eventually(Duration::from_secs(10), "the lookups wait for a lane", || async { (state.tokens.waiting() == cases.len()).then_some(()) })
        .await;
    blocker.commit().await.unwrap();
    for h in held {
        assert_eq!(h.await.unwrap().status, 200);
    }
    for (i, ((_, ws, status), h)) in cases.iter().zip(batch).enumerate() {
        let r = h.await.unwrap();
        assert_eq!(r.status, *status, "case {i}, workspace {ws}: {}", r.body);
        if *status == 200 {
            assert_eq!(r.json()["id"], ws.to_string());
        }
    }
}

/// An exec does not wait for its workspace's row (its activity mark skips a row another
/// transaction holds, here open and idle): with one lane, that wait would hold up every
/// exec of every org.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_does_not_wait_for_its_workspaces_row() {
    let (db, _) = fresh_db().await;
    let (addr, _state) = start_waiting(&db, Duration::from_secs(30)).await;
    let (a, t) = org(&db, "a").await;
    let ws = workspace(&db, a, 3, "online").await;
    let mut holder = db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM workspaces WHERE id = $1 FOR UPDATE").bind(ws).execute(&mut *holder).await.unwrap();
    let began = std::time::Instant::now();
    let r = post(&addr, format!("/workspaces/{ws}/exec"), &t, json!({"argv": ["true"]})).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(began.elapsed() < Duration::from_secs(10), "answered without waiting out the row: {:?}", began.elapsed());
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE workspace_id = $1").bind(ws).fetch_one(&db).await.unwrap();
    assert_eq!(queued, 1);
    holder.rollback().await.unwrap();
}

/// A batch waits at most its lock wait (`batch::LOCK_WAIT`, here two seconds) for a lock,
/// here the job table's, held by an idle transaction as a migration would: its callers
/// get 503 `busy` and nothing is queued, and the lane goes on to the next batch, which
/// commits once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_gives_up_on_a_held_lock_and_the_lane_goes_on() {
    let (db, _) = fresh_db().await;
    let (addr, _state) = start_waiting(&db, Duration::from_secs(2)).await;
    let (a, t) = org(&db, "a").await;
    let first_ws = workspace(&db, a, 3, "online").await;
    let other = workspace(&db, a, 3, "online").await;
    let exec = |ws: uuid::Uuid| post(&addr, format!("/workspaces/{ws}/exec"), &t, json!({"argv": ["true"]}));

    let mut holder = db.begin().await.unwrap();
    sqlx::query("LOCK TABLE apalis.jobs IN SHARE MODE").execute(&mut *holder).await.unwrap();
    let began = std::time::Instant::now();
    let blocked = exec(first_ws);
    eventually(Duration::from_secs(10), "the batch waits on the lock", || async {
        (lock_waiters(&db, "apalis.jobs").await >= 1).then_some(())
    })
    .await;
    let behind = exec(other);

    let r = blocked.await.unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.code(), "busy");
    let waited = began.elapsed();
    assert!(waited >= Duration::from_millis(1900), "gave up after the lock wait, not before: {waited:?}");
    assert!(waited < Duration::from_secs(10), "and not much later: {waited:?}");
    // The next batch (the exec behind) may be waiting on the lock already, for two
    // seconds at most: let it go.
    holder.rollback().await.unwrap();
    let r = behind.await.unwrap();
    assert_eq!(r.status, 202, "the lane went on: {}", r.body);
    let queued: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT workspace_id FROM apalis.jobs WHERE job_type = 'exec'").fetch_all(&db).await.unwrap();
    assert_eq!(queued, vec![other], "the exec that gave up queued nothing");
}

/// A batch of several that gives up on a lock answers `busy` to each at once: it is not
/// run again one request at a time (each would wait out the lock again, the lane held
/// all along). Three seconds of lock wait: the pair's batch starts when the first gives
/// up (3 s) and ends one wait later (6 s); run again one by one it would end at 9 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_several_that_gave_up_on_a_lock_is_answered_once() {
    let (db, _) = fresh_db().await;
    let (addr, state) = start_waiting(&db, Duration::from_secs(3)).await;
    let (a, t) = org(&db, "a").await;
    let ws: Vec<uuid::Uuid> =
        vec![workspace(&db, a, 3, "online").await, workspace(&db, a, 3, "online").await, workspace(&db, a, 3, "online").await];
    let exec = |ws: uuid::Uuid| post(&addr, format!("/workspaces/{ws}/exec"), &t, json!({"argv": ["true"]}));

    let mut holder = db.begin().await.unwrap();
    sqlx::query("LOCK TABLE apalis.jobs IN SHARE MODE").execute(&mut *holder).await.unwrap();
    let began = std::time::Instant::now();
    let first = exec(ws[0]);
    eventually(Duration::from_secs(10), "the first batch waits on the lock", || async {
        (lock_waiters(&db, "apalis.jobs").await >= 1).then_some(())
    })
    .await;
    let pair = [exec(ws[1]), exec(ws[2])];
    eventually(Duration::from_secs(10), "the pair waits for the lane", || async { (state.execs.waiting() == 2).then_some(()) }).await;
    assert_eq!(first.await.unwrap().code(), "busy");
    for h in pair {
        let r = h.await.unwrap();
        assert_eq!((r.status, r.code().as_str()), (503, "busy"), "{}", r.body);
    }
    let took = began.elapsed();
    assert!(took >= Duration::from_millis(5900), "the pair waited out a lock wait of its own: {took:?}");
    assert!(took < Duration::from_millis(7500), "one wait for the pair, not one each: {took:?}");
    holder.rollback().await.unwrap();
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE job_type = 'exec'").fetch_one(&db).await.unwrap();
    assert_eq!(queued, 0, "none of them queued anything");
}
