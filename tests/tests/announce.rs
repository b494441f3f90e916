//! Wake-ups after commit (issue 15): an enqueue marked `announce_after_commit` sends no
//! NOTIFY at its commit (which would serialize commits), every other enqueue still does,
//! and the announcer's NOTIFY after the commit wakes an idle pool.
//!
//! Absence is checked without waiting: notifications arrive in commit order, so when a
//! later transaction's notification is the next one received, the earlier transaction
//! sent none.

use molecule_jobs::runtime::INSERT_CHANNEL;
use molecule_jobs::{Announcer, NewJob, PoolSpec, RetryPolicy, Runtime, RuntimeConfig, enqueue, enqueue_many, handler_fn};
use molecule_tests::fresh_db;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use std::time::Duration;

fn job(queue: &str) -> NewJob {
    NewJob::to_queue(queue, &json!({}))
}

/// The queue named by the next notification on the insert channel.
async fn next_queue(listener: &mut PgListener) -> String {
    let n = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await.expect("a notification within 10 s").unwrap();
    let v: serde_json::Value = serde_json::from_str(n.payload()).unwrap();
    v["job_type"].as_str().expect("job_type in the payload").to_string()
}

/// Waits until `id`'s outcome is written: the pool's claim after that job (it starts as
/// the job ends, beside the ack) has then all but surely found the queue empty, and the
/// pool sleeps until a wake-up or its poll.
async fn idle_after(db: &PgPool, id: &molecule_domain::JobId) {
    molecule_tests::eventually(Duration::from_secs(10), "the job's outcome", || async {
        molecule_jobs::status::get(db, id).await.unwrap().filter(|v| v.status == molecule_jobs::JobStatus::Succeeded)
    })
    .await;
}

