//! The scheduler and the sweepers for real (SPEC §5): scheduler processes sharing one
//! PostgreSQL, and sweeps against workspaces on the Docker engine. Each sweeper's
//! predicates are pinned by the tests beside it (`workers/src/sweeps/`); these are the
//! end-to-end acceptance runs.

use molecule_backends::docker::{DockerBackend, DockerConfig, container_name, volume_name};
use molecule_backends::{Backend, BackendError, ChunkSink, ExecOutcome, ExecRequest, ManagedInstance, StartSpec, Started};
use molecule_domain::WorkspaceId;
use molecule_jobs::JobKind;
use molecule_tests::{Platform, Proc, bin_path, eventually, fresh_db};
use molecule_workers::sweeps::{health, hibernation, orphans, provision_timeout, stale_tokens};
use std::collections::HashSet;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

fn docker(args: &[&str]) -> (bool, String) {
    let out = Command::new("docker").args(args).output().expect("docker CLI");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn exists(kind: &str, name: &str) -> bool {
    docker(&[kind, "inspect", name]).0
}

async fn docker_backend() -> Arc<dyn Backend> {
    Arc::new(DockerBackend::connect(DockerConfig::local()).await.expect("a Docker engine (tests/run.sh starts one)"))
}

/// Three scheduler processes, one 2-second schedule, 20 seconds: each tick fired once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_schedulers_fire_each_tick_once() {
    let (db, url) = fresh_db().await;
    let mut procs: Vec<Proc> = (0..3)
        .map(|i| {
            let mut cmd = Command::new(bin_path("molecule"));
            cmd.arg("scheduler").env("DATABASE_URL", &url).env("MOLECULE_SWEEP_A2A_TTL", "*/2 * * * * *");
            for other in ["PROVISION_TIMEOUT", "ORPHANS", "STALE_TOKENS", "HEALTH", "HIBERNATION", "RETENTION"] {
                cmd.env(format!("MOLECULE_SWEEP_{other}"), "off");
            }
            Proc::spawn(cmd, &format!("scheduler-{i}"))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(20)).await;
    for p in &mut procs {
        p.signal(libc::SIGTERM);
    }
    for p in &mut procs {
        assert_eq!(p.wait_exit(Duration::from_secs(10)).and_then(|s| s.code()), Some(0), "{} exits 0", p.name);
    }
    let ticks: Vec<(chrono::DateTime<chrono::Utc>, Option<String>)> =
        sqlx::query_as("SELECT tick, job_id FROM scheduler_ticks WHERE sweeper = 'a2a_ttl' ORDER BY tick").fetch_all(&db).await.unwrap();
    assert!(ticks.len() >= 8, "about ten ticks in 20 s: {}", ticks.len());
    for w in ticks.windows(2) {
        assert_eq!((w[1].0 - w[0].0).num_seconds(), 2, "every tick, none twice: {:?}", ticks.iter().map(|t| t.0).collect::<Vec<_>>());
    }
    let jobs: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT id, idempotency_key FROM apalis.jobs WHERE job_type = 'sweep'").fetch_all(&db).await.unwrap();
    assert_eq!(jobs.len(), ticks.len(), "one sweep job per tick");
    let fired: HashSet<&str> = ticks.iter().filter_map(|t| t.1.as_deref()).collect();
    assert!(jobs.iter().all(|(id, _)| fired.contains(id.as_str())));
    let payload: Vec<u8> = sqlx::query_scalar("SELECT job FROM apalis.jobs WHERE job_type = 'sweep' LIMIT 1").fetch_one(&db).await.unwrap();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&payload).unwrap()["sweeper"], "a2a_ttl");
}

