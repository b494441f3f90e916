//! The EC2 backend for real (issue 13, SPEC §6): moto's AWS API server behind a recording
//! proxy, and a local OpenSSH server standing in for every instance (its address mapped
//! with MOLECULE_EC2_SSH_ADDRESS), all on 127.0.0.1. The platform is the `molecule serve`
//! binary with MOLECULE_BACKEND=ec2; the instance's part (cloud-init running the
//! user-data, the agent registering) is played by this test from the user-data EC2 was
//! given.

use molecule_backends::docker::{DockerBackend, DockerConfig};
use molecule_backends::ec2::{Ec2Backend, Ec2Config, InstanceStore};
use molecule_backends::{Backend, BackendError, ExecRequest, StartSpec};
use molecule_domain::tokens::MintedSecrets;
use molecule_domain::{OrgId, WorkspaceId};
use molecule_tests::aws::{AwsProxy, Fault, Moto, SSH_USER, Sshd, UserData, set_mode};
use molecule_tests::{Proc, bin_path, eventually, free_port, fresh_db, http};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const AMI: &str = "ami-0123456789abcdef0";
const ADMIN: &str = "ec2-test-admin-token";

/// A directory the SSH user can read and write: the instance's config directory.
fn instance_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("molecule-ec2-{tag}-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    set_mode(&dir, 0o777);
    dir
}

fn ec2_config(proxy: &str, sshd: &Sshd, config_dir: &str) -> Ec2Config {
    Ec2Config {
        region: "us-east-1".into(),
        endpoint_url: Some(proxy.to_string()),
        ami: AMI.into(),
        instance_type: "t3.small".into(),
        subnet_id: None,
        security_group_ids: vec![],
        ssh_user: SSH_USER.into(),
        ssh_address: Some(sshd.addr.clone()),
        config_dir: config_dir.into(),
        agent_port: 8000,
        limits: Default::default(),
    }
}

/// The SDK's credential chain reads these; the metadata service (a link-local address)
/// is never asked.
fn aws_test_env() {
    // SAFETY: set before any thread reads the environment (the first thing each test does).
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }
}

/// Instance ids and pinned host keys in memory: for driving the backend directly.
#[derive(Default)]
struct MapStore {
    ids: Mutex<HashMap<WorkspaceId, String>>,
    keys: Mutex<HashMap<String, String>>,
}

#[async_trait::async_trait]
impl InstanceStore for MapStore {
    async fn instance_id(&self, ws: WorkspaceId) -> Result<Option<String>, BackendError> {
        Ok(self.ids.lock().unwrap().get(&ws).cloned())
    }
    async fn host_key(&self, instance_id: &str) -> Result<Option<String>, BackendError> {
        Ok(self.keys.lock().unwrap().get(instance_id).cloned())
    }
    async fn pin_host_key(&self, instance_id: &str, key: &str) -> Result<String, BackendError> {
        Ok(self.keys.lock().unwrap().entry(instance_id.to_string()).or_insert_with(|| key.to_string()).clone())
    }
}

/// moto behind the proxy, a local sshd whose authorized_keys receives the pushed keys,
/// and the backend over them with an in-memory store.
struct Rig {
    sshd: Sshd,
    _moto: Moto,
    proxy: AwsProxy,
    store: Arc<MapStore>,
    backend: Ec2Backend,
}

impl Rig {
    async fn start(config_dir: &str) -> Rig {
        aws_test_env();
        let sshd = Sshd::start().await;
        let moto = Moto::start().await;
        let proxy = AwsProxy::start(&moto.url, Some(sshd.authorized_keys.clone())).await;
        let store = Arc::new(MapStore::default());
        let backend = Ec2Backend::connect(ec2_config(&proxy.url, &sshd, config_dir), store.clone()).await.expect("the EC2 API answers");
        Rig { sshd, _moto: moto, proxy, store, backend }
    }

    /// Launches an instance for a new workspace and records its id.
    async fn launch(&self) -> (WorkspaceId, String) {
        let ws = WorkspaceId::new();
        let id = self.backend.start(&spec(ws, "img:1")).await.unwrap().instance_id.unwrap();
        self.store.ids.lock().unwrap().insert(ws, id.clone());
        (ws, id)
    }
}

fn spec(ws: WorkspaceId, image: &str) -> StartSpec {
    StartSpec::new(
        ws,
        OrgId(uuid::Uuid::new_v4()),
        None,
        "echo".into(),
        image.into(),
        "http://127.0.0.1:9".into(),
        MintedSecrets::for_tests("mol_ws_contract", "mol_pis_contract"),
    )
    .with_tier(3)
}

