//! Workspaces for real: the API, the job runtime and the Docker backend against a real
//! Docker engine and PostgreSQL, with the reference agent (runtime `echo`) registering
//! back (J1–J3, A12). Needs `infra/build-agent-image.sh` to have run (tests/run.sh does).

use molecule_backends::docker::{DockerBackend, DockerConfig, container_name, volume_name};
use molecule_domain::{WorkspaceId, tokens};
use molecule_jobs::{JobKind, NewJob, Runtime, RuntimeConfig, enqueue};
use molecule_tests::{eventually, fresh_db, http, start_api, strict_auth};
use molecule_workers::provision::StartFailure;
use serde_json::{Value, json};
use sqlx::PgPool;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Env {
    db: PgPool,
    addr: String,
    token: String,
    rt: Option<Runtime>,
}

impl Env {
    async fn new(registry: &str) -> Env {
        Env::with(registry, None, None).await
    }

    /// `platform_url`: where agents register (None: this API); `loki`: LOKI_URL.
    async fn with(registry: &str, platform_url: Option<String>, loki: Option<String>) -> Env {
        Env::build(registry, platform_url, loki, DockerConfig::local()).await
    }

    async fn build(registry: &str, platform_url: Option<String>, loki: Option<String>, docker: DockerConfig) -> Env {
        let (db, _) = fresh_db().await;
        // As plain `serve`: no loopback flag; agents come online through their assigned URL.
        let addr = start_api(db.clone(), strict_auth()).await;
        let mut c = db.acquire().await.unwrap();
        let (_, token) = tokens::create_org(&mut c, "docker-e2e").await.unwrap();
        drop(c);
        let backend = DockerBackend::connect(docker).await.expect("a Docker engine (tests/run.sh starts one)");
        let deps = molecule_workers::Deps {
            db: db.clone(),
            backend: Arc::new(backend),
            platform_url: platform_url.unwrap_or_else(|| format!("http://{addr}")),
            registry: registry.into(),
            image_local_override: false,
            redactor: Some(Arc::new(molecule_domain::redact::Redactor::new())),
            loki_url: loki.clone(),
            agents: molecule_workers::a2a::AgentClient::new(false).expect("agent client"),
        };
        let mut specs = molecule_workers::handlers::pool_specs(&deps, &Default::default());
        for s in &mut specs {
            // Short backoff so retry paths finish within a test.
            s.retry.base = Duration::from_millis(300);
            s.retry.cap = Duration::from_secs(2);
        }
        let cfg = RuntimeConfig { poll_interval: Duration::from_millis(200), grace: Duration::from_secs(20), ..Default::default() };
        let rt = Runtime::start(db.clone(), cfg, specs);
        Env { db, addr, token, rt: Some(rt) }
    }

    async fn req(&self, method: &str, path: &str, body: Option<Value>) -> molecule_tests::Resp {
        http(&self.addr, method, path, Some(&self.token), body.map(|b| b.to_string()).as_deref(), None).await
    }

    async fn status(&self, ws: &str) -> String {
        self.req("GET", &format!("/workspaces/{ws}"), None).await.json()["status"].as_str().unwrap_or("").to_string()
    }

    async fn wait_status(&self, ws: &str, want: &str, within: Duration) {
        eventually(within, &format!("workspace {ws} to be {want}"), || async { (self.status(ws).await == want).then_some(()) }).await
    }

    async fn job(&self, id: &str) -> Value {
        self.req("GET", &format!("/jobs/{id}"), None).await.json()
    }

    async fn wait_job(&self, id: &str, want: &str, within: Duration) -> Value {
        eventually(within, &format!("job {id} to be {want}"), || async {
            let j = self.job(id).await;
            (j["status"] == want).then_some(j)
        })
        .await
    }