/// S1 end to end: a workspace whose agent never registered is failed, and its rescue
/// capture runs and stores one bundle with the trigger `provision_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_stuck_provisioning_fails_with_one_rescue_bundle() {
    let p = Platform::start(docker_backend().await, &[JobKind::RescueCapture]).await;
    let org: uuid::Uuid = sqlx::query_scalar("SELECT id FROM organizations").fetch_one(&p.db).await.unwrap();
    let ws: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO workspaces (org_id, name, runtime, tier, status) VALUES ($1, 'stuck', 'echo', 3, 'provisioning') RETURNING id",
    )
    .bind(org)
    .fetch_one(&p.db)
    .await
    .unwrap();
    sqlx::query("UPDATE workspaces SET status_changed_at = now() - interval '11 minutes' WHERE id = $1")
        .bind(ws)
        .execute(&p.db)
        .await
        .unwrap();
    let flipped = provision_timeout::sweep(&p.db, &provision_timeout::Timeouts::uniform(Duration::from_secs(600)), 100).await.unwrap();
    assert_eq!(flipped, vec![WorkspaceId(ws)]);
    assert_eq!(p.status(&ws.to_string()).await, "failed");
    let bundle = eventually(Duration::from_secs(30), "the rescue bundle", || async {
        let r = p.req("GET", &format!("/workspaces/{ws}/rescue"), None).await;
        (r.status == 200).then(|| r.json())
    })
    .await;
    assert_eq!(bundle["trigger"], "provision_timeout");
    assert!(
        provision_timeout::sweep(&p.db, &provision_timeout::Timeouts::uniform(Duration::from_secs(600)), 100).await.unwrap().is_empty()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bundles: i64 =
        sqlx::query_scalar("SELECT count(*) FROM rescue_bundles WHERE workspace_id = $1").bind(ws).fetch_one(&p.db).await.unwrap();
    assert_eq!(bundles, 1);
    p.stop().await;
}

/// The real Docker backend, listing only the instances this test made: other tests share
/// the engine, and their containers have no row in this test's database — exactly what
/// the wiped-database pass reaps.
struct OnlyThese {
    inner: Arc<dyn Backend>,
    labels: HashSet<String>,
}

#[async_trait::async_trait]
impl Backend for OnlyThese {
    fn name(&self) -> &'static str {
        "docker"
    }
    async fn start(&self, s: &StartSpec) -> Result<Started, BackendError> {
        self.inner.start(s).await
    }
    async fn stop(&self, ws: WorkspaceId) -> Result<(), BackendError> {
        self.inner.stop(ws).await
    }
    async fn remove_volume(&self, ws: WorkspaceId) -> Result<(), BackendError> {
        self.inner.remove_volume(ws).await
    }
    async fn is_running(&self, ws: WorkspaceId) -> (bool, Option<BackendError>) {
        self.inner.is_running(ws).await
    }
    fn is_named_for(&self, m: &ManagedInstance, ws: WorkspaceId, volume: bool) -> bool {
        self.inner.is_named_for(m, ws, volume)
    }
    async fn list_managed(&self) -> Result<Vec<ManagedInstance>, BackendError> {
        let all = self.inner.list_managed().await?;
        Ok(all.into_iter().filter(|m| m.workspace_id.as_ref().is_some_and(|l| self.labels.contains(l))).collect())
    }
    async fn list_managed_volumes(&self) -> Result<Vec<ManagedInstance>, BackendError> {
        let all = self.inner.list_managed_volumes().await?;
        Ok(all.into_iter().filter(|m| m.workspace_id.as_ref().is_some_and(|l| self.labels.contains(l))).collect())
    }
    async fn exec(&self, ws: WorkspaceId, r: &ExecRequest, s: ChunkSink<'_>) -> Result<ExecOutcome, BackendError> {
        self.inner.exec(ws, r, s).await
    }
    async fn read_file(&self, ws: WorkspaceId, path: &str) -> Result<Option<Vec<u8>>, BackendError> {
        self.inner.read_file(ws, path).await
    }
    async fn reap(&self, ws: WorkspaceId, listed: &[ManagedInstance]) -> Result<(), BackendError> {
        self.inner.reap(ws, listed).await
    }
    async fn rescue_sections(&self, ws: WorkspaceId) -> Result<Vec<(String, String)>, BackendError> {
        self.inner.rescue_sections(ws).await
    }
}