fn exec_req(argv: &[&str], timeout: Duration) -> ExecRequest {
    ExecRequest { argv: argv.iter().map(|s| s.to_string()).collect(), timeout, max_bytes_per_stream: 1 << 20, stop: None }
}

// ---------------------------------------------------------------------------------------
// One contract, two backends: start, is_running, exec, read_file, list_managed, stop.

async fn contract(backend: &dyn Backend, record: &dyn Fn(WorkspaceId, Option<String>), image: &str, writable: &str) {
    let ws = WorkspaceId::new();
    let started = backend.start(&spec(ws, image)).await.expect("start");
    record(ws, started.instance_id.clone());
    let b = backend.name();
    assert!(backend.is_running(ws).await.0, "{b}: running after start");
    assert!(backend.is_running(ws).await.1.is_none(), "{b}: a definite answer");
    let listed = backend.list_managed().await.expect("list");
    let mine: Vec<_> = listed.iter().filter(|m| m.workspace_id.as_deref() == Some(ws.to_string().as_str())).collect();
    assert_eq!(mine.len(), 1, "{b}: one managed instance for the workspace: {listed:?}");
    assert!(backend.is_named_for(mine[0], ws, false), "{b}: the listed instance is the workspace's");

    // Exec: argv arrives literally, both streams and the exit code come back.
    let sink = |_: molecule_backends::OutputStream, _: &[u8]| {};
    let out = eventually(Duration::from_secs(30), &format!("{b}: the first exec"), || async {
        backend.exec(ws, &exec_req(&["printf", "%s|", "a'b", "$(id)", "x;y", "\"q\""], Duration::from_secs(20)), &sink).await.ok()
    })
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a'b|$(id)|x;y|\"q\"|", "{b}");
    assert_eq!(out.exit_code, Some(0), "{b}");
    let out = backend.exec(ws, &exec_req(&["sh", "-c", "echo out; echo err >&2; exit 3"], Duration::from_secs(20)), &sink).await.unwrap();
    assert_eq!((out.stdout.as_slice(), out.stderr.as_slice(), out.exit_code), (&b"out\n"[..], &b"err\n"[..], Some(3)), "{b}");

    // read_file: a file the workspace wrote, and one that does not exist.
    let path = format!("{writable}/contract-{}", fastrand::u32(..));
    let wrote = backend
        .exec(ws, &exec_req(&["sh", "-c", &format!("printf 'hello\\nworld' > {path}")], Duration::from_secs(20)), &sink)
        .await
        .unwrap();
    assert_eq!(wrote.exit_code, Some(0), "{b}: {}", String::from_utf8_lossy(&wrote.stderr));
    assert_eq!(backend.read_file(ws, &path).await.unwrap().as_deref(), Some(&b"hello\nworld"[..]), "{b}");
    assert_eq!(backend.read_file(ws, &format!("{path}-missing")).await.unwrap(), None, "{b}");

    // Stop: not running, not listed; a second stop is still a success.
    backend.stop(ws).await.expect("stop");
    assert_eq!(backend.is_running(ws).await.0, false, "{b}: stopped");
    let listed = backend.list_managed().await.unwrap();
    assert!(!listed.iter().any(|m| m.workspace_id.as_deref() == Some(ws.to_string().as_str())), "{b}: gone from the list");
    backend.stop(ws).await.expect("stopping again");
    backend.remove_volume(ws).await.expect("volume");
    // Never started: not running, stop is a no-op.
    let never = WorkspaceId::new();
    let (running, err) = backend.is_running(never).await;
    assert!(!running && err.is_none(), "{b}: a workspace never started is definitely not running: {err:?}");
    backend.stop(never).await.expect("stop of a workspace never started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_contract_holds_on_docker() {
    let docker = DockerBackend::connect(DockerConfig::local()).await.expect("a Docker engine (tests/run.sh starts one)");
    contract(&docker, &|_, id| assert_eq!(id, None, "Docker has no instance id"), molecule_backends::image::ECHO_IMAGE, "/configs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_contract_holds_on_ec2() {
    let dir = instance_dir("contract");
    let rig = Rig::start(dir.to_str().unwrap()).await;
    let record = |ws: WorkspaceId, id: Option<String>| {
        let id = id.expect("an EC2 start returns the instance id");
        assert!(id.starts_with("i-"), "{id}");
        rig.store.ids.lock().unwrap().insert(ws, id);
    };
    contract(&rig.backend, &record, "registry.example/echo:1", dir.to_str().unwrap()).await;
    // Every exec and read pushed its own key.
    let keys: Vec<String> = rig.proxy.calls("SendSSHPublicKey").iter().map(|c| c.params["SSHPublicKey"].clone()).collect();
    assert!(keys.len() >= 5, "three execs and two reads, one session each: {}", keys.len());
    assert_eq!(keys.iter().collect::<std::collections::HashSet<_>>().len(), keys.len(), "a fresh key per session");
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------------------
// is_running (SPEC §6): no answer, an error status or an unreadable answer is "alive,
// degraded signal" — never a reason to restart; terminated or unknown is not running.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn is_running_says_alive_unless_ec2_says_otherwise() {
    let rig = Rig::start("/configs").await;
    let (proxy, store, backend, sshd) = (&rig.proxy, &rig.store, &rig.backend, &rig.sshd);
    let (ws, id) = rig.launch().await;
    assert_eq!(backend.is_running(ws).await.0, true);

    // The SDK tries a call twice: each fault is injected for both attempts.
    proxy.fail("DescribeInstances", 2, Fault::Status(503));
    let (alive, err) = backend.is_running(ws).await;
    assert!(alive && matches!(err, Some(BackendError::Engine { status: 503, .. })), "5xx → (true, err): {err:?}");
    proxy.clear_faults();
    proxy.fail("DescribeInstances", 2, Fault::Garbage);
    let (alive, err) = backend.is_running(ws).await;
    assert!(alive && matches!(err, Some(BackendError::EngineUnavailable(_))), "undecodable → (true, err): {err:?}");
    proxy.clear_faults();
    proxy.fail("DescribeInstances", 2, Fault::Status(400));
    let (alive, err) = backend.is_running(ws).await;
    assert!(alive && err.is_some(), "any other refusal → (true, err): {err:?}");
    proxy.clear_faults();

    // No answer at all: an endpoint where nothing listens, and one that hangs up on
    // every request.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut cfg = ec2_config(&dead, sshd, "/configs");
    cfg.endpoint_url = Some(dead);
    assert!(
        matches!(Ec2Backend::connect(cfg.clone(), store.clone()).await, Err(BackendError::EngineUnavailable(_))),
        "start checks the API"
    );
    let (alive, err) = Ec2Backend::new(cfg, store.clone()).await.is_running(ws).await;
    assert!(alive && matches!(err, Some(BackendError::EngineUnavailable(_))), "connection refused → (true, err): {err:?}");
    let hangup = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hangup_url = format!("http://{}", hangup.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((conn, _)) = hangup.accept().await {
            drop(conn);
        }
    });
    let (alive, err) = Ec2Backend::new(ec2_config(&hangup_url, sshd, "/configs"), store.clone()).await.is_running(ws).await;
    assert!(alive && matches!(err, Some(BackendError::EngineUnavailable(_))), "connection closed → (true, err): {err:?}");

    // Definite answers.
    assert_eq!(backend.is_running(WorkspaceId::new()).await.0, false, "no instance recorded");
    store.ids.lock().unwrap().insert(ws, "i-00000000000000000".into());
    let (alive, err) = backend.is_running(ws).await;
    assert!(!alive && err.is_none(), "an id EC2 does not know: {err:?}");
    store.ids.lock().unwrap().insert(ws, id.clone());
    backend.stop(ws).await.unwrap();
    let (alive, err) = backend.is_running(ws).await;
    assert!(!alive && err.is_none(), "terminated (or shutting down): {err:?}");
    let terminate = proxy.calls("TerminateInstances");
    assert_eq!(terminate.last().unwrap().list("InstanceId"), vec![id], "terminated by its real id");
}

/// Trust on first use, per instance: a changed host key is refused, with a typed error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_host_key_is_refused() {
    let mut rig = Rig::start("/configs").await;
    let (ws, id) = rig.launch().await;
    let (store, backend) = (rig.store.clone(), &rig.backend);
    let sink = |_: molecule_backends::OutputStream, _: &[u8]| {};
    let out = backend.exec(ws, &exec_req(&["true"], Duration::from_secs(10)), &sink).await.unwrap();
    assert_eq!(out.exit_code, Some(0));
    let pinned = store.keys.lock().unwrap().get(&id).cloned().expect("pinned on first use");
    assert!(pinned.starts_with("ssh-ed25519 "), "{pinned}");

    rig.sshd.rotate_host_key().await;
    let backend = &rig.backend;
    let err = backend.exec(ws, &exec_req(&["true"], Duration::from_secs(10)), &sink).await.unwrap_err();
    assert!(err.to_string().contains("host key"), "{err}");
    assert_eq!(store.keys.lock().unwrap().get(&id), Some(&pinned), "the pin stays");
    // Another instance (a new id) pins the new key.
    let (ws2, _) = rig.launch().await;
    assert_eq!(backend.exec(ws2, &exec_req(&["true"], Duration::from_secs(10)), &sink).await.unwrap().exit_code, Some(0));
}

