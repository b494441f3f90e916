//! Job core against a real PostgreSQL, with the runtime in this process (SPEC §4, J7, A13, A14).

use chrono::{DateTime, Utc};
use molecule_domain::JobId;
use molecule_jobs::status::{self, Transition};
use molecule_jobs::{
    JobError, JobKind, JobStatus, NewJob, PoolSpec, RetryPolicy, Runtime, RuntimeConfig, enqueue, handler_fn, typed_handler,
};
use molecule_tests::{eventually, fresh_db};
use serde_json::json;
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn cfg() -> RuntimeConfig {
    RuntimeConfig {
        lease: Duration::from_secs(30),
        heartbeat: Duration::from_secs(5),
        poll_interval: Duration::from_millis(500),
        grace: Duration::from_secs(5),
        batch: 50,
        node: "test".into(),
        ..Default::default()
    }
}

fn policy(base_ms: u64) -> RetryPolicy {
    RetryPolicy { base: Duration::from_millis(base_ms), cap: Duration::from_secs(30), max_attempts: 10 }
}

async fn push(db: &PgPool, job: NewJob) -> JobId {
    let mut conn = db.acquire().await.unwrap();
    enqueue(&mut conn, &job).await.unwrap()
}

async fn wait_status(db: &PgPool, id: &JobId, want: JobStatus, within: Duration) -> status::JobView {
    eventually(within, &format!("job {id} to be {want:?}"), || async { status::get(db, id).await.unwrap().filter(|v| v.status == want) })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_follows_the_callers_transaction() {
    let (db, _) = fresh_db().await;
    let mut tx = db.begin().await.unwrap();
    let rolled_back = enqueue(&mut tx, &NewJob::to_queue("q", &json!({"n": 1}))).await.unwrap();
    tx.rollback().await.unwrap();
    assert!(status::get(&db, &rolled_back).await.unwrap().is_none(), "rolled-back enqueue left a job");

    let mut tx = db.begin().await.unwrap();
    let committed = enqueue(&mut tx, &NewJob::to_queue("q", &json!({"n": 2}))).await.unwrap();
    // Not visible to others before commit.
    assert!(status::get(&db, &committed).await.unwrap().is_none());
    tx.commit().await.unwrap();
    let v = status::get(&db, &committed).await.unwrap().expect("committed job visible by id");
    assert_eq!(v.status, JobStatus::Pending);
    assert_eq!(v.kind, "q");
    assert!(committed.as_str().parse::<JobId>().is_ok(), "ids are ULIDs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_returns_the_first_job() {
    let (db, _) = fresh_db().await;
    let a = push(&db, NewJob::to_queue("q", &json!({})).idempotency_key("tick:1")).await;
    let b = push(&db, NewJob::to_queue("q", &json!({})).idempotency_key("tick:1")).await;
    let c = push(&db, NewJob::to_queue("q", &json!({})).idempotency_key("tick:2")).await;
    assert_eq!(a, b);
    assert_ne!(a, c);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs").fetch_one(&db).await.unwrap();
    assert_eq!(n, 2);
}

fn started_ats(v: &status::JobView) -> Vec<DateTime<Utc>> {
    let mut out: Vec<DateTime<Utc>> =
        v.attempt_log.as_array().unwrap().iter().map(|e| e["started_at"].as_str().unwrap().parse().unwrap()).collect();
    out.push(v.started_at.unwrap());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_twice_then_succeeds_with_growing_persisted_backoff() {
    let (db, _) = fresh_db().await;
    let base = 300;
    let handler = handler_fn(|ctx| async move {
        if ctx.attempt <= 2 { Err(JobError::retryable("test", format!("boom {}", ctx.attempt))) } else { Ok(json!({"ok": ctx.attempt})) }
    });
    let rt = Runtime::start(db.clone(), cfg(), vec![PoolSpec::new("flaky", 2, policy(base), handler)]);
    let id = push(&db, NewJob::to_queue("flaky", &json!({})).max_attempts(5)).await;
    let v = wait_status(&db, &id, JobStatus::Succeeded, Duration::from_secs(20)).await;
    rt.shutdown().await;

    assert_eq!(v.attempts, 3);
    assert_eq!(v.result, Some(json!({"ok": 3})));
    assert_eq!(v.attempt_log.as_array().unwrap().len(), 2);
    assert_eq!(v.attempt_log[1]["error"], molecule_jobs::failures::public("test"), "tenants read the code, not the detail");
    assert_eq!(status::error_detail(&db, &id).await.unwrap().as_deref(), Some("test: boom 2"), "operators read the detail");
    let starts = started_ats(&v);
    let gap1 = (starts[1] - starts[0]).num_milliseconds();
    let gap2 = (starts[2] - starts[1]).num_milliseconds();
    assert!(gap1 >= base as i64, "first retry after {gap1} ms < base {base} ms");
    assert!(gap2 > gap1, "backoff did not grow: {gap1} ms then {gap2} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_run_out_and_the_job_is_dead() {
    let (db, _) = fresh_db().await;
    let handler = handler_fn(|_ctx| async { Err(JobError::retryable("test", "always")) });
    let rt = Runtime::start(db.clone(), cfg(), vec![PoolSpec::new("doomed", 1, policy(50), handler)]);
    let id = push(&db, NewJob::to_queue("doomed", &json!({})).max_attempts(3)).await;
    let v = wait_status(&db, &id, JobStatus::Dead, Duration::from_secs(20)).await;
    rt.shutdown().await;
    assert_eq!(v.attempts, 3);
    assert!(v.last_error.unwrap().starts_with("test: "));
    assert!(v.finished_at.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_expires_at_ends_expired_without_running() {
    let (db, _) = fresh_db().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let handler = handler_fn(move |_ctx| {
        let r = r.clone();
        async move {
            r.fetch_add(1, Ordering::SeqCst);
            Ok(json!(null))
        }
    });
    let rt = Runtime::start(db.clone(), cfg(), vec![PoolSpec::new("ttl", 2, policy(100), handler)]);
    let expired = push(&db, NewJob::to_queue("ttl", &json!({})).expires_at(Utc::now() - chrono::Duration::seconds(5))).await;
    let fresh = push(&db, NewJob::to_queue("ttl", &json!({})).expires_at(Utc::now() + chrono::Duration::hours(1))).await;
    let v = wait_status(&db, &expired, JobStatus::Expired, Duration::from_secs(10)).await;
    wait_status(&db, &fresh, JobStatus::Succeeded, Duration::from_secs(10)).await;
    rt.shutdown().await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "only the unexpired job ran");
    assert!(v.last_error.unwrap().contains("expired"));
}

#[derive(serde::Deserialize)]
struct Args {
    #[allow(dead_code)]
    n: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_payload_fails_and_the_pool_goes_on() {
    let (db, _) = fresh_db().await;
    let handler = typed_handler(|_ctx, a: Args| async move { Ok(json!({"n": a.n})) });
    let rt = Runtime::start(db.clone(), cfg(), vec![PoolSpec::new("typed", 2, policy(100), handler)]);
    let mut bad = NewJob::to_queue("typed", &json!({}));
    bad.payload = b"\xff not json at all".to_vec();
    let bad = push(&db, bad).await;
    let wrong_shape = push(&db, NewJob::to_queue("typed", &json!({"n": "seven"}))).await;
    let good = push(&db, NewJob::to_queue("typed", &json!({"n": 7}))).await;
    let b = wait_status(&db, &bad, JobStatus::Failed, Duration::from_secs(10)).await;
    let w = wait_status(&db, &wrong_shape, JobStatus::Failed, Duration::from_secs(10)).await;
    let g = wait_status(&db, &good, JobStatus::Succeeded, Duration::from_secs(10)).await;
    // The pool still takes new work after the bad ones.
    let later = push(&db, NewJob::to_queue("typed", &json!({"n": 8}))).await;
    wait_status(&db, &later, JobStatus::Succeeded, Duration::from_secs(10)).await;
    rt.shutdown().await;
    assert_eq!(b.attempts, 1, "an undecodable payload is not retried");
    assert!(b.last_error.unwrap().starts_with("undecodable_payload: "));
    assert!(w.last_error.unwrap().starts_with("undecodable_payload: "));
    assert_eq!(g.result, Some(json!({"n": 7})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_the_attempt_not_the_pool() {
    let (db, _) = fresh_db().await;
    let handler = handler_fn(|ctx| async move {
        if ctx.attempt == 1 {
            panic!("handler bug");
        }
        Ok(json!("recovered"))
    });
    let rt = Runtime::start(db.clone(), cfg(), vec![PoolSpec::new("panicky", 1, policy(50), handler)]);
    let id = push(&db, NewJob::to_queue("panicky", &json!({})).max_attempts(3)).await;
    let v = wait_status(&db, &id, JobStatus::Succeeded, Duration::from_secs(10)).await;
    rt.shutdown().await;
    assert_eq!(v.attempts, 2);
    assert!(v.attempt_log[0]["error"].as_str().unwrap().starts_with("handler_panicked: "));
}

/// A snooze (SPEC §4: a turn to wait for, not a failure) puts the job back due after its
/// delay with the attempt refunded: two snoozes of a job with one attempt, then it runs
/// and succeeds as attempt 1, nothing in its attempt log. Meanwhile it reads as scheduled,
/// its last error saying why it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snoozed_job_runs_again_after_the_delay_without_using_an_attempt() {
    let (db, _) = fresh_db().await;
    let snooze = Duration::from_millis(1200);
    let runs = Arc::new(std::sync::Mutex::new(Vec::<(std::time::Instant, i32)>::new()));
    let r = runs.clone();
    let handler = handler_fn(move |ctx| {
        let r = r.clone();
        async move {
            let n = {
                let mut runs = r.lock().unwrap();
                runs.push((std::time::Instant::now(), ctx.attempt));
                runs.len()
            };
            if n <= 2 { Err(JobError::snooze(snooze, "restart_in_progress", format!("held ({n})"))) } else { Ok(json!({"ran": n})) }
        }
    });
    let rt = Runtime::start(db.clone(), cfg(), vec![PoolSpec::new("sleepy", 1, policy(50), handler)]);
    let id = push(&db, NewJob::to_queue("sleepy", &json!({})).max_attempts(1)).await;
    let waiting = wait_status(&db, &id, JobStatus::Scheduled, Duration::from_secs(10)).await;
    assert_eq!(waiting.attempts, 0, "the snoozed attempt is refunded");
    assert!(waiting.last_error.as_deref().is_some_and(|e| e.starts_with("restart_in_progress: ")), "{:?}", waiting.last_error);
    let v = wait_status(&db, &id, JobStatus::Succeeded, Duration::from_secs(20)).await;
    rt.shutdown().await;
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 3);
    assert!(runs.iter().all(|(_, attempt)| *attempt == 1), "every run is attempt 1: {runs:?}");
    for w in runs.windows(2) {
        let gap = w[1].0 - w[0].0;
        assert!(gap >= snooze, "ran again after {gap:?}, before its snooze of {snooze:?} was over");
    }
    assert_eq!((v.attempts, v.result), (1, Some(json!({"ran": 3}))));
    assert_eq!(v.attempt_log.as_array().map(Vec::len), Some(0), "a snooze is no failed attempt");
}

/// A job that snoozes for ever still ends when its `expires_at` passes (at claim time,
/// as any other job).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_snoozing_past_its_expiry_ends_expired() {
    let (db, _) = fresh_db().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let handler = handler_fn(move |_ctx| {
        r.fetch_add(1, Ordering::SeqCst);
        async { Err(JobError::snooze(Duration::from_millis(300), "restart_in_progress", "held")) }
    });
    let rt = Runtime::start(db.clone(), cfg(), vec![PoolSpec::new("forever", 1, policy(50), handler)]);
    let id = push(&db, NewJob::to_queue("forever", &json!({})).expires_at(Utc::now() + chrono::Duration::milliseconds(1500))).await;
    let v = wait_status(&db, &id, JobStatus::Expired, Duration::from_secs(10)).await;
    rt.shutdown().await;
    assert!(runs.load(Ordering::SeqCst) >= 2, "it snoozed and ran again before it expired");
    assert!(v.last_error.unwrap().starts_with("expired: "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_a_scheduled_job_and_retry_a_dead_one_and_a_failed_one() {
    let (db, _) = fresh_db().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    // Fails while the payload says so; a retried job reads the same payload, so the
    // handler looks at a flag the test flips.
    let allow = Arc::new(AtomicUsize::new(0));
    let a = allow.clone();
    let handler = handler_fn(move |ctx| {
        let (r, a) = (r.clone(), a.clone());
        async move {
            r.fetch_add(1, Ordering::SeqCst);
            let permanent = serde_json::from_slice::<serde_json::Value>(&ctx.payload).unwrap()["permanent"] == true;
            match (a.load(Ordering::SeqCst), permanent) {
                (0, true) => Err(JobError::permanent("test", "not this way")),
                (0, false) => Err(JobError::retryable("test", "not yet")),
                _ => Ok(json!("done")),
            }
        }
    });
    let rt = Runtime::start(db.clone(), cfg(), vec![PoolSpec::new("ops", 2, policy(50), handler)]);

    let scheduled = push(&db, NewJob::to_queue("ops", &json!({})).run_at(Utc::now() + chrono::Duration::milliseconds(1500))).await;
    assert_eq!(status::get(&db, &scheduled).await.unwrap().unwrap().status, JobStatus::Scheduled);
    assert_eq!(status::cancel(&db, &scheduled).await.unwrap(), Transition::Done);
    // A13: out of attempts is `dead`; a permanent failure, attempts left, is `failed`.
    let dead = push(&db, NewJob::to_queue("ops", &json!({})).max_attempts(1)).await;
    wait_status(&db, &dead, JobStatus::Dead, Duration::from_secs(10)).await;
    let failed = push(&db, NewJob::to_queue("ops", &json!({"permanent": true})).max_attempts(5)).await;
    let f = wait_status(&db, &failed, JobStatus::Failed, Duration::from_secs(10)).await;
    assert_eq!((f.attempts, f.last_error.as_deref().map(|e| e.starts_with("test: "))), (1, Some(true)), "{f:?}");
    // Past the cancelled job's run_at: it must not have run.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let c = status::get(&db, &scheduled).await.unwrap().unwrap();
    assert_eq!(c.status, JobStatus::Cancelled);
    assert_eq!(c.attempts, 0);
    assert_eq!(runs.load(Ordering::SeqCst), 2, "only the dead and the failed job ran");

    // Cancel does not apply to a dead or failed job; retry does not apply to an unknown one.
    assert_eq!(status::cancel(&db, &dead).await.unwrap(), Transition::Conflict(JobStatus::Dead));
    assert_eq!(status::cancel(&db, &failed).await.unwrap(), Transition::Conflict(JobStatus::Failed));
    assert_eq!(status::retry(&db, &JobId::generate()).await.unwrap(), Transition::NotFound);

    allow.store(1, Ordering::SeqCst);
    assert_eq!(status::retry(&db, &dead).await.unwrap(), Transition::Done);
    assert_eq!(status::retry(&db, &failed).await.unwrap(), Transition::Done);
    let v = wait_status(&db, &dead, JobStatus::Succeeded, Duration::from_secs(10)).await;
    let f = wait_status(&db, &failed, JobStatus::Succeeded, Duration::from_secs(10)).await;
    rt.shutdown().await;
    assert_eq!((v.attempts, f.attempts), (2, 2));
    assert_eq!(runs.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provision_job_without_a_backend_fails_with_no_backend() {
    let (db, _) = fresh_db().await;
    let deps = molecule_workers::Deps {
        db: db.clone(),
        backend: std::sync::Arc::new(molecule_backends::NoBackend),
        platform_url: "http://127.0.0.1:9".into(),
        registry: molecule_backends::image::DEFAULT_REGISTRY.into(),
        image_local_override: false,
        redactor: None,
        loki_url: None,
        agents: molecule_workers::a2a::AgentClient::new(true).expect("agent client"),
    };
    let ws: uuid::Uuid = sqlx::query_scalar(
        "WITH o AS (INSERT INTO organizations (name) VALUES ('o') RETURNING id) \
         INSERT INTO workspaces (org_id, name, runtime, tier) SELECT id, 'w', 'echo', 2 FROM o RETURNING id",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    let specs = molecule_workers::handlers::pool_specs(&deps, &[(JobKind::Provision, 1)].into_iter().collect());
    assert_eq!(specs.len(), 1);
    let rt = Runtime::start(db.clone(), cfg(), specs);
    let id = push(&db, NewJob::new(JobKind::Provision, &json!({"workspace_id": ws}))).await;
    let v = wait_status(&db, &id, JobStatus::Failed, Duration::from_secs(10)).await;
    rt.shutdown().await;
    assert!(v.last_error.unwrap().starts_with("no_backend: "));
    let (status, err): (String, String) =
        sqlx::query_as("SELECT status::text, last_sample_error FROM workspaces WHERE id = $1").bind(ws).fetch_one(&db).await.unwrap();
    assert_eq!(status, "failed");
    assert_eq!(err, molecule_workers::provision::StartFailure::NoBackend.final_message());
    assert_eq!(v.max_attempts, JobKind::Provision.retry_policy().max_attempts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pool_wakes_on_notify_well_before_its_poll_interval() {
    let (db, _) = fresh_db().await;
    let handler = handler_fn(|_ctx| async { Ok(json!(null)) });
    let mut c = cfg();
    c.poll_interval = Duration::from_secs(30); // only NOTIFY can wake it in time
    let rt = Runtime::start(db.clone(), c, vec![PoolSpec::new("idle", 1, policy(100), handler)]);
    tokio::time::sleep(Duration::from_millis(500)).await; // let it go idle
    for _ in 0..3 {
        let id = push(&db, NewJob::to_queue("idle", &json!({}))).await;
        wait_status(&db, &id, JobStatus::Succeeded, Duration::from_secs(5)).await;
    }
    // A future-dated job runs on time without a NOTIFY (next-due timer).
    let at = Utc::now() + chrono::Duration::milliseconds(1500);
    let id = push(&db, NewJob::to_queue("idle", &json!({})).run_at(at)).await;
    let v = wait_status(&db, &id, JobStatus::Succeeded, Duration::from_secs(10)).await;
    rt.shutdown().await;
    let late = (v.started_at.unwrap() - at).num_milliseconds();
    assert!((0..5000).contains(&late), "future-dated job started {late} ms after its run_at");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_the_database_cannot_store_fails_that_job_only() {
    let (db, _) = fresh_db().await;
    // jsonb cannot hold a NUL character.
    let handler = handler_fn(|ctx| async move {
        let bad: bool = ctx.decode::<serde_json::Value>()?["bad"].as_bool().unwrap_or(false);
        Ok(if bad { json!({"out": "a\u{0}b"}) } else { json!({"out": "fine"}) })
    });
    let rt = Runtime::start(db.clone(), cfg(), vec![PoolSpec::new("nul", 4, policy(100), handler)]);
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push((i == 3, push(&db, NewJob::to_queue("nul", &json!({"bad": i == 3})).max_attempts(1)).await));
    }
    for (bad, id) in &ids {
        if *bad {
            let v = wait_status(&db, id, JobStatus::Failed, Duration::from_secs(10)).await;
            assert!(v.last_error.unwrap().starts_with("result_not_stored: "));
        } else {
            let v = wait_status(&db, id, JobStatus::Succeeded, Duration::from_secs(10)).await;
            assert_eq!(v.result, Some(json!({"out": "fine"})));
        }
    }
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescue_capture_without_a_redactor_stores_and_ships_nothing() {
    let (db, _) = fresh_db().await;
    let deps = molecule_workers::Deps {
        db: db.clone(),
        backend: std::sync::Arc::new(molecule_backends::NoBackend),
        platform_url: String::new(),
        registry: String::new(),
        image_local_override: false,
        redactor: None,
        loki_url: Some("http://127.0.0.254:9".into()),
        agents: molecule_workers::a2a::AgentClient::new(true).expect("agent client"),
    };
    let ws: uuid::Uuid = sqlx::query_scalar(
        "WITH o AS (INSERT INTO organizations (name) VALUES ('o') RETURNING id) \
         INSERT INTO workspaces (org_id, name, runtime, tier, status) SELECT id, 'w', 'echo', 2, 'failed' FROM o RETURNING id",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    let specs = molecule_workers::handlers::pool_specs(&deps, &[(JobKind::RescueCapture, 1)].into_iter().collect());
    let rt = Runtime::start(db.clone(), cfg(), specs);
    let id = push(&db, NewJob::new(JobKind::RescueCapture, &json!({"workspace_id": ws, "trigger": "bootstrap_failed"}))).await;
    let v = wait_status(&db, &id, JobStatus::Failed, Duration::from_secs(10)).await;
    let normal = push(&db, NewJob::new(JobKind::RescueCapture, &json!({"workspace_id": ws, "trigger": "deprovision"}))).await;
    let n = wait_status(&db, &normal, JobStatus::Failed, Duration::from_secs(10)).await;
    rt.shutdown().await;
    assert!(v.last_error.unwrap().starts_with("no_redactor: "));
    assert!(n.last_error.unwrap().starts_with("invalid_input: "), "never on a normal teardown");
    let bundles: i64 = sqlx::query_scalar("SELECT count(*) FROM rescue_bundles").fetch_one(&db).await.unwrap();
    assert_eq!(bundles, 0);
    let status: String = sqlx::query_scalar("SELECT status::text FROM workspaces WHERE id = $1").bind(ws).fetch_one(&db).await.unwrap();
    assert_eq!(status, "failed");
}

/// An enqueue of a key another transaction is inserting waits for it, then returns that
/// job: the statement that waited cannot see the winner in its own snapshot, so enqueue
/// reads it with a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_racing_another_on_one_key_gets_the_winner() {
    let (db, _) = fresh_db().await;
    let job = || NewJob::new(JobKind::Console, &json!({"workspace_id": uuid::Uuid::nil()})).idempotency_key("race");
    let mut tx = db.begin().await.unwrap();
    let first = enqueue(&mut tx, &job()).await.unwrap();
    let second = tokio::spawn({
        let db = db.clone();
        let job = job();
        async move {
            let mut conn = db.acquire().await.unwrap();
            enqueue(&mut conn, &job).await
        }
    });
    eventually(Duration::from_secs(10), "the second enqueue to wait on the first's key", || async {
        let waiting: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
                .fetch_one(&db)
                .await
                .unwrap();
        (waiting > 0).then_some(())
    })
    .await;
    tx.commit().await.unwrap();
    assert_eq!(second.await.unwrap().expect("the waiting enqueue gets an id"), first);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs").fetch_one(&db).await.unwrap();
    assert_eq!(n, 1);
}

/// The job table's vacuum settings (migrations/…_job_table_autovacuum.sql and
/// …_job_table_vacuum_throttled.sql): vacuum after 2 % dead rows, at the default
/// (throttled) pace — unthrottled, a vacuum during a 1M-job drain took a core from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_tables_vacuum_starts_early_and_stays_throttled() {
    let (db, _) = fresh_db().await;
    let options: Vec<String> =
        sqlx::query_scalar("SELECT unnest(reloptions) FROM pg_class WHERE oid = 'apalis.jobs'::regclass").fetch_all(&db).await.unwrap();
    assert!(options.contains(&"autovacuum_vacuum_scale_factor=0.02".to_string()), "{options:?}");
    assert!(options.contains(&"autovacuum_vacuum_threshold=10000".to_string()), "{options:?}");
    assert!(!options.iter().any(|o| o.starts_with("autovacuum_vacuum_cost_delay")), "vacuum unthrottled again: {options:?}");
}

/// While a backlog drains, claims start at the pool's cursor (jobs/src/store/claim.rs);
/// a job that sorts before it (a higher priority) must not wait for the whole backlog:
/// the pool claims from the head of the queue again within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_pool_soon_takes_a_job_that_sorts_before_its_cursor() {
    let (db, _) = fresh_db().await;
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    // About 400 jobs a second (4 at a time, 10 ms of work each): 2,000 take five seconds.
    let handler = handler_fn(move |_ctx| {
        let d = d.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            d.fetch_add(1, Ordering::Relaxed);
            Ok(json!(null))
        }
    });
    let backlog: Vec<NewJob> = (0..2000).map(|_| NewJob::to_queue("backlog", &json!({}))).collect();
    molecule_jobs::enqueue_many(&mut *db.acquire().await.unwrap(), &backlog).await.unwrap();
    let rt = Runtime::start(db.clone(), cfg(), vec![PoolSpec::new("backlog", 4, policy(100), handler)]);
    eventually(Duration::from_secs(10), "the drain to be under way", || async { (done.load(Ordering::Relaxed) >= 40).then_some(()) }).await;
    let urgent = push(&db, NewJob::to_queue("backlog", &json!({})).priority(10)).await;
    let enqueued = Utc::now();
    let v = wait_status(&db, &urgent, JobStatus::Succeeded, Duration::from_secs(20)).await;
    let waited = (v.started_at.unwrap() - enqueued).num_milliseconds();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE job_type = 'backlog' AND status = 'Pending'")
        .fetch_one(&db)
        .await
        .unwrap();
    rt.shutdown().await;
    assert!(waited < 2500, "the urgent job waited {waited} ms behind the backlog");
    assert!(left > 500, "it ran ahead of the backlog ({left} jobs still waiting when it was done)");
}

/// A pool's two fetchers (one per claim shard, jobs/src/runtime/pool.rs) share its slots:
/// together they never run more jobs at once than its concurrency — an odd one too, where
/// each fetcher's share is rounded up — and both shards' jobs run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pools_fetchers_together_never_run_more_jobs_at_once_than_its_concurrency() {
    let (db, _) = fresh_db().await;
    let (running, most, done) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (r, m, d) = (running.clone(), most.clone(), done.clone());
    let handler = handler_fn(move |_ctx| {
        let (r, m, d) = (r.clone(), m.clone(), d.clone());
        async move {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            r.fetch_sub(1, Ordering::SeqCst);
            d.fetch_add(1, Ordering::SeqCst);
            Ok(json!(null))
        }
    });
    let jobs: Vec<NewJob> = (0..120).map(|_| NewJob::to_queue("slots", &json!({}))).collect();
    let ids = molecule_jobs::enqueue_many(&mut *db.acquire().await.unwrap(), &jobs).await.unwrap();
    let mut shards = std::collections::HashSet::new();
    for id in &ids {
        shards.insert(molecule_jobs::store::Shard::of(&db, id.as_str()).await.unwrap());
    }
    assert_eq!(shards.len(), molecule_jobs::store::CLAIM_SHARDS, "the backlog spans every shard");
    let rt = Runtime::start(db.clone(), cfg(), vec![PoolSpec::new("slots", 3, policy(100), handler)]);
    eventually(Duration::from_secs(20), "the backlog to be done", || async { (done.load(Ordering::SeqCst) == 120).then_some(()) }).await;
    rt.shutdown().await;
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 3, "{most} jobs ran at once in a pool of 3");
    assert!(most >= 2, "the slots were not used: at most {most} at once");
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE job_type = 'slots' AND status <> 'Done'").fetch_one(&db).await.unwrap();
    assert_eq!(left, 0);
}

/// A pool of one with a slow job in each shard, on one thread: one at a time, and when
/// the first ends its slot goes to the other shard's fetcher, which claims. (A slot
/// waited for and let go went straight to the other fetcher waiting, and back, for ever:
/// on one thread the second job never ran.)
#[tokio::test(flavor = "current_thread")]
async fn a_pool_of_one_runs_a_slow_job_of_each_shard_one_after_the_other() {
    use molecule_jobs::store::Shard;
    let (db, _) = fresh_db().await;
    let mut in_shard = std::collections::HashMap::new();
    while in_shard.len() < molecule_jobs::store::CLAIM_SHARDS {
        let id = push(&db, NewJob::to_queue("one", &json!({}))).await;
        let shard = Shard::of(&db, id.as_str()).await.unwrap();
        if in_shard.contains_key(&shard) {
            sqlx::query("DELETE FROM apalis.jobs WHERE id = $1").bind(id.as_str()).execute(&db).await.unwrap();
        } else {
            in_shard.insert(shard, id);
        }
    }
    let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (r, m) = (running.clone(), most.clone());
    let handler = handler_fn(move |_ctx| {
        let (r, m) = (r.clone(), m.clone());
        async move {
            m.fetch_max(r.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            r.fetch_sub(1, Ordering::SeqCst);
            Ok(json!(null))
        }
    });
    let rt = Runtime::start(db.clone(), cfg(), vec![PoolSpec::new("one", 1, policy(100), handler)]);
    for id in in_shard.values() {
        wait_status(&db, id, JobStatus::Succeeded, Duration::from_secs(10)).await;
    }
    rt.shutdown().await;
    assert_eq!(most.load(Ordering::SeqCst), 1, "two jobs ran at once in a pool of one");
}

/// An idle pool claims from its cursor; a job it cannot see there — enqueued in a
/// transaction that began before the job the cursor stands on and committed after it —
/// is taken by the claim from the head that follows at once, not at the next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pool_takes_a_job_committed_late_behind_its_cursor_at_once() {
    let (db, _) = fresh_db().await;
    let handler = handler_fn(|_ctx| async { Ok(json!(null)) });
    let mut c = cfg();
    c.poll_interval = Duration::from_secs(30); // only a wake-up can start it in time
    let rt = Runtime::start(db.clone(), c, vec![PoolSpec::new("late", 4, policy(100), handler)]);
    let first = push(&db, NewJob::to_queue("late", &json!({}))).await;
    wait_status(&db, &first, JobStatus::Succeeded, Duration::from_secs(5)).await;

    // Its run_at is its transaction's start: before the next job's. Both in one claim
    // shard (a hash of the id), so the late job is behind that shard's fetcher's cursor.
    let shard_of = |id: JobId| {
        let db = db.clone();
        async move { molecule_jobs::store::Shard::of(&db, id.as_str()).await.unwrap() }
    };
    let (tx, late) = loop {
        let mut tx = db.begin().await.unwrap();
        let late = enqueue(&mut tx, &NewJob::to_queue("late", &json!({}))).await.unwrap();
        if shard_of(late.clone()).await == molecule_jobs::store::Shard::all().next().unwrap() {
            break (tx, late);
        }
        tx.rollback().await.unwrap();
    };
    tokio::time::sleep(Duration::from_millis(20)).await; // the other job's run_at is later
    let cursor_job = loop {
        // The other shard's jobs run meanwhile, in the other fetcher.
        let id = push(&db, NewJob::to_queue("late", &json!({}))).await;
        if shard_of(id.clone()).await == shard_of(late.clone()).await {
            break id;
        }
    };
    wait_status(&db, &cursor_job, JobStatus::Succeeded, Duration::from_secs(5)).await;
    tx.commit().await.unwrap();
    let committed = Utc::now();

    let v = wait_status(&db, &late, JobStatus::Succeeded, Duration::from_secs(40)).await;
    rt.shutdown().await;
    let waited = (v.started_at.unwrap() - committed).num_milliseconds();
    assert!(waited < 1000, "the late job started {waited} ms after its commit");
}

/// Each claim records its batch in `apalis.claims` (the lease rescuer's only record of a
/// worker's running jobs since the running index went, migrations/…_claims.sql), and the
/// runtime deletes that row with the write of the batch's last ack, whatever the acks are:
/// successes, retries, permanent failures, expiries, a result the database refuses
/// (written one by one), a hand-back at shutdown. A batch with a job still running keeps
/// its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_batch_keeps_its_row_until_its_last_ack_whatever_the_outcomes() {
    let (db, _) = fresh_db().await;
    let release = Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    let handler = handler_fn(move |ctx| {
        let r = r.clone();
        async move {
            let kind = ctx.decode::<serde_json::Value>()?["kind"].as_str().unwrap_or_default().to_string();
            match kind.as_str() {
                "retry" if ctx.attempt == 1 => Err(JobError::retryable("test", "once more")),
                "fail" => Err(JobError::permanent("test", "no")),
                "nul" => Ok(json!({"out": "a\u{0}b"})),
                "slow" => {
                    r.notified().await;
                    Ok(json!("slow"))
                }
                "hang" => std::future::pending().await,
                _ => Ok(json!("ok")),
            }
        }
    });
    let mut c = cfg();
    c.grace = Duration::from_millis(300);
    let rt = Runtime::start(db.clone(), c, vec![PoolSpec::new("batches", 8, policy(20), handler)]);
    let kinds = ["ok", "retry", "fail", "nul", "ok", "slow", "ok", "retry", "fail", "ok", "ok", "ok", "ok", "ok", "ok"];
    let mut jobs: Vec<NewJob> = kinds.iter().map(|k| NewJob::to_queue("batches", &json!({ "kind": k })).max_attempts(2)).collect();
    jobs.push(NewJob::to_queue("batches", &json!({ "kind": "ok" })).expires_at(Utc::now() - chrono::Duration::seconds(1)));
    let ids = molecule_jobs::enqueue_many(&mut *db.acquire().await.unwrap(), &jobs).await.unwrap();
    let slow = ids[5].as_str().to_string();
    let rows = |db: PgPool| async move {
        sqlx::query_as::<_, (String, Vec<String>)>("SELECT worker_id, ids FROM apalis.claims").fetch_all(&db).await.unwrap()
    };
    // Every job but the slow one ends.
    for (i, id) in ids.iter().enumerate().filter(|(i, _)| *i != 5) {
        let v = eventually(Duration::from_secs(15), &format!("job {i} to end"), || async {
            status::get(&db, id)
                .await
                .unwrap()
                .filter(|v| matches!(v.status, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Expired))
        })
        .await;
        let want = match kinds.get(i) {
            None => JobStatus::Expired,
            Some(&"fail") | Some(&"nul") => JobStatus::Failed,
            Some(_) => JobStatus::Succeeded,
        };
        assert_eq!(v.status, want, "job {i} ({:?})", kinds.get(i));
    }
    // Only the slow job's batch is open: one row, naming it, under this pool's worker.
    let open = eventually(Duration::from_secs(5), "only the slow job's batch to stay", || async {
        let r = rows(db.clone()).await;
        (r.len() == 1).then_some(r)
    })
    .await;
    assert!(open[0].1.contains(&slow) && open[0].0.starts_with("batches@test#"), "{open:?}");
    release.notify_one();
    wait_status(&db, &ids[5], JobStatus::Succeeded, Duration::from_secs(10)).await;
    eventually(Duration::from_secs(5), "the slow job's batch row to go", || async { rows(db.clone()).await.is_empty().then_some(()) })
        .await;

    // A job still running at the end of the grace period is handed back: its row goes too.
    let hang = push(&db, NewJob::to_queue("batches", &json!({ "kind": "hang" }))).await;
    wait_status(&db, &hang, JobStatus::Running, Duration::from_secs(10)).await;
    assert_eq!(rows(db.clone()).await.len(), 1);
    let report = rt.shutdown().await;
    assert_eq!(report.released, 1);
    assert_eq!(status::get(&db, &hang).await.unwrap().unwrap().status, JobStatus::Pending);
    assert!(rows(db.clone()).await.is_empty(), "a hand-back ends its batch");
}

/// Our pools (domain::db::pool_options, the job core's included) ping a connection only
/// when it sat idle past a window: one in steady use goes straight to its statement, so a
/// backend that died meanwhile fails that statement once and is dropped; one idle longer
/// is pinged, and a dead one replaced before any statement sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_is_pinged_only_after_sitting_idle() {
    let (db, url) = fresh_db().await;
    async fn backend(pool: &PgPool) -> Result<i32, sqlx::Error> {
        sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(pool).await
    }
    async fn kill(db: &PgPool, pool: &PgPool, pid: i32) {
        // sqlx pings a connection on its release, in a task of its own: once it is back
        // among the idle, that ping is done and cannot be the one that meets the dead backend.
        eventually(Duration::from_secs(5), "the connection back in the pool", || async { (pool.num_idle() == 1).then_some(()) }).await;
        // With a timeout, pg_terminate_backend returns once the backend has exited.
        let gone: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)").bind(pid).fetch_one(db).await.unwrap();
        assert!(gone, "backend {pid} still there");
    }

    let busy = molecule_domain::db::pool_options(Duration::from_secs(3600)).max_connections(1).connect(&url).await.unwrap();
    let first = backend(&busy).await.unwrap();
    kill(&db, &busy, first).await;
    match backend(&busy).await {
        // The backend's last word, or the closed socket.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("57P01") => {}
        Err(sqlx::Error::Io(_)) => {}
        other => panic!("a connection used within the window is not pinged first: {other:?}"),
    }
    let second = backend(&busy).await.expect("the broken connection was dropped; a new one serves");
    assert_ne!(first, second);

    let idle = molecule_domain::db::pool_options(Duration::ZERO).max_connections(1).connect(&url).await.unwrap();
    let first = backend(&idle).await.unwrap();
    kill(&db, &idle, first).await;
    let second = backend(&idle).await.expect("pinged, refused and replaced before the statement");
    assert_ne!(first, second);
}

/// Readiness names unapplied migrations only when the migrations table is missing
/// (42P01); any other database error reads as unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_says_when_the_migrations_have_not_run() {
    let admin = molecule_tests::admin_url();
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let a = molecule_domain::db::connect(&admin, 1).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&a).await.unwrap();
    let bare = molecule_domain::db::connect(&molecule_tests::url_for(&admin, &name), 2).await.unwrap();
    assert_eq!(molecule_domain::db::readiness(&bare).await, Err("migrations have not been applied".to_string()));
    let (db, _) = fresh_db().await;
    assert_eq!(molecule_domain::db::readiness(&db).await, Ok(()));
}

/// Processes starting together queue for the migrations by polling an advisory lock, so
/// no statement of theirs waits on a lock while a migration builds an index CONCURRENTLY
/// (which waits for every open transaction: a waiting statement would deadlock with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_waiting_for_another_holds_no_statement_open() {
    let (db, _) = fresh_db().await;
    let mut holder = db.acquire().await.unwrap();
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(molecule_domain::db::MIGRATE_LOCK)
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    assert!(got);
    let db2 = db.clone();
    let migrating = tokio::spawn(async move { molecule_domain::db::migrate(&db2).await });
    // It tries, again and again, and no backend waits on a lock meanwhile.
    eventually(Duration::from_secs(10), "the migration to poll for the lock", || async {
        let polls: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_try_advisory_lock%' AND pid <> pg_backend_pid()",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        (polls > 0).then_some(())
    })
    .await;
    for _ in 0..5 {
        let waiting: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetch_one(&db).await.unwrap();
        assert_eq!(waiting, 0, "a statement waits on a lock");
        assert!(!migrating.is_finished(), "migrated while another process held the lock");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sqlx::query("SELECT pg_advisory_unlock($1)").bind(molecule_domain::db::MIGRATE_LOCK).execute(&mut *holder).await.unwrap();
    migrating.await.unwrap().expect("migrates once the lock is free");
}

/// A CREATE INDEX CONCURRENTLY that failed leaves an INVALID index, which IF NOT EXISTS
/// takes for built: the migration after it rebuilds it before the old claim index goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_claim_index_left_by_a_failed_build_is_rebuilt() {
    let (db, _) = fresh_db().await;
    let valid = || async {
        sqlx::query_scalar::<_, bool>("SELECT indisvalid FROM pg_index WHERE indexrelid = 'apalis.jobs_claim_shard_idx'::regclass")
            .fetch_one(&db)
            .await
            .unwrap()
    };
    assert!(valid().await);
    // What a cancelled build leaves (the test cluster's user is a superuser), and the
    // migrations after the build not applied yet (the old claim index is back meanwhile).
    sqlx::query("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'apalis.jobs_claim_shard_idx'::regclass")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("CREATE INDEX jobs_claimable_idx ON apalis.jobs (job_type, priority DESC, run_at, id) WHERE lock_at IS NULL")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version >= 20261201000007").execute(&db).await.unwrap();
    assert!(!valid().await);
    molecule_domain::db::migrate(&db).await.unwrap();
    assert!(valid().await, "the claim index is valid again");
    for old in ["apalis.jobs_claim_idx", "apalis.jobs_claimable_idx"] {
        let left: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text").bind(old).fetch_one(&db).await.unwrap();
        assert_eq!(left, None, "and the old claim index {old} is gone");
    }
}

/// An ack whose job was claimed again while it ran (here: its fence bumped under it, what
/// a rescue and a new claim do) is refused, counted, and leaves the row to the newer
/// attempt; the acks written beside it in the same batches apply; and the claimed batches
/// still end (a refused ack counts as that job's). The ack statements return only the
/// refused acks: this is the path that reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_ack_is_refused_and_counted_while_the_others_apply() {
    let (db, _) = fresh_db().await;
    let together = Arc::new(tokio::sync::Barrier::new(8));
    let t = together.clone();
    let handler = handler_fn(move |ctx| {
        let t = t.clone();
        async move {
            let kind = ctx.decode::<serde_json::Value>()?["kind"].as_str().unwrap_or_default().to_string();
            if kind.starts_with("stolen") {
                sqlx::query("UPDATE apalis.jobs SET fence = fence + 1 WHERE id = $1")
                    .bind(ctx.id.as_str())
                    .execute(&ctx.db)
                    .await
                    .map_err(|e| JobError::retryable("test", e.to_string()))?;
            }
            // All eight end at once: their acks reach the acker together.
            t.wait().await;
            match kind.as_str() {
                "stolen_retry" => Err(JobError::retryable("test", "again")),
                "stolen_result" => Ok(json!("a result")),
                // A plain success: the cheaper ack statement, and most of the refused ones.
                _ => Ok(serde_json::Value::Null),
            }
        }
    });
    let rt = Runtime::start(db.clone(), cfg(), vec![PoolSpec::new("stale", 8, policy(50), handler)]);
    // Three refused (a plain success, a retry, a success with a result: both ack
    // statements), five applied: counts that cannot be mistaken for each other.
    let kinds = ["ok", "stolen", "ok", "ok", "ok", "stolen_retry", "ok", "stolen_result"];
    let jobs: Vec<NewJob> = kinds.iter().map(|k| NewJob::to_queue("stale", &json!({ "kind": k }))).collect();
    let ids = molecule_jobs::enqueue_many(&mut *db.acquire().await.unwrap(), &jobs).await.unwrap();
    eventually(Duration::from_secs(15), "three stale acks", || async { (rt.stale_acks() == 3).then_some(()) }).await;
    for (id, kind) in ids.iter().zip(kinds) {
        if kind == "ok" {
            wait_status(&db, id, JobStatus::Succeeded, Duration::from_secs(10)).await;
        } else {
            let (status, fence): (String, i64) =
                sqlx::query_as("SELECT status, fence FROM apalis.jobs WHERE id = $1").bind(id.as_str()).fetch_one(&db).await.unwrap();
            assert_eq!((status.as_str(), fence), ("Running", 2), "{kind}: the newer attempt's row is untouched");
        }
    }
    eventually(Duration::from_secs(5), "the batches to end", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.claims").fetch_one(&db).await.unwrap();
        (n == 0).then_some(())
    })
    .await;
    // Counted once the write returns, a moment after its commit is visible: waited for.
    eventually(Duration::from_secs(5), "five outcomes counted", || async { (rt.acks_applied() == 5).then_some(()) }).await;
    let report = rt.shutdown().await;
    assert_eq!(report.stale_acks, 3, "and no more");
}
