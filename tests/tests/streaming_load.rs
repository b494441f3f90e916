//! Issue 9: a default `serve` process (its own pools, Docker backend) under 40 clients
//! following exec output at once. Every other route keeps answering quickly, and every
//! stream ends with its command's exit code: followers share one LISTEN connection and
//! hold no pooled connection while they wait, so workers can still claim and ack.

use molecule_domain::tokens;
use molecule_tests::{Proc, bin_path, eventually, frames, free_port, fresh_db, http, http_full};
use serde_json::{Value, json};
use std::process::Command;
use std::time::{Duration, Instant};

const STREAMS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_ndjson_execs_neither_stall_the_server_nor_each_other() {
    let (db, url) = fresh_db().await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(bin_path("molecule"));
    // Nothing but where to listen and which database: every limit and pool at its default.
    cmd.arg("serve")
        .env("DATABASE_URL", &url)
        .env("LISTEN_ADDR", &addr)
        .env("MOLECULE_LOG_FORMAT", "json")
        .env_remove("MOLECULE_POOLS")
        .env_remove("MOLECULE_DEV");
    let mut server = Proc::spawn(cmd, "serve-under-streams");
    eventually(Duration::from_secs(60), "serve to be ready", || async {
        matches!(molecule_tests::http_get(&addr, "/readyz").await, Ok((200, _))).then_some(())
    })
    .await;
    let mut c = db.acquire().await.unwrap();
    let (_, token) = tokens::create_org(&mut c, "streams").await.unwrap();
    drop(c);
    let r =
        http(&addr, "POST", "/workspaces", Some(&token), Some(&json!({"name": "s", "runtime": "echo", "tier": 3}).to_string()), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let ws = r.json()["workspace"]["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(60), "the workspace to come online", || async {
        let w = http(&addr, "GET", &format!("/workspaces/{ws}"), Some(&token), None, None).await.json();
        (w["status"] == "online").then_some(())
    })
    .await;

    // 40 commands of 3 s each: more than the exec pool runs at once (16), so streams also
    // wait in the queue while others run.
    let streams: Vec<_> = (0..STREAMS)
        .map(|i| {
            let (addr, token, ws) = (addr.clone(), token.clone(), ws.clone());
            tokio::spawn(async move {
                let body = json!({"argv": ["sh", "-c", format!("echo start {i}; sleep 3; echo end {i}")]}).to_string();
                let accept = [("Accept", "application/x-ndjson")];
                let r = http_full(
                    &addr,
                    "POST",
                    &format!("/workspaces/{ws}/exec"),
                    Some(&token),
                    Some(&body),
                    &accept,
                    Duration::from_secs(180),
                )
                .await;
                (i, r)
            })
        })
        .collect();

    // Meanwhile the other routes, one after another, as a canvas polling them would.
    let routes = [
        "/healthz".to_string(),
        format!("/workspaces/{ws}"),
        "/jobs?limit=50".to_string(),
        format!("/workspaces/{ws}/events"),
        "/workspaces".to_string(),
    ];
    let (mut worst, mut probes) = ((Duration::ZERO, String::new()), 0);
    while streams.iter().any(|s| !s.is_finished()) {
        for path in &routes {
            let t0 = Instant::now();
            let r = http_full(&addr, "GET", path, Some(&token), None, &[], Duration::from_secs(10)).await;
            let took = t0.elapsed();
            assert_eq!(r.status, 200, "GET {path} while streaming: {}", r.body);
            if took > worst.0 {
                worst = (took, path.clone());
            }
            probes += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("slowest probe: GET {} in {:?} over {probes} probes", worst.1, worst.0);
    assert!(probes >= 20, "the routes were probed throughout ({probes})");
    assert!(worst.0 < Duration::from_secs(1), "GET {} took {:?} while 40 streams ran", worst.1, worst.0);

    for s in streams {
        let (i, r) = s.await.unwrap();
        assert_eq!(r.status, 200, "stream {i}: {}", r.body);
        let f = frames(&r.body);
        let out: String = f.iter().filter_map(|v| v["data"].as_str()).collect();
        assert_eq!(out, format!("start {i}\nend {i}\n"), "stream {i}: {f:?}");
        assert_eq!(f.last(), Some(&json!({"exit_code": 0})), "stream {i}: {f:?}");
    }
    let ran: Vec<(String, Option<i32>)> =
        sqlx::query_as("SELECT outcome, exit_code FROM audit_events WHERE argv[1] = 'sh' ORDER BY id").fetch_all(&db).await.unwrap();
    assert_eq!(ran, vec![("exited".to_string(), Some(0)); STREAMS], "each command ran once");

    let r = http(&addr, "DELETE", &format!("/workspaces/{ws}"), Some(&token), None, None).await;
    for j in r.json()["job_ids"].as_array().cloned().unwrap_or_default() {
        let id = j.as_str().unwrap().to_string();
        eventually(Duration::from_secs(60), "the stop job", || async {
            let v: Value = http(&addr, "GET", &format!("/jobs/{id}"), Some(&token), None, None).await.json();
            (v["status"] == "succeeded").then_some(())
        })
        .await;
    }
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(60)).and_then(|s| s.code()), Some(0));
}