/// A container (and volume) like the platform's, made by hand: `label` is the workspace id
/// label (None: no labels at all).
fn instance(name: &str, label: Option<&str>) {
    let mut labels = vec![];
    if let Some(l) = label {
        labels =
            vec!["--label".to_string(), "molecule.platform.managed=true".into(), "--label".into(), format!("molecule.workspace.id={l}")];
    }
    let volume = format!("{name}-configs");
    let mut v = vec!["volume", "create"];
    v.extend(labels.iter().map(String::as_str));
    v.push(&volume);
    assert!(docker(&v).0, "volume {volume}");
    let mount = format!("{volume}:/configs");
    let mut r = vec!["run", "-d", "--name", name, "--network", "host", "-v", &mount, "--entrypoint", "/bin/sleep"];
    r.extend(labels.iter().map(String::as_str));
    r.extend(["molecule-local/echo-agent:v1", "600"]);
    assert!(docker(&r).0, "container {name}");
}

fn remove(name: &str) {
    docker(&["rm", "-f", name]);
    docker(&["volume", "rm", "-f", &format!("{name}-configs")]);
}

/// S2: a removed row's container and volume, and a labelled container with no row (its
/// volume once past the grace) are reaped; an unlabelled `ws-…` container, a failed
/// workspace's — however long ago it failed, with no grace left too (J4: kept for rescue,
/// seed 000) — and an online one's are untouched, and a label that is not a workspace id
/// is never queried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_reaped_and_nothing_else() {
    let (db, _) = fresh_db().await;
    let org: uuid::Uuid = sqlx::query_scalar("INSERT INTO organizations (name) VALUES ('o') RETURNING id").fetch_one(&db).await.unwrap();
    let row = |status: &'static str, for_s: f64| {
        let db = db.clone();
        async move {
            let id = sqlx::query_scalar::<_, uuid::Uuid>(
                "INSERT INTO workspaces (org_id, name, runtime, tier, status) VALUES ($1, 'w', 'echo', 2, $2::workspace_status) RETURNING id",
            )
            .bind(org)
            .bind(status)
            .fetch_one(&db)
            .await
            .unwrap();
            sqlx::query("UPDATE workspaces SET status_changed_at = now() - make_interval(secs => $2) WHERE id = $1")
                .bind(id)
                .bind(for_s)
                .execute(&db)
                .await
                .unwrap();
            id
        }
    };
    let day = 86400.0;
    let removed = row("removed", 60.0).await;
    let failed_long_ago = row("failed", 2.0 * day).await;
    let failed = row("failed", 60.0).await;
    let online = row("online", 60.0).await;
    let no_row = uuid::Uuid::new_v4();
    let unlabelled = uuid::Uuid::new_v4();
    let bad_label = "4f3c%' OR true --";
    let name = |id: uuid::Uuid| container_name(WorkspaceId(id));
    for id in [removed, failed_long_ago, failed, online, no_row] {
        instance(&name(id), Some(&id.to_string()));
    }
    instance(&name(unlabelled), None);
    let bad_name = format!("ws-badlabel{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    instance(&bad_name, Some(bad_label));

    let labels: HashSet<String> = [removed, failed_long_ago, failed, online, no_row, unlabelled]
        .iter()
        .map(|i| i.to_string())
        .chain([bad_label.to_string()])
        .collect();
    let backend: Arc<dyn Backend> = Arc::new(OnlyThese { inner: docker_backend().await, labels });
    let p = Platform::start(backend.clone(), &[]).await;
    let deps = molecule_workers::Deps {
        db: db.clone(),
        backend,
        platform_url: format!("http://{}", p.addr),
        registry: String::new(),
        image_local_override: false,
        redactor: None,
        loki_url: None,
        agents: molecule_workers::a2a::AgentClient::new(true).unwrap(),
    };
    let report = orphans::sweep(&deps, orphans::RESCUE_VOLUME_GRACE).await.unwrap();
    assert_eq!(report.reaped, vec![removed.to_string()], "{report:?}");
    assert_eq!(report.volume_kept, vec![no_row.to_string()], "a fresh volume with no row waits out the grace");
    assert_eq!(report.ignored, 2, "the bad label, on its container and its volume");
    assert!(!exists("container", &name(removed)) && !exists("volume", &volume_name(WorkspaceId(removed))), "{removed} reaped");
    assert!(!exists("container", &name(no_row)) && exists("volume", &volume_name(WorkspaceId(no_row))));
    let kept = [name(failed_long_ago), name(failed), name(online), name(unlabelled), bad_name.clone()];
    for n in &kept {
        assert!(exists("container", n) && exists("volume", &format!("{n}-configs")), "{n} untouched");
    }
    // With no grace left: the orphan volume goes; the failed workspaces still stay.
    let report = orphans::sweep(&deps, Duration::ZERO).await.unwrap();
    assert_eq!(report.reaped, vec![no_row.to_string()], "{report:?}");
    assert!(!exists("volume", &volume_name(WorkspaceId(no_row))));
    for n in &kept {
        assert!(exists("container", n) && exists("volume", &format!("{n}-configs")), "{n} untouched");
    }
    assert_eq!(orphans::sweep(&deps, Duration::ZERO).await.unwrap().reaped, Vec::<String>::new(), "nothing left to reap");
    for n in &kept {
        remove(n);
    }
    p.stop().await;
}

