//! Workspaces as hostile neighbours (issue 12), on the real Docker engine: what a
//! workspace's container may do, what a fork bomb in one does to the rest, and what one
//! tenant's rescue bundle says about another's workspaces.

use molecule_backends::docker::{DockerBackend, DockerConfig, container_name};
use molecule_domain::WorkspaceId;
use molecule_jobs::{JobKind, NewJob, enqueue};
use molecule_tests::{Platform, eventually, http};
use serde_json::{Value, json};
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
    // keep answering. The command's own shell forks its sleep before the bomb and then only
    // waits: forking after it, it met the limit itself now and then and exited 2 ("can't
    // fork") before the timeout.
    let bomb = exec(&p, &a, json!(["sh", "-c", "sleep 30 & b(){ b | b & }; b; wait"]), 8).await;
    assert_eq!(bomb["result"]["outcome"], "timeout", "{bomb}");
    assert!(bomb["result"]["stderr"].as_str().unwrap_or_default().contains("can't fork"), "the bomb met the process limit: {bomb}");
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
    let r = http(&p.addr, "POST", "/workspaces", Some(&other_token), Some(&json!({"name": "theirs", "runtime": "echo"}).to_string()), None)
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let theirs = r.json()["workspace"]["id"].as_str().unwrap().to_string();
    p.wait_status(&mine, "online", Duration::from_secs(30)).await;
    eventually(Duration::from_secs(30), "their workspace online", || async {
        let r = http(&p.addr, "GET", &format!("/workspaces/{theirs}"), Some(&other_token), None, None).await;
        (r.json()["status"] == "online").then_some(())
    })
    .await;

    let org: uuid::Uuid =
        sqlx::query_scalar("SELECT org_id FROM workspaces WHERE id = $1::uuid").bind(&mine).fetch_one(&p.db).await.unwrap();
    let mut c = p.db.acquire().await.unwrap();
    let ws: WorkspaceId = mine.parse().unwrap();
    let job =
        NewJob::new(JobKind::RescueCapture, &json!({"workspace_id": ws, "trigger": "bootstrap_failed"})).org(org.into()).workspace(ws);
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
            (http(&p.addr, "GET", &format!("/jobs/{j}"), Some(&other_token), None, None).await.json()["status"] == "succeeded")
                .then_some(())
        })
        .await;
    }
    p.stop().await;
}

fn b64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in s.as_bytes().chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            out.push(if i <= c.len() { T[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

/// A shell script run in the workspace without the script's text in the argv (argv is
/// audited as is): it arrives base64-encoded.
fn script(text: &str) -> Value {
    json!(["sh", "-c", format!("echo {} | base64 -d | sh", b64(text))])
}

/// X4 end to end: an exec printing the whole secrets corpus leaves none of them in the
/// job's result, the NDJSON frames or the stored output chunks, and the harmless corpus
/// comes through byte for byte; a private key printed one line per second does not leak
/// through the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_printed_by_an_exec_leave_nowhere() {
    use molecule_domain::redact::corpus::{HARMLESS, SECRETS};
    let p = platform(&[JobKind::Provision, JobKind::Stop, JobKind::Exec]).await;
    let ws = p.create(json!({"name": "leaky", "runtime": "echo", "tier": 3})).await;
    p.wait_status(&ws, "online", Duration::from_secs(30)).await;

    let mut corpus = String::new();
    for (_, text, _) in SECRETS {
        corpus.push_str(text);
        corpus.push('\n');
    }
    for text in HARMLESS {
        corpus.push_str(text);
        corpus.push('\n');
    }
    // A key, one line per second.
    let slow = "printf '%s\\n' '-----BEGIN OPENSSH PRIVATE KEY-----'; sleep 1; printf '%s\\n' b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ; \
                sleep 1; printf '%s\\n' AAAAAAAAABAAAAMwAAAAtzc2gtZWQyNTUxOQAAACBkIOC1; sleep 1; printf '%s\\n' '-----END OPENSSH PRIVATE KEY-----'; echo after";
    let text = format!("cat <<'MOLECULE_CORPUS_END'\n{corpus}MOLECULE_CORPUS_END\n{slow}\n");
    let body = json!({"argv": script(&text), "timeout_s": 60}).to_string();
    let r = molecule_tests::http_full(
        &p.addr,
        "POST",
        &format!("/workspaces/{ws}/exec"),
        Some(&p.org),
        Some(&body),
        &[("Accept", "application/x-ndjson")],
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let frames = molecule_tests::frames(&r.body);
    assert_eq!(frames.last().unwrap()["exit_code"], 0, "{}", r.body);
    let streamed: String = frames.iter().filter_map(|f| f["data"].as_str()).collect();
    let job: String =
        sqlx::query_scalar("SELECT id FROM apalis.jobs WHERE job_type = 'exec' ORDER BY id DESC LIMIT 1").fetch_one(&p.db).await.unwrap();
    let result = p.req("GET", &format!("/jobs/{job}"), None).await.json()["result"]["stdout"].as_str().unwrap().to_string();
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT data FROM exec_output WHERE job_id = $1 ORDER BY seq").bind(&job).fetch_all(&p.db).await.unwrap();
    let stored = stored.concat();
    for (family, text, secret) in SECRETS {
        for (place, out) in [("result", &result), ("stream", &streamed), ("exec_output", &stored)] {
            assert!(!out.contains(secret), "{family} ({text:?}) leaked through the {place}");
        }
    }
    for text in HARMLESS {
        assert!(result.contains(text) && streamed.contains(text), "harmless {text:?} changed");
    }
    // No frame carries any line of the slow key.
    for f in &frames {
        let d = f["data"].as_str().unwrap_or("");
        assert!(!d.contains("b3BlbnNzaC1rZXkt") && !d.contains("AAAAAAAAABAAAAMw"), "a key line left in a frame: {d:?}");
    }
    assert!(streamed.ends_with("[REDACTED]\nafter\n"), "{:?}", &streamed[streamed.len().saturating_sub(200)..]);
    p.delete(&ws).await;
    p.stop().await;
}

/// A tenant who replaces its config files with links to host files gets nothing from a
/// restart: the platform writes the new secrets without following links (the volume is
/// written from the host).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_planted_in_the_config_volume_is_not_followed() {
    use std::os::unix::fs::MetadataExt;
    let p = platform(&[JobKind::Provision, JobKind::Stop, JobKind::Restart, JobKind::Exec]).await;
    let ws = p.create(json!({"name": "planter", "runtime": "echo", "tier": 3})).await;
    p.wait_status(&ws, "online", Duration::from_secs(30)).await;
    let target = std::env::temp_dir().join(format!("molecule-host-file-{}", uuid::Uuid::new_v4().simple()));
    std::fs::write(&target, "host data\n").unwrap();
    let plant = format!(
        "rm -f /configs/.auth_token /configs/.platform_inbound_secret && ln -s {t} /configs/.auth_token && ln -s {t} /configs/.platform_inbound_secret",
        t = target.display()
    );
    let planted = exec(&p, &ws, json!(["sh", "-c", plant]), 10).await;
    assert_eq!(planted["result"]["exit_code"], 0, "{planted}");

    assert_eq!(p.req("POST", &format!("/workspaces/{ws}/restart"), Some(&json!({}))).await.status, 202);
    eventually(Duration::from_secs(60), "the restarted workspace online", || async { (p.status(&ws).await == "online").then_some(()) })
        .await;
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "host data\n", "the host file was not written through the link");
    let meta = std::fs::metadata(&target).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "nor handed to the workspace's user");
    let _ = std::fs::remove_file(&target);
    p.delete(&ws).await;
    p.stop().await;
}