    /// Deletes a workspace and waits for its stop jobs, so no container outlives a test.
    async fn delete(&self, ws: &str) {
        let r = self.req("DELETE", &format!("/workspaces/{ws}"), None).await;
        for j in r.json()["job_ids"].as_array().cloned().unwrap_or_default() {
            self.wait_job(j.as_str().unwrap(), "succeeded", Duration::from_secs(30)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown().await;
        }
    }
}

fn docker(args: &[&str]) -> (bool, String) {
    let out = Command::new("docker").args(args).output().expect("docker CLI");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn container_exists(ws: WorkspaceId) -> bool {
    docker(&["inspect", &container_name(ws)]).0
}

fn volume_exists(ws: WorkspaceId) -> bool {
    docker(&["volume", "inspect", &volume_name(ws)]).0
}

fn ws_id(s: &str) -> WorkspaceId {
    s.parse().unwrap()
}

async fn create(env: &Env, body: Value) -> (String, String) {
    let r = env.req("POST", "/workspaces", Some(body)).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let v = r.json();
    (v["workspace"]["id"].as_str().unwrap().to_string(), v["job_id"].as_str().unwrap().to_string())
}

/// The secrets also reach a workspace through the engine's archive API (the path for an
/// engine that is not on this host), with the same file modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_the_agent_through_the_archive_api_too() {
    let env = Env::build("127.0.0.1:9/none", None, None, DockerConfig { direct_volume_writes: false, ..DockerConfig::local() }).await;
    let (ws, _job) = create(&env, json!({"name": "archive", "runtime": "echo", "tier": 3})).await;
    env.wait_status(&ws, "online", Duration::from_secs(30)).await;
    let (ok, owner_only) = docker(&["exec", &container_name(ws_id(&ws)), "sh", "-c", "ls -lna /configs | grep -c '^-rw------- '"]);
    assert!(ok && owner_only == "2", "both secret files, mode 0600: {owner_only}");
    env.delete(&ws).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_comes_online_then_delete_removes_container_and_volume() {
    let env = Env::new("127.0.0.1:9/none").await;
    let t0 = Instant::now();
    let (ws, _job) = create(&env, json!({"name": "e2e", "runtime": "echo", "tier": 3})).await;
    env.wait_status(&ws, "online", Duration::from_secs(30)).await;
    eprintln!("online after {:?}", t0.elapsed());
    // Online without the loopback flag: the agent registered the URL the platform assigned.
    let (url, assigned): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT url, assigned_url FROM workspaces WHERE id = $1::uuid").bind(&ws).fetch_one(&env.db).await.unwrap();
    assert!(assigned.as_deref().is_some_and(|u| u.starts_with("http://127.0.0.1:")), "{assigned:?}");
    assert_eq!(url, assigned);
    let (ok, owner_only) = docker(&["exec", &container_name(ws_id(&ws)), "sh", "-c", "ls -lna /configs | grep -c '^-rw------- '"]);
    assert!(ok && owner_only == "2", "both secret files, mode 0600, written into the volume directly: {owner_only}");
    let ev = env.req("GET", &format!("/workspaces/{ws}/events"), None).await.json();
    let mut kinds: Vec<&str> = ev.as_array().unwrap().iter().map(|e| e["event_type"].as_str().unwrap()).collect();
    kinds.sort();
    // STARTED (written by the provision job after the engine started the container) may land
    // after ONLINE: the agent can register before the job writes it.
    assert_eq!(kinds, ["WORKSPACE_CREATED", "WORKSPACE_ONLINE", "WORKSPACE_STARTED"], "{ev}");
    let id = ws_id(&ws);
    let name = container_name(id);
    let (_, labels) = docker(&["inspect", &name, "--format", "{{json .Config.Labels}}"]);
    let labels: Value = serde_json::from_str(&labels).unwrap();
    assert_eq!(labels["molecule.platform.managed"], "true");
    assert_eq!(labels["molecule.workspace.id"], ws.as_str());
    let (_, vlabels) = docker(&["volume", "inspect", &volume_name(id), "--format", "{{json .Labels}}"]);
    let vlabels: Value = serde_json::from_str(&vlabels).unwrap();
    assert_eq!(vlabels["molecule.workspace.id"], ws.as_str());
    let (_, envs) = docker(&["inspect", &name, "--format", "{{json .Config.Env}}"]);
    assert!(!envs.contains("PARENT_ID"), "no PARENT_ID without a parent: {envs}");
    // The token in the volume is the live one (hash match), written before the start.
    let (ok, token) = docker(&["exec", &name, "cat", "/configs/.auth_token"]);
    assert!(ok);
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM workspace_auth_tokens WHERE workspace_id = $1 AND revoked_at IS NULL AND token_sha256 = sha256($2::bytea)",
    )
    .bind(id.0)
    .bind(token.as_bytes())
    .fetch_one(&env.db)
    .await
    .unwrap();
    assert_eq!(live, 1);
    let row: (Option<String>, Option<String>) =
        sqlx::query_as("SELECT url, platform_inbound_secret FROM workspaces WHERE id = $1").bind(id.0).fetch_one(&env.db).await.unwrap();
    assert!(row.0.unwrap().starts_with("http://127.0.0.1:"));
    assert!(row.1.is_some());

    let probe = DockerBackend::connect(DockerConfig::local()).await.unwrap();
    use molecule_backends::Backend;
    assert!(matches!(probe.is_running(id).await, (true, None)), "is_running: definitely running");

    let r = env.req("DELETE", &format!("/workspaces/{ws}"), None).await;
    assert_eq!(r.status, 202);
    let stop_job = r.json()["job_ids"][0].as_str().unwrap().to_string();
    env.wait_job(&stop_job, "succeeded", Duration::from_secs(30)).await;
    assert!(matches!(probe.is_running(id).await, (false, None)), "is_running: definitely stopped");
    assert!(!container_exists(id), "container gone");
    assert!(!volume_exists(id), "volume gone");
    assert_eq!(env.status(&ws).await, "removed");
    let again = env.req("DELETE", &format!("/workspaces/{ws}"), None).await;
    assert_eq!(again.json()["job_ids"].as_array().unwrap().len(), 0, "deleting again is a no-op");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_replaces_the_container_and_the_old_token_stops_working() {
    let env = Env::new("127.0.0.1:9/none").await;
    let (ws, _) = create(&env, json!({"name": "r", "runtime": "echo"})).await;
    env.wait_status(&ws, "online", Duration::from_secs(30)).await;
    let id = ws_id(&ws);
    let name = container_name(id);
    let (_, old_container) = docker(&["inspect", &name, "--format", "{{.Id}}"]);
    let (_, old_token) = docker(&["exec", &name, "cat", "/configs/.auth_token"]);
    let r = http(&env.addr, "GET", &format!("/workspaces/{ws}"), Some(&old_token), None, None).await;
    assert_eq!(r.status, 200, "the agent's token works before the restart");

    let r = env.req("POST", &format!("/workspaces/{ws}/restart"), Some(json!({}))).await;
    assert_eq!(r.status, 202);
    let job = r.json()["job_id"].as_str().unwrap().to_string();
    env.wait_job(&job, "succeeded", Duration::from_secs(40)).await;
    env.wait_status(&ws, "online", Duration::from_secs(30)).await;
    let (_, new_container) = docker(&["inspect", &name, "--format", "{{.Id}}"]);
    assert_ne!(old_container, new_container, "the container was replaced");
    let (_, new_token) = docker(&["exec", &name, "cat", "/configs/.auth_token"]);
    assert_ne!(old_token, new_token);
    let r = http(&env.addr, "GET", &format!("/workspaces/{ws}"), Some(&old_token), None, None).await;
    assert_eq!(r.status, 401, "the old token no longer works");
    let r = http(&env.addr, "GET", &format!("/workspaces/{ws}"), Some(&new_token), None, None).await;
    assert_eq!(r.status, 200, "the re-registered agent's token works");
    // The agent re-registered after the restart (its heartbeat time moved past the job).
    let ev = env.req("GET", &format!("/workspaces/{ws}/events"), None).await.json();
    let types: Vec<&str> = ev.as_array().unwrap().iter().map(|e| e["event_type"].as_str().unwrap()).collect();
    assert_eq!(types.iter().filter(|t| **t == "WORKSPACE_ONLINE").count(), 2, "{types:?}");
    env.delete(&ws).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_container_that_is_already_gone_succeeds() {
    let env = Env::new("127.0.0.1:9/none").await;
    let (ws, _) = create(&env, json!({"name": "g", "runtime": "echo"})).await;
    env.wait_status(&ws, "online", Duration::from_secs(30)).await;
    let id = ws_id(&ws);
    assert!(docker(&["rm", "-f", &container_name(id)]).0);
    let r = env.req("DELETE", &format!("/workspaces/{ws}"), None).await;
    let job = r.json()["job_ids"][0].as_str().unwrap().to_string();
    let j = env.wait_job(&job, "succeeded", Duration::from_secs(30)).await;
    assert_eq!(j["attempts"], 1);
    assert!(!volume_exists(id), "the volume is removed after the (trivially) successful stop");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_retries_then_fails_with_a_canned_error() {
    // Images come from a registry on a loopback port where nothing listens: pulls fail fast.
    let env = Env::new("127.0.0.1:9/none").await;
    let org: uuid::Uuid = sqlx::query_scalar("SELECT id FROM organizations").fetch_one(&env.db).await.unwrap();
    let ws: uuid::Uuid =
        sqlx::query_scalar("INSERT INTO workspaces (org_id, name, runtime, tier) VALUES ($1, 'noimg', 'hermes', 2) RETURNING id")
            .bind(org)
            .fetch_one(&env.db)
            .await
            .unwrap();
    let mut c = env.db.acquire().await.unwrap();
    let job = enqueue(
        &mut c,
        &NewJob::new(JobKind::Provision, &json!({"workspace_id": ws}))
            .org(molecule_domain::OrgId(org))
            .workspace(WorkspaceId(ws))
            .max_attempts(3),
    )
    .await
    .unwrap();
    drop(c);
    let j = env.wait_job(job.as_str(), "dead", Duration::from_secs(60)).await;
    assert_eq!(j["attempts"], 3, "retried before giving up");
    let log = j["attempt_log"].as_array().unwrap();
    assert_eq!(log.len(), 3);
    // Issue 12: the job says a code and a canned sentence; the image reference, the
    // registry host and the engine's words are for operators only.
    assert_eq!(j["last_error"], molecule_jobs::failures::public("image_missing"), "{j}");
    let shown = j.to_string();
    for leak in ["127.0.0.1:9", "workspace-template-hermes", "/none/"] {
        assert!(!shown.contains(leak), "the tenant's job view leaks {leak:?}: {shown}");
    }
    let detail = molecule_jobs::status::error_detail(&env.db, &job).await.unwrap().unwrap();
    assert!(detail.contains("127.0.0.1:9/none/workspace-template-hermes"), "operators see the image: {detail}");
    let w = env.req("GET", &format!("/workspaces/{ws}"), None).await.json();
    assert_eq!(w["status"], "failed");
    let msg = w["last_sample_error"].as_str().unwrap();
    // Issue 8: it says why (the image is missing) in a canned sentence.
    assert_eq!(msg, StartFailure::ImageMissing.final_message());
    for leak in ["127.0.0.1", "hermes", "workspace-template", "docker", "pull", "none"] {
        assert!(!msg.to_lowercase().contains(leak), "canned error leaks {leak:?}: {msg}");
    }
    let ev = env.req("GET", &format!("/workspaces/{ws}/events"), None).await.json();
    assert_eq!(ev[0]["event_type"], "WORKSPACE_PROVISION_FAILED");
    assert_eq!(ev[0]["payload"]["reason"], "image_missing");
    // Each failed attempt before the last said so while it retried.
    let retries: Vec<&Value> = ev.as_array().unwrap().iter().filter(|e| e["event_type"] == "WORKSPACE_PROVISION_RETRYING").collect();
    assert_eq!(retries.len(), 2, "{ev}");
    assert!(retries.iter().all(|e| e["payload"]["reason"] == "image_missing"));
    // J1: giving up also queues exactly one rescue capture, a boot failure's (J4).
    let rescues: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT id, job FROM apalis.jobs WHERE job_type = 'rescue_capture' AND workspace_id = $1")
            .bind(ws)
            .fetch_all(&env.db)
            .await
            .unwrap();
    assert_eq!(rescues.len(), 1, "one rescue capture for the failed provision");
    let args: Value = serde_json::from_slice(&rescues[0].1).unwrap();
    assert_eq!(args["trigger"], "bootstrap_failed");
    assert_eq!(ev[0]["payload"]["rescue_job_id"], rescues[0].0);
    for e in ev.as_array().unwrap() {
        let payload = e["payload"].to_string();
        assert!(!payload.contains("127.0.0.1") && !payload.contains("hermes"), "event leaks detail: {payload}");
    }
    assert!(!container_exists(WorkspaceId(ws)));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_workspace_gets_both_secrets_and_its_parent_id() {
    let env = Env::new("127.0.0.1:9/none").await;
    let (parent, _) = create(&env, json!({"name": "parent", "runtime": "echo"})).await;
    let (child, _) = create(&env, json!({"name": "child", "runtime": "echo", "parent_id": parent})).await;
    env.wait_status(&parent, "online", Duration::from_secs(30)).await;
    env.wait_status(&child, "online", Duration::from_secs(30)).await;
    for ws in [&parent, &child] {
        let (tokens, secret): (i64, Option<String>) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM workspace_auth_tokens t WHERE t.workspace_id = w.id AND t.revoked_at IS NULL), \
             w.platform_inbound_secret FROM workspaces w WHERE w.id = $1",
        )
        .bind(ws_id(ws).0)
        .fetch_one(&env.db)
        .await
        .unwrap();
        assert_eq!(tokens, 1, "{ws}: one live workspace token");
        let secret = secret.expect("platform inbound secret minted");
        let (_, in_volume) = docker(&["exec", &container_name(ws_id(ws)), "cat", "/configs/.platform_inbound_secret"]);
        assert_eq!(in_volume, secret, "{ws}: the volume holds the minted inbound secret");
    }
    let (_, envs) = docker(&["inspect", &container_name(ws_id(&child)), "--format", "{{json .Config.Env}}"]);
    assert!(envs.contains(&format!("PARENT_ID={parent}")), "{envs}");
    let r = env.req("DELETE", &format!("/workspaces/{parent}"), None).await;
    for j in r.json()["job_ids"].as_array().unwrap() {
        env.wait_job(j.as_str().unwrap(), "succeeded", Duration::from_secs(30)).await;
    }
    assert!(!container_exists(ws_id(&child)) && !container_exists(ws_id(&parent)));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_answers_a2a_only_with_the_inbound_secret() {
    let env = Env::new("127.0.0.1:9/none").await;
    let (ws, _) = create(&env, json!({"name": "a2a", "runtime": "echo"})).await;
    env.wait_status(&ws, "online", Duration::from_secs(30)).await;
    let (url, secret): (String, String) = sqlx::query_as("SELECT url, platform_inbound_secret FROM workspaces WHERE id = $1")
        .bind(ws_id(&ws).0)
        .fetch_one(&env.db)
        .await
        .unwrap();
    let addr = url.trim_start_matches("http://").trim_end_matches('/').to_string();
    let body = json!({"jsonrpc": "2.0", "id": 7, "method": "message/send",
        "params": {"message": {"role": "user", "parts": [{"kind": "text", "text": "hello"}], "messageId": "m1", "kind": "message"}}})
    .to_string();
    let r = http(&addr, "POST", "/", Some(&secret), Some(&body), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["result"]["parts"][0]["text"], "hello");
    assert_eq!(r.json()["id"], 7);
    let r = http(&addr, "POST", "/", Some("wrong"), Some(&body), None).await;
    assert_eq!(r.status, 401);
    env.delete(&ws).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_teardown_keeps_the_volume_and_retries_with_backoff() {
    let env = Env::new("127.0.0.1:9/none").await;
    let (ws, _) = create(&env, json!({"name": "busy", "runtime": "echo"})).await;
    env.wait_status(&ws, "online", Duration::from_secs(30)).await;
    let id = ws_id(&ws);
    // Another container holds the config volume: the engine refuses to remove it.
    let blocker = format!("blocker-{}", &ws[..8]);
    let vol = format!("{}:/held", volume_name(id));
    assert!(
        docker(&[
            "run",
            "-d",
            "--name",
            &blocker,
            "--network",
            "host",
            "-v",
            &vol,
            "--entrypoint",
            "/bin/sleep",
            molecule_backends::image::ECHO_IMAGE,
            "300"
        ])
        .0
    );
    let r = env.req("DELETE", &format!("/workspaces/{ws}"), None).await;
    let job = r.json()["job_ids"][0].as_str().unwrap().to_string();
    let j = eventually(Duration::from_secs(30), "a failed teardown attempt", || async {
        let j = env.job(&job).await;
        (j["attempt_log"].as_array().map_or(0, |l| l.len()) >= 2).then_some(j)
    })
    .await;
    assert!(j["attempt_log"][0]["error"].as_str().unwrap().starts_with("backend: "), "{j}");
    let detail = molecule_jobs::status::error_detail(&env.db, &j["id"].as_str().unwrap().parse().unwrap()).await.unwrap().unwrap();
    assert!(detail.contains("409"), "the engine's answer is for operators: {detail}");
    assert!(volume_exists(id), "the volume is kept while its removal fails");
    assert!(!container_exists(id), "the workspace container itself is stopped");
    let gaps: Vec<i64> = j["attempt_log"]
        .as_array()
        .unwrap()
        .windows(2)
        .map(|w| {
            let a: chrono::DateTime<chrono::Utc> = w[0]["started_at"].as_str().unwrap().parse().unwrap();
            let b: chrono::DateTime<chrono::Utc> = w[1]["started_at"].as_str().unwrap().parse().unwrap();
            (b - a).num_milliseconds()
        })
        .collect();
    assert!(gaps.iter().all(|g| *g >= 300), "retries wait at least the base backoff: {gaps:?}");
    assert!(docker(&["rm", "-f", &blocker]).0);
    env.wait_job(&job, "succeeded", Duration::from_secs(30)).await;
    assert!(!volume_exists(id), "removed once the engine allows it");
    env.stop().await;
}

async fn exec(env: &Env, ws: &str, body: Value) -> molecule_tests::Resp {
    env.req("POST", &format!("/workspaces/{ws}/exec"), Some(body)).await
}

async fn exec_result(env: &Env, ws: &str, body: Value) -> Value {
    let r = exec(env, ws, body).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let job = r.json()["job_id"].as_str().unwrap().to_string();
    env.wait_job(&job, "succeeded", Duration::from_secs(60)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_argv_separates_streams_caps_output_and_kills_on_timeout() {
    let env = Env::new("127.0.0.1:9/none").await;
    let (ws, _) = create(&env, json!({"name": "ex", "runtime": "echo", "tier": 3})).await;
    env.wait_status(&ws, "online", Duration::from_secs(30)).await;

    let j = exec_result(&env, &ws, json!({"argv": ["sh", "-c", "echo out; echo err >&2; exit 3"]})).await;
    let r = &j["result"];
    assert_eq!((r["outcome"].as_str(), r["exit_code"].as_i64()), (Some("exited"), Some(3)));
    assert_eq!((r["stdout"].as_str(), r["stderr"].as_str()), (Some("out\n"), Some("err\n")));

    // No shell is added: the argument is printed literally.
    let j = exec_result(&env, &ws, json!({"argv": ["echo", "$(id)"]})).await;
    assert_eq!(j["result"]["stdout"], "$(id)\n");

    // 3 MiB of output: 1 MiB kept, plus the marker.
    let j = exec_result(&env, &ws, json!({"argv": ["sh", "-c", "yes aaaaaaaaaaaaaaa | head -c 3145728"]})).await;
    let out = j["result"]["stdout"].as_str().unwrap();
    assert_eq!(j["result"]["truncated"]["stdout"], true);
    assert!(out.ends_with(molecule_workers::exec::TRUNCATION_MARKER));
    assert_eq!(out.len(), (1 << 20) + molecule_workers::exec::TRUNCATION_MARKER.len());

    // Timeout: the command is killed and the job says so within about the timeout.
    let t0 = Instant::now();
    let j = exec_result(&env, &ws, json!({"argv": ["sleep", "200"], "timeout_s": 2})).await;
    assert_eq!(j["result"]["outcome"], "timeout");
    assert!(j["result"]["exit_code"].is_null());
    assert!(t0.elapsed() < Duration::from_secs(6), "timed out after {:?}", t0.elapsed());
    let (_, ps) = docker(&["exec", &container_name(ws_id(&ws)), "ps"]);
    assert!(!ps.contains("sleep 200"), "the process is gone: {ps}");

    // The audit: one row per exec, argv and exit code, never output — even of a secret.
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events").fetch_one(&env.db).await.unwrap();
    assert_eq!(before, 4);
    let (_, token) = docker(&["exec", &container_name(ws_id(&ws)), "cat", "/configs/.auth_token"]);
    let j = exec_result(&env, &ws, json!({"argv": ["cat", "/configs/.auth_token"]})).await;
    assert!(!j.to_string().contains(&token[8..24]), "the job result is redacted");
    let rows: Vec<(String, Vec<String>, Option<i32>, i64)> =
        sqlx::query_as("SELECT actor, argv, exit_code, duration_ms FROM audit_events WHERE workspace_id = $1::uuid ORDER BY id")
            .bind(&ws)
            .fetch_all(&env.db)
            .await
            .unwrap();
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[4].1, ["cat", "/configs/.auth_token"]);
    assert_eq!(rows[4].2, Some(0));
    assert!(rows[0].0.starts_with("org:"));
    assert_eq!(rows[0].2, Some(3));
    let dump: String =
        sqlx::query_scalar("SELECT string_agg(row_to_json(a)::text, ' ') FROM audit_events a").fetch_one(&env.db).await.unwrap();
    assert!(!dump.contains(&token[8..24]), "no output in the audit table");
    assert!(!dump.contains("aaaaaaaaaaaaaaa\n"), "no output in the audit table");
    env.delete(&ws).await;
    env.stop().await;
}

/// J5 timeout → killed: the whole command, not only its first process. A shell's child
/// outlives a kill of the shell alone; a background child of a shell that already exited
/// keeps the output open until the timeout, and is the exec's too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_exec_kills_every_process_it_started() {
    let env = Env::new("127.0.0.1:9/none").await;
    let (ws, _) = create(&env, json!({"name": "tree", "runtime": "echo", "tier": 3})).await;
    env.wait_status(&ws, "online", Duration::from_secs(30)).await;
    let container = container_name(ws_id(&ws));
    for (argv, left) in
        [(json!(["sh", "-c", "sleep 200; echo done"]), "sleep 200"), (json!(["sh", "-c", "sleep 201 & exit 0"]), "sleep 201")]
    {
        let j = exec_result(&env, &ws, json!({"argv": argv, "timeout_s": 2})).await;
        assert_eq!(j["result"]["outcome"], "timeout", "{argv}: {j}");
        eventually(Duration::from_secs(10), &format!("no {left:?} left in the container after {argv}"), || async {
            let (ok, ps) = docker(&["exec", &container, "ps"]);
            (ok && !ps.contains(left)).then_some(())
        })
        .await;
    }
    env.delete(&ws).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_refuses_bad_requests_low_tiers_and_other_orgs_without_queueing() {
    let env = Env::new("127.0.0.1:9/none").await;
    let (low, _) = create(&env, json!({"name": "t2", "runtime": "echo", "tier": 2})).await;
    let (hi, _) = create(&env, json!({"name": "t3", "runtime": "echo", "tier": 3})).await;
    env.wait_status(&hi, "online", Duration::from_secs(30)).await;
    let r = exec(&env, &low, json!({"argv": ["id"]})).await;
    assert_eq!(r.status, 403, "{}", r.body);
    for bad in [
        json!({"cmd": "ls -la"}),
        json!({"argv": "ls -la"}),
        json!({"argv": []}),
        json!({"argv": ["ls", 3]}),
        json!({"argv": ["ls"], "timeout_s": 0}),
    ] {
        let r = exec(&env, &hi, bad.clone()).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
    let mut c = env.db.acquire().await.unwrap();
    let (_, other) = tokens::create_org(&mut c, "other").await.unwrap();
    drop(c);
    let r =
        http(&env.addr, "POST", &format!("/workspaces/{hi}/exec"), Some(&other), Some(&json!({"argv": ["id"]}).to_string()), None).await;
    assert_eq!(r.status, 404);
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE job_type = 'exec'").fetch_one(&env.db).await.unwrap();
    assert_eq!(queued, 0, "no refused request queued a job");
    let r = exec(&env, &hi, json!({"argv": ["true"], "timeout_s": 999})).await;
    assert_eq!(r.json()["timeout_s"], 120, "clamped");
    env.delete(&hi).await;
    env.delete(&low).await;
    env.stop().await;
}

/// Reads a streaming (chunked) response: the NDJSON frames and when each arrived.
async fn read_frames(addr: &str, path: &str, token: &str, body: &str) -> (u16, Vec<(Duration, Value)>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nAccept: application/x-ndjson\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let t0 = Instant::now();
    let (mut raw, mut frames, mut buf) = (String::new(), Vec::new(), [0u8; 8192]);
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf)).await.expect("stream stalled").unwrap();
        if n == 0 {
            break;
        }
        raw.push_str(&String::from_utf8_lossy(&buf[..n]));
        // Frames are JSON lines inside chunks; take every complete one seen so far.
        while let Some(start) = raw.find("\n{").map(|i| i + 1).or_else(|| raw.starts_with('{').then_some(0)) {
            let Some(end) = raw[start..].find('\n') else { break };
            let line = raw[start..start + end].to_string();
            frames.push((t0.elapsed(), serde_json::from_str::<Value>(&line).unwrap()));
            raw.replace_range(..start + end, "");
        }
    }
    let status = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(200);
    (status, frames)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_streams_frames_in_order_from_a_worker_in_another_process() {
    let (db, url) = fresh_db().await;
    let addr = start_api(db.clone(), strict_auth()).await;
    let mut c = db.acquire().await.unwrap();
    let (_, token) = tokens::create_org(&mut c, "stream").await.unwrap();
    drop(c);
    // The worker pools run in their own process (`molecule worker`), the API in this one.
    let mut cmd = Command::new(molecule_tests::bin_path("molecule"));
    cmd.args(["worker", "--pool", "provision=2", "--pool", "exec=2", "--pool", "stop=2"])
        .env("DATABASE_URL", &url)
        .env("MOLECULE_BACKEND", "docker")
        .env("PLATFORM_URL", format!("http://{addr}"))
        .env("MOLECULE_POLL_INTERVAL_MS", "200");
    let mut worker = molecule_tests::Proc::spawn(cmd, "worker");
    let env = Env { db, addr, token, rt: None };
    let (ws, _) = create(&env, json!({"name": "s", "runtime": "echo", "tier": 4})).await;
    env.wait_status(&ws, "online", Duration::from_secs(30)).await;

    let body = json!({"argv": ["sh", "-c", "echo one; sleep 1; echo two >&2; sleep 1; echo three; exit 4"]}).to_string();
    let (status, frames) = read_frames(&env.addr, &format!("/workspaces/{ws}/exec"), &env.token, &body).await;
    assert_eq!(status, 200);
    let values: Vec<&Value> = frames.iter().map(|(_, v)| v).collect();
    assert_eq!(
        values,
        [
            &json!({"stream": "stdout", "data": "one\n"}),
            &json!({"stream": "stderr", "data": "two\n"}),
            &json!({"stream": "stdout", "data": "three\n"}),
            &json!({"exit_code": 4}),
        ],
        "{frames:?}"
    );
    assert!(frames[2].0 - frames[0].0 >= Duration::from_millis(1500), "frames arrive as produced: {frames:?}");

    let body = json!({"argv": ["sleep", "30"], "timeout_s": 1}).to_string();
    let (_, frames) = read_frames(&env.addr, &format!("/workspaces/{ws}/exec"), &env.token, &body).await;
    assert_eq!(frames.last().unwrap().1, json!({"error": "timeout", "status": 504}));

    env.delete(&ws).await;
    worker.signal(libc::SIGTERM);
    assert_eq!(worker.wait_exit(Duration::from_secs(30)).and_then(|s| s.code()), Some(0));
}

/// A stand-in for Loki's push endpoint on loopback: records each push (path and JSON body)
/// and answers 204 only when the body has Loki's push shape.
async fn fake_loki() -> (String, Arc<std::sync::Mutex<Vec<(String, Value)>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let seen = s2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 65536];
                loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf);
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| l.to_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
                            .unwrap_or(0);
                        if body.len() >= len {
                            let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                            let v: Value = serde_json::from_str(&body[..len]).unwrap_or(Value::Null);
                            let ok = v["streams"][0]["stream"].is_object() && v["streams"][0]["values"].is_array();
                            seen.lock().unwrap().push((path, v));
                            let status = if ok { "204 No Content" } else { "400 Bad Request" };
                            let _ = sock
                                .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes())
                                .await;
                            break;
                        }
                    }
                }
            });
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boot_failure_leaves_one_redacted_rescue_bundle_shipped_to_loki() {
    let (loki, pushes) = fake_loki().await;
    // Agents are told a platform address where nothing listens: this one never registers.
    let env = Env::with("127.0.0.1:9/none", Some("http://127.0.0.1:9".into()), Some(loki)).await;
    let (ws, _) = create(&env, json!({"name": "wedged", "runtime": "echo"})).await;
    let id = ws_id(&ws);
    eventually(Duration::from_secs(30), "the container to run", || async { container_exists(id).then_some(()) }).await;
    // A secret planted in the workspace's config.
    let planted = "sk-proj-4fJk29XzQ8LmN0pR7sT1uVwY3aBcDeFgHiJkLmNo";
    assert!(
        docker(&["exec", &container_name(id), "sh", "-c", &format!("printf 'model: x\\napi_key: {planted}\\n' > /configs/config.yaml")]).0
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.status(&ws).await, "provisioning", "the agent never registered");

    // The control plane's verdict (admin route of an API with ADMIN_TOKEN).
    let admin_addr = start_api(env.db.clone(), molecule_api::AuthConfig { admin_token: Some("adm".into()), ..strict_auth() }).await;
    let verdict = http(
        &admin_addr,
        "POST",
        &format!("/admin/workspaces/{ws}/bootstrap-failed"),
        Some("adm"),
        Some(&json!({"error": "agent never registered"}).to_string()),
        None,
    )
    .await;
    assert_eq!(verdict.status, 200, "{}", verdict.body);
    let job = verdict.json()["job_id"].as_str().unwrap().to_string();
    let j = env.wait_job(&job, "succeeded", Duration::from_secs(60)).await;
    assert_eq!(j["result"]["shipped"], true, "{j}");
    assert_eq!(env.status(&ws).await, "failed", "capture never changes the status");

    let bundle = env.req("GET", &format!("/workspaces/{ws}/rescue"), None).await;
    assert_eq!(bundle.status, 200);
    let b = bundle.json();
    assert_eq!(b["trigger"], "bootstrap_failed");
    let names: Vec<&str> = b["sections"].as_object().unwrap().keys().map(String::as_str).collect();
    for s in molecule_backends::RESCUE_SECTIONS {
        assert!(names.contains(&s), "{s} missing from {names:?}");
    }
    let config = b["sections"]["config.yaml"].as_str().unwrap();
    assert!(config.contains("model: x") && config.contains("api_key: [REDACTED]"), "{config}");
    assert!(!b.to_string().contains(&planted[..12]), "no part of the secret in the bundle");
    assert!(b["sections"]["agent-logs"].as_str().unwrap().contains("echo-agent"));
    assert!(b["sections"]["runtime-env"].as_str().unwrap().contains("RUNTIME=echo"));

    let pushes = pushes.lock().unwrap().clone();
    assert_eq!(pushes.len(), 1);
    let (path, body) = &pushes[0];
    assert_eq!(path, "/loki/api/v1/push");
    let stream = &body["streams"][0];
    assert_eq!(stream["stream"]["kind"], "rescue");
    assert_eq!(stream["stream"]["event_type"], "rescue.bundle");
    assert_eq!(stream["stream"]["workspace_id"], ws.as_str());
    assert!(stream["stream"]["org"].as_str().is_some_and(|o| !o.is_empty()));
    assert_eq!(stream["values"].as_array().unwrap().len(), molecule_backends::RESCUE_SECTIONS.len());
    assert!(stream["values"][0][0].as_str().unwrap().parse::<i64>().is_ok(), "timestamps are nanosecond strings");
    assert!(!body.to_string().contains(&planted[..12]), "no part of the secret shipped");

    // A second verdict adds nothing.
    let again = http(&admin_addr, "POST", &format!("/admin/workspaces/{ws}/bootstrap-failed"), Some("adm"), Some("{}"), None).await;
    assert_eq!(again.json()["flipped"], false);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM rescue_bundles").fetch_one(&env.db).await.unwrap();
    assert_eq!(n, 1);
    // Nothing reaps a failed workspace: its container and volume are still there.
    assert!(container_exists(id) && volume_exists(id));
    env.delete(&ws).await;
    env.stop().await;
}
