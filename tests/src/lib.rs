//! Test harness: a real PostgreSQL for every test, and helpers to run our binaries as
//! separate processes (so tests can SIGKILL and SIGTERM them).
//!
//! The cluster: `MOLECULE_TEST_PG_URL` (a superuser URL; `tests/run.sh` sets it) or, when
//! unset, a private embedded cluster started once per test binary and stopped at exit.
//! Each test gets its own database, migrated, so tests run in parallel.

pub mod aws;
pub mod webdriver;

pub use molecule_domain::testing::{admin_url, fresh_db, fresh_db_on, temp_dir, url_for};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of one of the workspace's binaries (built by `cargo build --bins`, which
/// `tests/run.sh` runs before the tests).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let p = dir.join(name);
    assert!(p.exists(), "{} is not built: run `cargo build --workspace --bins` first", p.display());
    p
}

/// A child process that is SIGKILLed when dropped (unless it already exited).
pub struct Proc {
    pub child: Child,
    pub name: String,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, name: &str) -> Proc {
        let log = std::env::temp_dir().join(format!("molecule-test-{name}-{}.log", fastrand::u64(..)));
        let f = std::fs::File::create(&log).unwrap();
        cmd.stdout(Stdio::null()).stderr(f);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        eprintln!("{name}: pid {} (log {})", child.id(), log.display());
        Proc { child, name: name.to_string(), log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `within` for the process to exit; None if it did not.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `f` until it returns Some, or panics with `what` after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The record the test worker writes at the start of every attempt.
pub const TEST_RUNS_TABLE: &str = "CREATE TABLE IF NOT EXISTS test_runs (
    job_id text NOT NULL, attempt int NOT NULL, pid int NOT NULL, started_at timestamptz NOT NULL DEFAULT clock_timestamp())";

/// One minimal HTTP/1.1 GET on loopback: (status, body).
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::other("connect timeout"))??;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.map_err(|_| std::io::Error::other("read timeout"))??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A response read by [`http`]: status, headers (lower-case names) and body.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    /// The `error` code of an error body.
    pub fn code(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_string()
    }
}

/// One HTTP/1.1 request on loopback (Connection: close). `body` is sent as JSON unless
/// `content_type` says otherwise.
pub async fn http(addr: &str, method: &str, path: &str, token: Option<&str>, body: Option<&str>, content_type: Option<&str>) -> Resp {
    let headers: Vec<(&str, &str)> = content_type.map(|c| vec![("Content-Type", c)]).unwrap_or_default();
    http_full(addr, method, path, token, body, &headers, Duration::from_secs(15)).await
}

/// [`http`] with extra headers (the last `Content-Type` wins) and a read deadline, for
/// streams.
pub async fn http_full(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    headers: &[(&str, &str)],
    within: Duration,
) -> Resp {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to the API");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let content_type = headers.iter().rev().find(|(k, _)| k.eq_ignore_ascii_case("content-type")).map(|(_, v)| *v);
    for (k, v) in headers.iter().filter(|(k, _)| !k.eq_ignore_ascii_case("content-type")) {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Type: {}\r\nContent-Length: {}\r\n", content_type.unwrap_or("application/json"), b.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    if let Some(b) = body {
        // The server may answer (413) and close before the whole body is sent.
        let _ = s.write_all(b.as_bytes()).await;
    }
    let mut buf = Vec::new();
    tokio::time::timeout(within, s.read_to_end(&mut buf)).await.unwrap_or_else(|_| panic!("response within {within:?}")).ok();
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))).collect();
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Resp { status, headers, body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// The API on a random loopback port, in this process, over `db`.
pub async fn start_api(db: sqlx::PgPool, auth: molecule_api::AuthConfig) -> String {
    start_api_with(db, auth, molecule_api::HttpLimits::default()).await
}

pub async fn start_api_with(db: sqlx::PgPool, auth: molecule_api::AuthConfig, limits: molecule_api::HttpLimits) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let state = molecule_api::AppState::new(db, auth);
    tokio::spawn(molecule_api::serve_with(listener, state, std::future::pending(), limits));
    addr
}

