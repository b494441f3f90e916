//! Workspaces as hostile neighbours (issue 12), on the real Docker engine: what a
//! workspace's container may do, what a fork bomb in one does to the rest, and what one
//! tenant's rescue bundle says about another's workspaces.

use molecule_backends::docker::{container_name, DockerBackend, DockerConfig};
use molecule_domain::WorkspaceId;
use molecule_jobs::{enqueue, JobKind, NewJob};
use molecule_tests::{eventually, http, Platform};
use serde_json::{json, Value};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn platform(pools: &[JobKind]) -> Platform {
    let backend = DockerBackend::connect(DockerConfig::local()).await.expect("a Docker engine (tests/run.sh starts one)");
    Platform::start(Arc::new(backend), pools).await
}

fn inspect(ws: &str) -> Value {
    let out = Command::new("docker").args(["inspect", &container_name(ws.parse::<WorkspaceId>().unwrap())]).output().unwrap();
    serde_json::from_slice::<Value>(&out.stdout).unwrap()[0].clone()
}

/// Runs argv in a workspace and waits for the job's result.
async fn exec(p: &Platform, ws: &str, argv: Value, timeout_s: u64) -> Value {
    let r = p.req("POST", &format!("/workspaces/{ws}/exec"), Some(&json!({"argv": argv, "timeout_s": timeout_s}))).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let job = r.json()["job_id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(timeout_s + 60), "the exec to end", || async {
        let j = p.req("GET", &format!("/jobs/{job}"), None).await.json();
        ["succeeded", "dead", "failed", "interrupted"].contains(&j["status"].as_str().unwrap_or("")).then_some(j)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_is_hardened_and_a_fork_bomb_stays_inside_it() {
    let p = platform(&[JobKind::Provision, JobKind::Stop, JobKind::Exec]).await;
    let a = p.create(json!({"name": "bomb", "runtime": "echo", "tier": 3})).await;
    let b = p.create(json!({"name": "neighbour", "runtime": "echo", "tier": 3})).await;
    p.wait_status(&a, "online", Duration::from_secs(30)).await;
    p.wait_status(&b, "online", Duration::from_secs(30)).await;

    let c = inspect(&a);
    let hc = &c["HostConfig"];
    assert_eq!(hc["CapDrop"], json!(["ALL"]), "{hc}");
    let added: Vec<&str> = hc["CapAdd"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    for cap in ["NET_RAW", "CAP_NET_RAW", "NET_ADMIN", "SYS_ADMIN"] {
        assert!(!added.contains(&cap), "{cap} added: {added:?}");
    }
    assert!(hc["SecurityOpt"].as_array().unwrap().iter().any(|o| o.as_str().unwrap().starts_with("no-new-privileges")), "{hc}");
    assert_eq!(hc["Privileged"], false);
    assert_eq!(hc["PidsLimit"], 512, "tier 3's process limit");
    assert_eq!(hc["Memory"], 1024 * 1024 * 1024_i64, "tier 3's memory limit");
    assert_eq!(hc["NanoCpus"], 1_000_000_000_i64);
    assert_eq!(c["Config"]["User"], "65532:65532", "the reference agent runs as a non-root user");

    // A command exec'd into it holds no capability at all (CAP_NET_RAW is bit 13).
    let status = exec(&p, &a, json!(["cat", "/proc/self/status"]), 10).await;
    let text = status["result"]["stdout"].as_str().unwrap_or_default().to_string();
    let cap = |name: &str| {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {text}"));
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    assert_eq!(cap("CapEff:") & (1 << 13), 0, "no CAP_NET_RAW");
    assert_eq!(cap("CapEff:"), 0, "no effective capability");
    assert_eq!(cap("CapBnd:") & (1 << 13), 0, "and none to gain");
    assert!(text.lines().any(|l| l.starts_with("NoNewPrivs:") && l.ends_with('1')), "{text}");
    let id = exec(&p, &a, json!(["id", "-u"]), 10).await;
    assert_eq!(id["result"]["stdout"], "65532\n");

    // A fork bomb: the container's process limit holds it; the server and the neighbour
    // keep answering.
    let bomb = exec(&p, &a, json!(["sh", "-c", "b(){ b | b & }; b; sleep 30"]), 8).await;
    assert_eq!(bomb["result"]["outcome"], "timeout", "{bomb}");
    let t0 = Instant::now();
    let health = http(&p.addr, "GET", "/healthz", None, None, None).await;
    assert_eq!(health.status, 200);
    assert!(t0.elapsed() < Duration::from_secs(2), "healthz took {:?}", t0.elapsed());
    let alive = exec(&p, &b, json!(["echo", "still here"]), 10).await;
    assert_eq!((alive["status"].as_str(), alive["result"]["stdout"].as_str()), (Some("succeeded"), Some("still here\n")), "{alive}");
    let pids = inspect(&a)["HostConfig"]["PidsLimit"].as_i64().unwrap();
    let out = Command::new("docker").args(["top", &container_name(a.parse().unwrap())]).output().unwrap();
    let running = String::from_utf8_lossy(&out.stdout).lines().count().saturating_sub(1) as i64;
    assert!(running <= pids, "{running} processes under a limit of {pids}");

    p.delete(&a).await;
    p.delete(&b).await;
    p.stop().await;
}

/// A rescue bundle lists only its own workspace's containers: another tenant's running
/// workspace on the same engine is not named anywhere in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescue_bundle_names_no_other_workspace() {
    let p = platform(&[JobKind::Provision, JobKind::Stop, JobKind::RescueCapture]).await;
    let mine = p.create(json!({"name": "mine", "runtime": "echo", "tier": 3})).await;
    let mut c = p.db.acquire().await.unwrap();
    let (other_org, other_token) = molecule_domain::tokens::create_org(&mut c, "other").await.unwrap();
    drop(c);
    let r = http(&p.addr, "POST", "/workspaces", Some(&other_token), Some(&json!({"name": "theirs", "runtime": "echo"}).to_string()), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let theirs = r.json()["workspace"]["id"].as_str().unwrap().to_string();
    p.wait_status(&mine, "online", Duration::from_secs(30)).await;
    eventually(Duration::from_secs(30), "their workspace online", || async {
        let r = http(&p.addr, "GET", &format!("/workspaces/{theirs}"), Some(&other_token), None, None).await;
        (r.json()["status"] == "online").then_some(())
    })
    .await;

    let org: uuid::Uuid = sqlx::query_scalar("SELECT org_id FROM workspaces WHERE id = $1::uuid").bind(&mine).fetch_one(&p.db).await.unwrap();
    let mut c = p.db.acquire().await.unwrap();
    let ws: WorkspaceId = mine.parse().unwrap();
    let job = NewJob::new(JobKind::RescueCapture, &json!({"workspace_id": ws, "trigger": "bootstrap_failed"})).org(org.into()).workspace(ws);
    enqueue(&mut c, &job).await.unwrap();
    drop(c);
    let bundle = eventually(Duration::from_secs(30), "the bundle", || async {
        let r = p.req("GET", &format!("/workspaces/{mine}/rescue"), None).await;
        (r.status == 200).then(|| r.body)
    })
    .await;
    let their_container = container_name(theirs.parse().unwrap());
    assert!(bundle.contains(&container_name(ws)), "the bundle lists its own container: {bundle}");
    for leak in [theirs.as_str(), their_container.as_str(), &other_org.to_string()] {
        assert!(!bundle.contains(leak), "{leak} appears in another tenant's bundle");
    }
    p.delete(&mine).await;
    let r = http(&p.addr, "DELETE", &format!("/workspaces/{theirs}"), Some(&other_token), None, None).await;
    for j in r.json()["job_ids"].as_array().cloned().unwrap_or_default() {
        let j = j.as_str().unwrap().to_string();
        eventually(Duration::from_secs(30), "their stop job", || async {
            (http(&p.addr, "GET", &format!("/jobs/{j}"), Some(&other_token), None, None).await.json()["status"] == "succeeded").then_some(())
        })
        .await;
    }
    p.stop().await;
}