/// Before a key is pinned, the keys the instance printed on its console at boot decide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_printed_at_boot_decide_the_first_connection() {
    let rig = Rig::start("/configs").await;
    let real = std::fs::read_to_string(rig.sshd.dir.join("host_ed25519.pub")).unwrap();
    let real: String = real.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    let block =
        |key: &str| format!("boot\n-----BEGIN SSH HOST KEY KEYS-----\n{key} root@ip-10-1-2-3\n-----END SSH HOST KEY KEYS-----\nlogin:\n");
    let sink = |_: molecule_backends::OutputStream, _: &[u8]| {};

    rig.proxy.set_console(block(&real).into_bytes());
    let (ws, id) = rig.launch().await;
    let out = rig.backend.exec(ws, &exec_req(&["true"], Duration::from_secs(10)), &sink).await.unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(rig.store.keys.lock().unwrap().get(&id), Some(&real), "the listed key is pinned");

    // Another instance whose console lists a different key: whoever answers is refused.
    let other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
    rig.proxy.set_console(block(other).into_bytes());
    let (ws2, id2) = rig.launch().await;
    let err = rig.backend.exec(ws2, &exec_req(&["true"], Duration::from_secs(10)), &sink).await.unwrap_err();
    assert!(err.to_string().contains("printed at boot"), "{err}");
    assert_eq!(rig.store.keys.lock().unwrap().get(&id2), None, "nothing pinned for a refused key");
}

