//! Issue 9, HTTP server hygiene against a real PostgreSQL: connections that never finish
//! their headers are closed, the connection cap holds new ones back instead of failing,
//! shutdown is bounded and gives open streams a final frame, and job listings stay small
//! whatever the results hold.

use molecule_api::HttpLimits;
use molecule_domain::{OrgId, WorkspaceId, tokens};
use molecule_jobs::enqueue::{NewJob, enqueue_many};
use molecule_jobs::store::{self, Ack};
use molecule_jobs::{JobKind, JobState};
use molecule_tests::{eventually, frames, fresh_db, http, http_full, start_api, start_api_with, strict_auth};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn org(db: &PgPool) -> (OrgId, String) {
    let mut c = db.acquire().await.unwrap();
    tokens::create_org(&mut c, "limits").await.unwrap()
}

/// A connection that sent half a request head (no blank line) and then nothing.
async fn half_header(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ").as_bytes()).await.unwrap();
    s
}

/// Resolves when the server closed `s` (EOF or reset); answers what it sent first.
async fn closed_by_server(mut s: TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&got).to_string(),
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A request that must be answered 200 quickly.
async fn healthz_quickly(addr: &str) -> Duration {
    let t0 = Instant::now();
    let r = http_full(addr, "GET", "/healthz", None, None, &[], Duration::from_secs(5)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_half_sent_headers_are_closed_within_a_minute_while_requests_keep_working() {
    let (db, _) = fresh_db().await;
    // The defaults `serve` runs with.
    let addr = start_api(db, strict_auth()).await;
    let t0 = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..100 {
        slow.push(tokio::spawn(closed_by_server(half_header(&addr).await)));
    }
    // While they hang, every ordinary request is answered at once.
    let mut worst = Duration::ZERO;
    while slow.iter().any(|h| !h.is_finished()) {
        assert!(t0.elapsed() < Duration::from_secs(60), "half-sent headers still open after 60 s");
        worst = worst.max(healthz_quickly(&addr).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for h in slow {
        // hyper answers a header timeout by closing, possibly after a 408.
        let sent = h.await.unwrap();
        assert!(sent.is_empty() || sent.starts_with("HTTP/1.1 408"), "{sent:?}");
    }
    assert!(worst < Duration::from_secs(1), "a request took {worst:?} meanwhile");
    assert!(t0.elapsed() >= Duration::from_secs(10), "closed by the header timeout, not at once: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_new_connections_wait_for_a_free_slot() {
    let (db, _) = fresh_db().await;
    let limits = HttpLimits { header_timeout: Duration::from_secs(3), max_connections: 4, ..HttpLimits::default() };
    let addr = start_api_with(db, strict_auth(), limits).await;
    let t0 = Instant::now();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(half_header(&addr).await);
    }
    // A fifth client is accepted by the kernel but not served while the four hold the slots…
    let waiting = tokio::spawn({
        let addr = addr.clone();
        async move { http_full(&addr, "GET", "/healthz", None, None, &[], Duration::from_secs(20)).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "served past the cap");
    // …and is served once the header timeout frees them.
    let r = waiting.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(t0.elapsed() >= Duration::from_secs(3), "{:?}", t0.elapsed());
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_an_open_stream_its_final_frame_and_is_bounded() {
    let (db, _) = fresh_db().await;
    let (org, token) = org(&db).await;
    // An online workspace, and no worker: the exec waits in the queue, its stream stays open.
    let ws = WorkspaceId::new();
    sqlx::query("INSERT INTO workspaces (id, org_id, name, runtime, tier, status) VALUES ($1, $2, 'w', 'echo', 3, 'online')")
        .bind(ws.0)
        .bind(org.0)
        .execute(&db)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let limits = HttpLimits { shutdown_timeout: Duration::from_secs(5), ..HttpLimits::default() };
    let server = tokio::spawn(molecule_api::serve_with(
        listener,
        molecule_api::AppState::new(db.clone(), strict_auth()),
        async {
            stopped.await.ok();
        },
        limits,
    ));
    let stream = tokio::spawn({
        let (addr, token) = (addr.clone(), token.clone());
        async move {
            let body = json!({"argv": ["sleep", "100"]}).to_string();
            let accept = [("Accept", "application/x-ndjson")];
            http_full(&addr, "POST", &format!("/workspaces/{ws}/exec"), Some(&token), Some(&body), &accept, Duration::from_secs(30)).await
        }
    });
    eventually(Duration::from_secs(10), "the exec to be queued", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE job_type = 'exec'").fetch_one(&db).await.unwrap();
        (n == 1).then_some(())
    })
    .await;
    let t0 = Instant::now();
    stop.send(()).unwrap();
    let r = stream.await.unwrap();
    assert_eq!(r.status, 200);
    let last = frames(&r.body).pop().expect("a final frame");
    assert_eq!(last["error"], "server_shutting_down", "{}", r.body);
    assert!(last["detail"].as_str().unwrap().contains("GET /jobs/"), "{last}");
    tokio::time::timeout(Duration::from_secs(10), server).await.expect("serve returns within its shutdown timeout").unwrap().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
    assert!(TcpStream::connect(&addr).await.is_err(), "no longer accepting");
}

/// A5: a stream whose read of the output fails just as its job ends does not end as if
/// the output were empty: it follows on and sends the output before the end frame. The
/// output table is renamed away while the job ends (each read fails, a rollback each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_output_read_fails_at_the_end_still_sends_the_output() {
    let (db, _) = fresh_db().await;
    let (org, token) = org(&db).await;
    let ws = WorkspaceId::new();
    sqlx::query("INSERT INTO workspaces (id, org_id, name, runtime, tier, status) VALUES ($1, $2, 'w', 'echo', 3, 'online')")
        .bind(ws.0)
        .bind(org.0)
        .execute(&db)
        .await
        .unwrap();
    let addr = start_api(db.clone(), strict_auth()).await;
    sqlx::query("ALTER TABLE exec_output RENAME TO exec_output_away").execute(&db).await.unwrap();
    let stream = tokio::spawn({
        let (addr, token) = (addr.clone(), token.clone());
        async move {
            let body = json!({"argv": ["echo", "hi"]}).to_string();
            let accept = [("Accept", "application/x-ndjson")];
            http_full(&addr, "POST", &format!("/workspaces/{ws}/exec"), Some(&token), Some(&body), &accept, Duration::from_secs(60)).await
        }
    });
    let claimed = eventually(Duration::from_secs(10), "the exec to be claimed", || async {
        let c = store::claim_each_shard(&db, JobKind::Exec.queue(), 1, "test-worker").await.unwrap();
        c.into_iter().next()
    })
    .await;
    let rollbacks = || async {
        let n: i64 = sqlx::query_scalar("SELECT xact_rollback FROM pg_stat_database WHERE datname = current_database()")
            .fetch_one(&db)
            .await
            .unwrap();
        n
    };
    let before = rollbacks().await;
    let ack = Ack {
        id: claimed.id.clone(),
        fence: claimed.fence,
        state: JobState::Done,
        outcome: None,
        delay_ms: 0,
        error: None,
        error_detail: None,
        result: Some(json!({ "exit_code": 0 })),
        batch: claimed.batch,
        tid: Some(claimed.tid.clone()),
    };
    assert_eq!(store::write_acks(&db, &[ack], &[]).await.unwrap().stale, vec![]);
    // The follower has seen the job ended and failed to read its output (twice, at least).
    eventually(Duration::from_secs(20), "reads of the output to fail after the job ended", || async {
        (rollbacks().await >= before + 2).then_some(())
    })
    .await;
    assert!(!stream.is_finished(), "the stream ended while its output could not be read");
    sqlx::query("ALTER TABLE exec_output_away RENAME TO exec_output").execute(&db).await.unwrap();
    let chunk = molecule_jobs::output::Chunk { seq: 1, stream: "stdout".into(), data: "hi\n".into() };
    molecule_jobs::output::append(&db, &claimed.id, &[chunk]).await.unwrap();
    let r = stream.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let frames = frames(&r.body);
    assert_eq!(frames, vec![json!({"stream": "stdout", "data": "hi\n"}), json!({"exit_code": 0})], "{}", r.body);
}

/// 200 exec jobs that each returned 1 MiB of output.
async fn jobs_with_big_results(db: &PgPool, org: OrgId, ws: WorkspaceId) -> Vec<String> {
    let big = "x".repeat(1 << 20);
    let mut conn = db.acquire().await.unwrap();
    let jobs: Vec<NewJob> = (0..200).map(|i| NewJob::new(JobKind::Exec, &json!({ "i": i })).org(org).workspace(ws)).collect();
    let ids: Vec<String> = enqueue_many(&mut conn, &jobs).await.unwrap().iter().map(|i| i.as_str().to_string()).collect();
    drop(conn);
    let claimed = store::claim_each_shard(db, JobKind::Exec.queue(), 200, "test-worker").await.unwrap();
    assert_eq!(claimed.len(), 200);
    for batch in claimed.chunks(20) {
        let acks: Vec<Ack> = batch
            .iter()
            .map(|c| Ack {
                id: c.id.clone(),
                fence: c.fence,
                state: JobState::Done,
                outcome: None,
                delay_ms: 0,
                error: None,
                error_detail: None,
                result: Some(json!({ "exit_code": 0, "stdout": big, "stderr": "" })),
                batch: c.batch,
                tid: Some(c.tid.clone()),
            })
            .collect();
        assert_eq!(store::write_acks(db, &acks, &[]).await.unwrap().stale, vec![], "every ack applied");
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_200_jobs_with_1_mib_results_stays_small_and_each_job_keeps_its_result() {
    let (db, _) = fresh_db().await;
    let (org, token) = org(&db).await;
    let ws = WorkspaceId::new();
    let ids = jobs_with_big_results(&db, org, ws).await;
    let addr = start_api(db.clone(), strict_auth()).await;
    let r = http_full(&addr, "GET", "/jobs?limit=200", Some(&token), None, &[], Duration::from_secs(30)).await;
    assert_eq!(r.status, 200);
    assert!(r.body.len() < 10 << 20, "listing is {} bytes", r.body.len());
    let items = r.json()["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 200);
    for j in &items {
        assert_eq!(j["status"], "succeeded");
        assert!(j.get("result").is_none(), "{j}");
        assert_eq!(j["result_url"], format!("/jobs/{}", j["id"].as_str().unwrap()));
    }
    // The full result is one request away.
    let one: Value = http(&addr, "GET", &format!("/jobs/{}", ids[7]), Some(&token), None, None).await.json();
    assert_eq!(one["result"]["stdout"].as_str().unwrap().len(), 1 << 20);
}