/// NDJSON frames of a body (one JSON value per line).
pub fn frames(body: &str) -> Vec<serde_json::Value> {
    body.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("frame {l:?}: {e}"))).collect()
}

/// No admin token, and loopback agent URLs allowed (MOLECULE_ALLOW_LOOPBACK_AGENTS=1).
pub fn open_auth() -> molecule_api::AuthConfig {
    molecule_api::AuthConfig { admin_token: None, dev: false, org_pin: molecule_api::OrgPin::Any, allow_loopback_agents: true }
}

/// What plain `serve` runs with: no dev mode, no loopback flag. Workspaces the platform
/// starts itself still come online through their assigned URL.
pub fn strict_auth() -> molecule_api::AuthConfig {
    molecule_api::AuthConfig { admin_token: None, dev: false, org_pin: molecule_api::OrgPin::Any, allow_loopback_agents: false }
}

/// The API and worker pools over one fresh database, in this process: what `serve` runs,
/// with the backend a test chooses.
pub struct Platform {
    pub db: sqlx::PgPool,
    pub url: String,
    pub addr: String,
    /// An org token.
    pub org: String,
    pub rt: Option<molecule_jobs::Runtime>,
}

impl Platform {
    /// `pools`: the kinds that run here (empty: none).
    pub async fn start(backend: std::sync::Arc<dyn molecule_backends::Backend>, pools: &[molecule_jobs::JobKind]) -> Platform {
        let (db, url) = fresh_db().await;
        let addr = start_api(db.clone(), open_auth()).await;
        let mut c = db.acquire().await.unwrap();
        let (_, org) = molecule_domain::tokens::create_org(&mut c, "platform").await.unwrap();
        drop(c);
        let rt = (!pools.is_empty()).then(|| {
            let deps = molecule_workers::Deps {
                db: db.clone(),
                backend,
                platform_url: format!("http://{addr}"),
                registry: molecule_backends::image::DEFAULT_REGISTRY.into(),
                image_local_override: false,
                redactor: Some(std::sync::Arc::new(molecule_domain::redact::Redactor::new())),
                loki_url: None,
                agents: molecule_workers::a2a::AgentClient::new(true).expect("agent client"),
            };
            let concurrency = pools.iter().map(|k| (*k, k.default_concurrency())).collect();
            let specs = molecule_workers::handlers::pool_specs(&deps, &concurrency);
            let cfg = molecule_jobs::RuntimeConfig {
                poll_interval: Duration::from_millis(200),
                grace: Duration::from_secs(5),
                ..Default::default()
            };
            molecule_jobs::Runtime::start(db.clone(), cfg, specs)
        });
        Platform { db, url, addr, org, rt }
    }

    pub async fn req(&self, method: &str, path: &str, body: Option<&serde_json::Value>) -> Resp {
        let body = body.map(|b| b.to_string());
        http(&self.addr, method, path, Some(&self.org), body.as_deref(), None).await
    }

    pub async fn status(&self, ws: &str) -> String {
        self.req("GET", &format!("/workspaces/{ws}"), None).await.json()["status"].as_str().unwrap_or("").to_string()
    }

    pub async fn wait_status(&self, ws: &str, want: &str, within: Duration) {
        eventually(within, &format!("workspace {ws} to be {want}"), || async { (self.status(ws).await == want).then_some(()) }).await
    }

    /// Creates a workspace; returns its id.
    pub async fn create(&self, body: serde_json::Value) -> String {
        let r = self.req("POST", "/workspaces", Some(&body)).await;
        assert_eq!(r.status, 202, "{}", r.body);
        r.json()["workspace"]["id"].as_str().unwrap().to_string()
    }

    /// Deletes a workspace and waits for its stop jobs.
    pub async fn delete(&self, ws: &str) {
        let r = self.req("DELETE", &format!("/workspaces/{ws}"), None).await;
        for j in r.json()["job_ids"].as_array().cloned().unwrap_or_default() {
            let j = j.as_str().unwrap().to_string();
            eventually(Duration::from_secs(30), "the stop job", || async {
                (self.req("GET", &format!("/jobs/{j}"), None).await.json()["status"] == "succeeded").then_some(())
            })
            .await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown().await;
        }
    }
}