/// The remote process group is killed on the deadline: a background child included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_exec_leaves_no_process_behind() {
    let rig = Rig::start("/configs").await;
    let (ws, _) = rig.launch().await;
    let backend = &rig.backend;
    let tag = format!("{}", 300 + fastrand::u32(0..600));
    let sink = |_: molecule_backends::OutputStream, _: &[u8]| {};
    let started = std::time::Instant::now();
    let out = backend
        .exec(ws, &exec_req(&["sh", "-c", &format!("echo before; sleep {tag} & sleep {tag}; echo never")], Duration::from_secs(2)), &sink)
        .await
        .unwrap();
    assert!(out.timed_out && out.exit_code.is_none(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "before\n");
    assert!(out.stderr.is_empty(), "the wrapper's marker never reaches the output: {:?}", String::from_utf8_lossy(&out.stderr));
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
    let gone = |pattern: String| async move {
        eventually(Duration::from_secs(10), &format!("every `{pattern}` to be killed"), || async {
            let o = Command::new("pgrep").args(["-u", SSH_USER, "-f", &pattern]).output().unwrap();
            o.stdout.is_empty().then_some(())
        })
        .await
    };
    gone(format!("sleep {tag}")).await;

    // The worker's shutdown grace running out (`stop`): killed the same way, `interrupted`.
    let tag = format!("{}", 1000 + fastrand::u32(0..600));
    let (stop, rx) = tokio::sync::watch::channel(false);
    let mut req = exec_req(&["sh", "-c", &format!("sleep {tag} & sleep {tag}")], Duration::from_secs(60));
    req.stop = Some(rx);
    let pattern = format!("^sleep {tag}$");
    let stopper = async {
        eventually(Duration::from_secs(20), "the command to run", || async {
            let o = Command::new("pgrep").args(["-u", SSH_USER, "-f", &pattern]).output().unwrap();
            (!o.stdout.is_empty()).then_some(())
        })
        .await;
        let _ = stop.send(true);
    };
    let (out, ()) = tokio::join!(backend.exec(ws, &req, &sink), stopper);
    let out = out.unwrap();
    assert!(out.interrupted && !out.timed_out && out.exit_code.is_none(), "{out:?}");
    gone(format!("sleep {tag}")).await;
}