async fn loud(db: &PgPool, queue: &str) {
    let mut conn = db.acquire().await.unwrap();
    enqueue(&mut conn, &job(queue)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_enqueues_send_no_notify_and_the_announcer_sends_one_per_queue() {
    let (db, _) = fresh_db().await;
    let mut listener = PgListener::connect_with(&db).await.unwrap();
    listener.listen(INSERT_CHANNEL).await.unwrap();

    // A quiet enqueue, committed; then a loud one: the loud one's is the next notification.
    let mut tx = db.begin().await.unwrap();
    enqueue(&mut tx, &job("quiet").announce_after_commit()).await.unwrap();
    tx.commit().await.unwrap();
    loud(&db, "marker-1").await;
    assert_eq!(next_queue(&mut listener).await, "marker-1", "the quiet enqueue's commit notified");

    // A loud enqueue after a quiet one in the same transaction still notifies (each
    // statement sets the mode for itself).
    let mut tx = db.begin().await.unwrap();
    enqueue(&mut tx, &job("quiet").announce_after_commit()).await.unwrap();
    enqueue(&mut tx, &job("mixed")).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(next_queue(&mut listener).await, "mixed");
    loud(&db, "marker-2").await;
    assert_eq!(next_queue(&mut listener).await, "marker-2", "one notification for the mixed transaction, not two");

    // Bulk: quiet when every job is, loud otherwise.
    let mut conn = db.acquire().await.unwrap();
    enqueue_many(&mut conn, &[job("bulk-quiet").announce_after_commit(), job("bulk-quiet").announce_after_commit()]).await.unwrap();
    enqueue_many(&mut conn, &[job("bulk-mixed").announce_after_commit(), job("bulk-mixed")]).await.unwrap();
    drop(conn);
    assert_eq!(next_queue(&mut listener).await, "bulk-mixed");

    // The announcer: one notification per queue announced, the trigger's payload without the shards.
    let announcer = Announcer::start(db.connect_options().as_ref().clone());
    announcer.announce("quiet");
    assert_eq!(next_queue(&mut listener).await, "quiet");
    loud(&db, "marker-3").await;
    assert_eq!(next_queue(&mut listener).await, "marker-3", "an announce sends one notification");
}

/// A pool of `queue` whose poll is a minute away (only a wake-up starts a job within the
/// tests' bounds), and the ids of the jobs it starts, as they start.
fn sleepy_pool(db: &PgPool, queue: &str) -> (Runtime, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (tx_started, started) = tokio::sync::mpsc::unbounded_channel::<String>();
    let handler = handler_fn(move |ctx| {
        let tx_started = tx_started.clone();
        async move {
            let _ = tx_started.send(ctx.id.to_string());
            Ok(json!(null))
        }
    });
    let cfg = RuntimeConfig { poll_interval: Duration::from_secs(60), node: format!("announce-{queue}"), ..Default::default() };
    let retry = RetryPolicy { base: Duration::from_millis(100), cap: Duration::from_secs(1), max_attempts: 3 };
    (Runtime::start(db.clone(), cfg, vec![PoolSpec::new(queue, 1, retry, handler)]), started)
}

/// Three rounds of: a quiet enqueue, committed, then announced; the job must start within
/// 10 s. Round 0 may be taken by the pool's first claim (or its wake-up after LISTEN);
/// rounds 1 and 2 come once the previous job's outcome is written, when the pool has (all
/// but surely) made its claim after that job and gone to sleep on the queue.
async fn announced_rounds(db: &PgPool, queue: &str, announcer: &Announcer, started: &mut tokio::sync::mpsc::UnboundedReceiver<String>) {
    for round in 0..3 {
        let mut tx = db.begin().await.unwrap();
        let id = enqueue(&mut tx, &job(queue).announce_after_commit()).await.unwrap();
        tx.commit().await.unwrap();
        announcer.announce(queue);
        let got = tokio::time::timeout(Duration::from_secs(10), started.recv())
            .await
            .unwrap_or_else(|_| panic!("round {round}: the announced job did not start within 10 s"))
            .unwrap();
        assert_eq!(got, id.to_string());
        idle_after(db, &id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announced_job_wakes_an_idle_pool_long_before_its_poll() {
    let (db, _) = fresh_db().await;
    let (rt, mut started) = sleepy_pool(&db, "announced");
    let announcer = Announcer::start(db.connect_options().as_ref().clone());
    announced_rounds(&db, "announced", &announcer, &mut started).await;
    rt.shutdown().await;
}

/// The routes that enqueue without a NOTIFY in their transaction announce after their
/// commit: each job's queue is notified. (A quiet enqueue nobody announced would leave
/// the queue silent, and its pool asleep until its next poll.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_exec_and_delete_announce_their_jobs() {
    use molecule_jobs::JobKind;
    use molecule_tests::{http, open_auth, start_api};
    let (db, _) = fresh_db().await;
    let addr = start_api(db.clone(), open_auth()).await;
    let mut c = db.acquire().await.unwrap();
    let (_, token) = molecule_domain::tokens::create_org(&mut c, "acme").await.unwrap();
    drop(c);
    let mut listener = PgListener::connect_with(&db).await.unwrap();
    listener.listen(INSERT_CHANNEL).await.unwrap();

    let body = json!({ "name": "w", "runtime": "echo", "tier": 3 }).to_string();
    let r = http(&addr, "POST", "/workspaces", Some(&token), Some(&body), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(next_queue(&mut listener).await, JobKind::Provision.queue());
    let ws = r.json()["workspace"]["id"].as_str().unwrap().to_string();

    // No backend here: the workspace is put online by hand so exec accepts it.
    sqlx::query("UPDATE workspaces SET status = 'online' WHERE id = $1::uuid").bind(&ws).execute(&db).await.unwrap();
    let body = json!({ "argv": ["true"] }).to_string();
    let r = http(&addr, "POST", &format!("/workspaces/{ws}/exec"), Some(&token), Some(&body), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(next_queue(&mut listener).await, JobKind::Exec.queue());

    let r = http(&addr, "DELETE", &format!("/workspaces/{ws}"), Some(&token), None, None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(next_queue(&mut listener).await, JobKind::Stop.queue());
}

/// In a process that runs the queue's pool too (`serve`), an announce wakes it directly:
/// here the announcer's own connection cannot even reach PostgreSQL (so it sends no
/// NOTIFY), and the pool's poll is a minute away. (jobs/src/announce.rs tests the local
/// wake-up alone, without the race this test's rounds 1–2 leave open.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announce_wakes_this_processs_pool_without_the_notify() {
    let (db, _) = fresh_db().await;
    let (rt, mut started) = sleepy_pool(&db, "local");
    let nowhere = db.connect_options().as_ref().clone().port(molecule_tests::free_port());
    let announcer = Announcer::start(nowhere);
    announcer.wake_locally(rt.local_wakers());
    announced_rounds(&db, "local", &announcer, &mut started).await;
    rt.shutdown().await;
}