/// S4 and S3 on the engine: an online workspace whose container was killed goes offline,
/// is restarted and comes back online in a new container; the stale tokens of a workspace
/// with no container are revoked while the running one's survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_container_is_restarted_and_stale_tokens_of_stopped_workspaces_go() {
    let p = Platform::start(docker_backend().await, &[JobKind::Provision, JobKind::Stop, JobKind::Restart]).await;
    let ws = p.create(serde_json::json!({"name": "health", "runtime": "echo", "tier": 3})).await;
    p.wait_status(&ws, "online", Duration::from_secs(30)).await;
    let id: WorkspaceId = ws.parse().unwrap();
    let (_, first) = docker(&["inspect", "-f", "{{.Id}}", &container_name(id)]);
    let deps = molecule_workers::Deps {
        db: p.db.clone(),
        backend: docker_backend().await,
        platform_url: format!("http://{}", p.addr),
        registry: String::new(),
        image_local_override: false,
        redactor: None,
        loki_url: None,
        agents: molecule_workers::a2a::AgentClient::new(true).unwrap(),
    };
    // S3 first, while it runs: a stopped workspace (no container) loses its stale token,
    // the running one keeps its own.
    let org: uuid::Uuid = sqlx::query_scalar("SELECT org_id FROM workspaces WHERE id = $1").bind(id.0).fetch_one(&p.db).await.unwrap();
    let stopped: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO workspaces (org_id, name, runtime, tier, status) VALUES ($1, 's', 'echo', 2, 'offline') RETURNING id",
    )
    .bind(org)
    .fetch_one(&p.db)
    .await
    .unwrap();
    let mut c = p.db.acquire().await.unwrap();
    molecule_domain::tokens::create_workspace_token(&mut c, WorkspaceId(stopped)).await.unwrap();
    drop(c);
    sqlx::query("UPDATE workspace_auth_tokens SET created_at = now() - interval '1 hour'").execute(&p.db).await.unwrap();
    let job = molecule_jobs::JobContext::outside_queue(p.db.clone(), "sweep");
    let mut args = molecule_jobs::sweeper::SweepArgs::new(molecule_jobs::sweeper::Sweeper::StaleTokens);
    args.grace_s = Some(300);
    let out = stale_tokens::run(&deps, &job, &args).await.unwrap();
    assert_eq!(out["tokens"], 1, "{out}");
    let live = |w: uuid::Uuid| {
        let db = p.db.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM workspace_auth_tokens WHERE workspace_id = $1 AND revoked_at IS NULL")
                .bind(w)
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };
    assert_eq!((live(id.0).await, live(stopped).await), (1, 0));

    // S4: the container dies.
    assert!(docker(&["rm", "-f", &container_name(id)]).0);
    let restarted = health::restart_dead(&deps, 100).await.unwrap();
    assert_eq!(restarted, vec![id]);
    // `offline` until the restart this serve's pool may already have picked up starts it.
    let now = p.status(&ws).await;
    assert!(now == "offline" || now == "provisioning", "marked down, then restarted: {now}");
    p.wait_status(&ws, "online", Duration::from_secs(60)).await;
    let (_, second) = docker(&["inspect", "-f", "{{.Id}}", &container_name(id)]);
    assert!(!second.is_empty() && second != first, "a new container");
    let events = p.req("GET", &format!("/workspaces/{ws}/events"), None).await.json();
    assert!(events.as_array().unwrap().iter().any(|e| e["event_type"] == "WORKSPACE_OFFLINE"), "{events}");
    assert!(health::restart_dead(&deps, 100).await.unwrap().is_empty(), "a running workspace is left alone");
    p.delete(&ws).await;
    p.stop().await;
}