/// S2 for instances: a removed row's instance and an instance with no row are
/// terminated; a failed workspace's (rescue grace) and an online one's are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orphan_sweep_terminates_removed_workspaces_instances_only() {
    aws_test_env();
    let sshd = Sshd::start().await;
    let moto = Moto::start().await;
    let proxy = AwsProxy::start(&moto.url, None).await;
    let (db, _) = fresh_db().await;
    let store = Arc::new(molecule_workers::instances::DbInstances::new(db.clone()));
    let backend = Arc::new(Ec2Backend::connect(ec2_config(&proxy.url, &sshd, "/configs"), store).await.unwrap());
    let org: uuid::Uuid = sqlx::query_scalar("INSERT INTO organizations (name) VALUES ('o') RETURNING id").fetch_one(&db).await.unwrap();
    let mut ids = HashMap::new();
    for status in ["removed", "failed", "online", "no_row"] {
        let ws = WorkspaceId::new();
        let id = backend.start(&spec(ws, "img:1")).await.unwrap().instance_id.unwrap();
        if status != "no_row" {
            sqlx::query(
                "INSERT INTO workspaces (id, org_id, name, runtime, tier, status, instance_id) VALUES ($1, $2, 'w', 'echo', 2, $3::workspace_status, $4)",
            )
            .bind(ws.0)
            .bind(org)
            .bind(status)
            .bind(&id)
            .execute(&db)
            .await
            .unwrap();
        }
        ids.insert(status, (ws, id));
    }
    let deps = molecule_workers::Deps::minimal(db.clone(), backend.clone()).unwrap();
    let report = molecule_workers::sweeps::orphans::sweep(&deps, molecule_workers::sweeps::orphans::RESCUE_VOLUME_GRACE).await.unwrap();
    assert!(report.stop_failed.is_empty(), "{report:?}");
    let terminated: Vec<String> = proxy.calls("TerminateInstances").iter().flat_map(|c| c.list("InstanceId")).collect();
    let mut want = vec![ids["removed"].1.clone(), ids["no_row"].1.clone()];
    let mut got = terminated.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want, "{report:?}");
    let live: Vec<String> = backend.list_managed().await.unwrap().into_iter().map(|m| m.name).collect();
    assert!(live.contains(&ids["failed"].1) && live.contains(&ids["online"].1), "kept: {live:?}");
    assert!(!live.contains(&ids["removed"].1) && !live.contains(&ids["no_row"].1), "{live:?}");
}

// ---------------------------------------------------------------------------------------
// End to end: `molecule serve` with MOLECULE_BACKEND=ec2.

async fn wait_job(addr: &str, token: &str, job: &str, within: Duration) -> Value {
    eventually(within, &format!("job {job} to finish"), || async {
        let j = http(addr, "GET", &format!("/jobs/{job}"), Some(token), None, None).await.json();
        // `retrying` is an attempt that failed and will run again: not an end.
        matches!(j["status"].as_str(), Some("succeeded" | "failed" | "dead" | "interrupted" | "cancelled" | "expired")).then_some(j)
    })
    .await
}

async fn instance_of(addr: &str, token: &str, ws: &str) -> String {
    eventually(Duration::from_secs(30), "the instance id on the workspace", || async {
        let w = http(addr, "GET", &format!("/workspaces/{ws}"), Some(token), None, None).await.json();
        w["instance_id"].as_str().map(String::from)
    })
    .await
}