/// S5 on the engine: an idle workspace goes hibernating, its stop job takes the container
/// down and leaves it hibernated, volume kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_workspace_hibernates() {
    let p = Platform::start(docker_backend().await, &[JobKind::Provision, JobKind::Stop]).await;
    let ws = p.create(serde_json::json!({"name": "sleepy", "runtime": "echo", "tier": 3})).await;
    p.wait_status(&ws, "online", Duration::from_secs(30)).await;
    let id: WorkspaceId = ws.parse().unwrap();
    sqlx::query(
        "UPDATE workspaces SET status_changed_at = now() - interval '2 hours', last_active_at = now() - interval '2 hours' WHERE id = $1",
    )
    .bind(id.0)
    .execute(&p.db)
    .await
    .unwrap();
    assert_eq!(hibernation::sweep(&p.db, Duration::from_secs(3600), 100).await.unwrap(), vec![id]);
    p.wait_status(&ws, "hibernated", Duration::from_secs(30)).await;
    assert!(!exists("container", &container_name(id)), "its container is stopped and gone");
    assert!(exists("volume", &volume_name(id)), "its config volume is kept");
    p.delete(&ws).await;
    p.stop().await;
}

/// Issue 12: a delete revokes the workspace's tokens at once (not only through its status),
/// and a hibernate stop that lands after the delete leaves it `removed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_workspace_stays_removed_and_its_tokens_die_with_it() {
    let p = Platform::start(Arc::new(molecule_backends::NoBackend), &[JobKind::Stop]).await;
    let ws = p.create(serde_json::json!({"name": "gone", "runtime": "external"})).await;
    let token = p.req("POST", &format!("/workspaces/{ws}/tokens"), None).await.json()["token"].as_str().unwrap().to_string();
    let beat = || molecule_tests::http(&p.addr, "POST", "/registry/heartbeat", Some(&token), None, None);
    assert_eq!(beat().await.status, 200);
    // The sweep chose it for hibernation; then the user deleted it.
    sqlx::query("UPDATE workspaces SET status = 'hibernating' WHERE id = $1::uuid").bind(&ws).execute(&p.db).await.unwrap();
    assert_eq!(p.req("DELETE", &format!("/workspaces/{ws}"), None).await.status, 202);
    assert_eq!(beat().await.status, 401, "refused at once");
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM workspace_auth_tokens WHERE workspace_id = $1::uuid AND revoked_at IS NULL")
        .bind(&ws)
        .fetch_one(&p.db)
        .await
        .unwrap();
    assert_eq!(live, 0, "revoked in the delete's transaction");
    // The hibernate stop lands late.
    let mut c = p.db.acquire().await.unwrap();
    let id: WorkspaceId = ws.parse().unwrap();
    let org: uuid::Uuid = sqlx::query_scalar("SELECT org_id FROM workspaces WHERE id = $1").bind(id.0).fetch_one(&p.db).await.unwrap();
    let job = molecule_jobs::NewJob::new(JobKind::Stop, &serde_json::json!({"workspace_id": id, "reason": "hibernate"}))
        .org(org.into())
        .workspace(id);
    let job = molecule_jobs::enqueue(&mut c, &job).await.unwrap().to_string();
    drop(c);
    eventually(Duration::from_secs(30), "the late hibernate stop", || async {
        (p.req("GET", &format!("/jobs/{job}"), None).await.json()["status"] == "succeeded").then_some(())
    })
    .await;
    let status: String =
        sqlx::query_scalar("SELECT status::text FROM workspaces WHERE id = $1::uuid").bind(&ws).fetch_one(&p.db).await.unwrap();
    assert_eq!(status, "removed");
    p.stop().await;
}