async fn exec(addr: &str, token: &str, ws: &str, argv: &[&str]) -> Value {
    let r =
        http(addr, "POST", &format!("/workspaces/{ws}/exec"), Some(token), Some(&json!({"argv": argv, "timeout_s": 20}).to_string()), None)
            .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let job = wait_job(addr, token, r.json()["job_id"].as_str().unwrap(), Duration::from_secs(60)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    job["result"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ec2_workspace_from_create_to_delete() {
    aws_test_env();
    let sshd = Sshd::start().await;
    let moto = Moto::start().await;
    let proxy = AwsProxy::start(&moto.url, Some(sshd.authorized_keys.clone())).await;
    let (db, url) = fresh_db().await;
    let mut c = db.acquire().await.unwrap();
    let (org, token) = molecule_domain::tokens::create_org(&mut c, "ec2").await.unwrap();
    drop(c);
    let dir = instance_dir("e2e");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(bin_path("molecule"));
    cmd.arg("serve")
        .env("DATABASE_URL", &url)
        .env("LISTEN_ADDR", &addr)
        .env("ADMIN_TOKEN", ADMIN)
        .env("MOLECULE_BACKEND", "ec2")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", &proxy.url)
        .env("MOLECULE_EC2_AMI", AMI)
        .env("MOLECULE_EC2_SSH_ADDRESS", &sshd.addr)
        .env("MOLECULE_EC2_SSH_USER", SSH_USER)
        .env("MOLECULE_EC2_CONFIG_DIR", &dir);
    for s in ["PROVISION_TIMEOUT", "ORPHANS", "STALE_TOKENS", "HEALTH", "HIBERNATION", "A2A_TTL", "RETENTION"] {
        cmd.env(format!("MOLECULE_SWEEP_{s}"), "off");
    }
    let serve = Proc::spawn(cmd, "serve-ec2");
    eventually(Duration::from_secs(30), "GET /readyz = 200", || async {
        matches!(molecule_tests::http_get(&addr, "/readyz").await, Ok((200, _))).then_some(())
    })
    .await;

    // create → RunInstances with the tags and the user-data; the row holds the i-… id.
    let r = http(&addr, "POST", "/workspaces", Some(&token), Some(&json!({"name": "box", "runtime": "echo", "tier": 3}).to_string()), None)
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let ws = r.json()["workspace"]["id"].as_str().unwrap().to_string();
    let instance = instance_of(&addr, &token, &ws).await;
    assert!(instance.starts_with("i-"), "{instance}");
    let runs = proxy.calls("RunInstances");
    let run = runs.last().expect("RunInstances");
    assert_eq!(run.params["ImageId"], AMI);
    let tags = run.tags("instance");
    assert_eq!(tags.get("molecule.platform.managed").map(String::as_str), Some("true"), "{tags:?}");
    assert_eq!(tags.get("molecule.workspace.id"), Some(&ws));
    assert_eq!(tags.get("molecule.org.id"), Some(&org.to_string()));
    assert_eq!(run.params.get("MetadataOptions.HttpTokens").map(String::as_str), Some("required"), "IMDSv2 only");
    let user_data = UserData::from_call(run);
    assert_eq!(user_data.env.get("WORKSPACE_ID"), Some(&ws));
    assert_eq!(user_data.env.get("PLATFORM_URL"), Some(&format!("http://{addr}")));
    assert!(user_data.token.starts_with("mol_ws_") && user_data.inbound_secret.starts_with("mol_pis_"));
    let assigned: Option<String> =
        sqlx::query_scalar("SELECT assigned_url FROM workspaces WHERE id = $1::uuid").bind(&ws).fetch_one(&db).await.unwrap();
    assert!(regex::Regex::new(r"^http://\d+\.\d+\.\d+\.\d+:8000$").unwrap().is_match(assigned.as_deref().unwrap_or("")), "{assigned:?}");
    // The token never shows in the server's answers.
    let listed = http(&addr, "GET", "/workspaces", Some(&token), None, None).await;
    assert!(!listed.body.contains(&user_data.token));

    // The instance boots: cloud-init writes the token where the agent reads it, and the
    // agent registers with it (poll mode: nothing ever connects to the private address).
    std::fs::write(dir.join(".auth_token"), &user_data.token).unwrap();
    let mut agent = Command::new(bin_path("molecule-agent"));
    agent.env("PLATFORM_URL", &user_data.env["PLATFORM_URL"]).env("CONFIG_DIR", &dir).env("DELIVERY_MODE", "poll");
    let _agent = Proc::spawn(agent, "ec2-agent");
    eventually(Duration::from_secs(30), "the workspace online", || async {
        let w = http(&addr, "GET", &format!("/workspaces/{ws}"), Some(&token), None, None).await.json();
        (w["status"] == "online").then_some(())
    })
    .await;

    // exec over SSH: argv literally, both streams, the exit code; a new key each time.
    let out = exec(&addr, &token, &ws, &["printf", "%s\\n", "a'b", "$(id)", "x;y", "\"q\""]).await;
    assert_eq!(out["stdout"], "a'b\n$(id)\nx;y\n\"q\"\n", "{out}");
    assert_eq!(out["exit_code"], 0);
    let out = exec(&addr, &token, &ws, &["sh", "-c", "echo out; echo err >&2; exit 3"]).await;
    assert_eq!((out["stdout"].as_str(), out["stderr"].as_str(), out["exit_code"].as_i64()), (Some("out\n"), Some("err\n"), Some(3)));
    let out = exec(&addr, &token, &ws, &["id", "-un"]).await;
    assert_eq!(out["stdout"], format!("{SSH_USER}\n"), "runs as the instance's SSH user");
    // Streaming, as on Docker.
    let r = molecule_tests::http_full(
        &addr,
        "POST",
        &format!("/workspaces/{ws}/exec"),
        Some(&token),
        Some(&json!({"argv": ["sh", "-c", "echo one; echo two >&2"]}).to_string()),
        &[("Accept", "application/x-ndjson")],
        Duration::from_secs(60),
    )
    .await;
    let frames = molecule_tests::frames(&r.body);
    assert!(frames.iter().any(|f| f["stream"] == "stdout" && f["data"] == "one\n"), "{frames:?}");
    assert!(frames.iter().any(|f| f["stream"] == "stderr" && f["data"] == "two\n"), "{frames:?}");
    assert_eq!(frames.last().unwrap()["exit_code"], 0, "{frames:?}");
    let keys: Vec<String> = proxy.calls("SendSSHPublicKey").iter().map(|c| c.params["SSHPublicKey"].clone()).collect();
    assert_eq!(keys.len(), 4, "one key per exec");
    assert_eq!(keys.iter().collect::<std::collections::HashSet<_>>().len(), 4, "every exec sends a different key");
    assert!(proxy.calls("SendSSHPublicKey").iter().all(|c| c.params["InstanceId"] == instance && c.params["InstanceOSUser"] == SSH_USER));
    let audit: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE workspace_id = $1::uuid AND action = 'exec'")
        .bind(&ws)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(audit, 4, "one audit row per exec");

    // Console (A8): decoded, redacted, its last 64 KiB.
    let secret = "sk-ant-api03-ec2consolesecretAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let mut text = b"Linux version 6.1 (console)\n".to_vec();
    text.extend(std::iter::repeat_n(b"cloud-init: booting\n".to_vec(), 6000).flatten());
    text.extend_from_slice(format!("ANTHROPIC_API_KEY={secret}\nEND-OF-CONSOLE\n").as_bytes());
    proxy.set_console(text);
    let r = http(&addr, "GET", &format!("/workspaces/{ws}/console"), Some(&token), None, None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let job = r.json()["refresh_job_id"].as_str().unwrap().to_string();
    let again = http(&addr, "GET", &format!("/workspaces/{ws}/console"), Some(&token), None, None).await;
    // One refresh, however many readers: the same job, or — when it ran between the two
    // reads (a pickup takes about a millisecond) — the fresh copy it fetched; never a second.
    match again.json()["refresh_job_id"].as_str() {
        Some(j) => assert_eq!(j, job, "one refresh, however many readers"),
        None => assert_eq!(again.status, 200, "no refresh named: the first one's copy is fresh: {}", again.body),
    }
    let refreshes: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE workspace_id = $1::uuid AND job_type = 'console'")
        .bind(&ws)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(refreshes, 1, "one refresh job");
    assert_eq!(wait_job(&addr, &token, &job, Duration::from_secs(30)).await["status"], "succeeded");
    let r = http(&addr, "GET", &format!("/workspaces/{ws}/console"), Some(&token), None, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let c = r.json();
    let output = c["output"].as_str().unwrap();
    assert!(output.len() <= 64 * 1024 && c["truncated"] == true, "{}", output.len());
    assert!(output.ends_with("END-OF-CONSOLE\n") && output.contains("cloud-init: booting"));
    assert!(!output.contains(secret) && !r.body.contains(secret), "redacted");
    assert_eq!(c["instance_id"], instance.as_str());

    // A launch EC2 refuses: what tenants read names no AMI, subnet or instance type; the
    // operators' view has EC2's words. The job retries and the next launch works.
    let detail = format!("Insufficient capacity for t3.small in subnet-0f00 launching {AMI}");
    proxy.fail("RunInstances", 2, Fault::Error(503, "InsufficientInstanceCapacity", detail.clone()));
    let r = http(&addr, "POST", "/workspaces", Some(&token), Some(&json!({"name": "broken", "runtime": "echo"}).to_string()), None).await;
    let broken = r.json()["workspace"]["id"].as_str().unwrap().to_string();
    let provision = r.json()["job_id"].as_str().unwrap().to_string();
    let failed_once = eventually(Duration::from_secs(30), "the first launch to fail", || async {
        let j = http(&addr, "GET", &format!("/jobs/{provision}"), Some(&token), None, None).await;
        (j.json()["attempts"].as_i64() >= Some(1) && j.json()["attempt_log"].as_array().is_some_and(|l| !l.is_empty())).then_some(j)
    })
    .await;
    let w = http(&addr, "GET", &format!("/workspaces/{broken}"), Some(&token), None, None).await;
    for leak in ["ami-", "subnet-", "t3.small", "InsufficientInstanceCapacity"] {
        assert!(!failed_once.body.contains(leak) && !w.body.contains(leak), "{leak} leaked: {} {}", failed_once.body, w.body);
    }
    let admin = http(&addr, "GET", &format!("/admin/jobs/{provision}"), Some(ADMIN), None, None).await;
    assert!(admin.body.contains("InsufficientInstanceCapacity"), "operators see EC2's answer: {}", admin.body);
    let broken_instance = instance_of(&addr, &token, &broken).await;

    // bootstrap-failed on an EC2 workspace → a redacted rescue bundle read over SSH.
    let cfg_secret = "sk-ant-api03-rescuesecretBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";
    std::fs::write(dir.join("config.yaml"), format!("model: claude\napi_key: {cfg_secret}\n")).unwrap();
    set_mode(&dir.join("config.yaml"), 0o644);
    let r = http(
        &addr,
        "POST",
        &format!("/admin/workspaces/{broken}/bootstrap-failed"),
        Some(ADMIN),
        Some(&json!({"error": "agent never registered"}).to_string()),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let bundle = eventually(Duration::from_secs(60), "the rescue bundle", || async {
        let r = http(&addr, "GET", &format!("/workspaces/{broken}/rescue"), Some(&token), None, None).await;
        (r.status == 200).then(|| r.json())
    })
    .await;
    let config = bundle["sections"]["config.yaml"].as_str().unwrap();
    assert!(config.contains("model: claude") && config.contains("[REDACTED]") && !config.contains(cfg_secret), "{config}");
    assert!(bundle["sections"]["system-prompt.md"].as_str().unwrap().contains("does not exist"), "{bundle}");
    // This sshd's host has no cloud-init log, and its SSH user no Docker access: each
    // section says so, in words of the platform's (no instance text).
    assert_eq!(bundle["sections"]["cloud-init-output.log"], "(/var/log/cloud-init-output.log does not exist)", "{bundle}");
    let refused = regex::Regex::new(r"^\(could not be read on the instance: exit status \d+\)$").unwrap();
    for s in ["docker-ps", "agent-logs", "runtime-env"] {
        assert!(refused.is_match(bundle["sections"][s].as_str().unwrap_or("")), "{s}: {bundle}");
    }

    // delete → TerminateInstances with that id; failing twice, the stop job retries.
    proxy.fail("TerminateInstances", 2, Fault::Status(503));
    let r = http(&addr, "DELETE", &format!("/workspaces/{broken}"), Some(&token), None, None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let stop = r.json()["job_ids"][0].as_str().unwrap().to_string();
    let job = wait_job(&addr, &token, &stop, Duration::from_secs(90)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(job["attempts"].as_i64().unwrap() >= 2, "the failed terminate was retried by the job: {job}");
    let terminate: Vec<_> = proxy.calls("TerminateInstances");
    assert!(terminate.iter().all(|c| c.list("InstanceId") == vec![broken_instance.clone()]), "by its id only");
    assert_eq!(terminate.iter().filter(|c| c.status == 503).count(), 2);
    assert_eq!(terminate.iter().filter(|c| c.status == 200).count(), 1);

    let r = http(&addr, "DELETE", &format!("/workspaces/{ws}"), Some(&token), None, None).await;
    let stop = r.json()["job_ids"][0].as_str().unwrap().to_string();
    assert_eq!(wait_job(&addr, &token, &stop, Duration::from_secs(60)).await["status"], "succeeded");
    assert_eq!(proxy.calls("TerminateInstances").last().unwrap().list("InstanceId"), vec![instance.clone()]);

    // Deleted while its launch is in flight: the instance that comes up is terminated
    // (no orphan sweep runs here).
    proxy.fail("RunInstances", 1, Fault::Delay(Duration::from_secs(3)));
    let launches = proxy.arrived("RunInstances");
    let r = http(&addr, "POST", "/workspaces", Some(&token), Some(&json!({"name": "brief", "runtime": "echo"}).to_string()), None).await;
    let brief = r.json()["workspace"]["id"].as_str().unwrap().to_string();
    let provision = r.json()["job_id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(10), "its RunInstances in flight", || async {
        (proxy.arrived("RunInstances") > launches).then_some(())
    })
    .await;
    let r = http(&addr, "DELETE", &format!("/workspaces/{brief}"), Some(&token), None, None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let job = wait_job(&addr, &token, &provision, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(job["result"]["skipped"].as_str().unwrap_or("").contains("removed while it started"), "the launch saw the delete: {job}");
    let launched = proxy.calls("RunInstances").iter().filter(|c| c.tags("instance").get("molecule.workspace.id") == Some(&brief)).count();
    assert_eq!(launched, 1, "its launch happened");
    let check_store = Arc::new(MapStore::default());
    let check = Ec2Backend::connect(ec2_config(&moto.url, &sshd, "/configs"), check_store.clone()).await.unwrap();
    eventually(Duration::from_secs(30), "no live instance for the deleted workspace", || async {
        let live = check.list_managed().await.unwrap();
        (!live.iter().any(|m| m.workspace_id.as_deref() == Some(brief.as_str()))).then_some(())
    })
    .await;
    // EC2 agrees: both terminated.
    for (id, ws) in [(instance, WorkspaceId::new()), (broken_instance, WorkspaceId::new())] {
        check_store.ids.lock().unwrap().insert(ws, id.clone());
        let (running, err) = check.is_running(ws).await;
        assert!(!running && err.is_none(), "{id} terminated: {err:?}");
    }
    // No secret of the workspace in the server's log.
    let log = std::fs::read_to_string(&serve.log).unwrap();
    // §8: the launch's event, with the ids of its workspace, org and job (the job's span).
    let launches: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "provision.ec2_started")
        .collect();
    assert!(!launches.is_empty(), "the log is the server's");
    for e in &launches {
        assert!(e["workspace_id"].is_string() && e["org_id"].is_string() && e["span"]["job_id"].is_string(), "{e}");
    }
    assert!(launches.iter().any(|e| e["span"]["job_id"] == provision.as_str() && e["workspace_id"] == brief.as_str()), "{launches:?}");
    for secret in [&user_data.token, &user_data.inbound_secret] {
        assert!(!log.contains(secret.as_str()), "a workspace secret reached the server log");
    }
    let _ = std::fs::remove_dir_all(dir);
}
