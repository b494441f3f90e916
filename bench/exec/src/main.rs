//! Exec round trip, end to end (issue 9, A5): one `echo` workspace on the local Docker
//! engine behind a real `molecule serve` process, and the same one-shot command run three
//! ways, interleaved sample by sample so drift hits all three alike:
//!
//! - **polling**: `POST /workspaces/{id}/exec` (202), then `GET /jobs/{id}` every 5 ms
//!   until the job is final — the fastest a polling client learns the result;
//! - **ndjson**: the same POST with `Accept: application/x-ndjson`, until the
//!   `exit_code` frame;
//! - **docker**: `docker exec <container> …` (the CLI), the floor.
//!
//! Prints medians and p90s, and the ratios ndjson/polling and polling/docker.
//!
//! Then provisioning, interleaved the same way (issue 15):
//!
//! - **provision**: `POST /workspaces` until `GET /workspaces/{id}` says `online` (polled
//!   every 5 ms): the provision job, the container, and the agent registering with its token;
//! - **docker run**: `docker run -d` of the same image on the host network until the
//!   agent's `/healthz` answers (polled every 5 ms) — the floor: no job, no confinement,
//!   no registration.
//!
//! Options: --samples N (30), --provisions N (5), --molecule PATH (the `molecule` binary
//! beside this one).
//! `DATABASE_URL` set: serve uses it; unset: serve's embedded cluster in a temporary
//! directory, removed at the end.

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ARGV: [&str; 2] = ["echo", "bench"];
const POLL_EVERY: Duration = Duration::from_millis(5);

type Fallible<T> = Result<T, String>;

struct Opts {
    samples: usize,
    provisions: usize,
    molecule: PathBuf,
}

fn opts() -> Fallible<Opts> {
    let mut o =
        Opts { samples: 30, provisions: 5, molecule: std::env::current_exe().map_err(|e| e.to_string())?.with_file_name("molecule") };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--samples" => o.samples = value()?.parse().map_err(|e| format!("--samples: {e}"))?,
            "--provisions" => o.provisions = value()?.parse().map_err(|e| format!("--provisions: {e}"))?,
            "--molecule" => o.molecule = value()?.into(),
            other => return Err(format!("unknown option {other} (options: --samples N, --provisions N, --molecule PATH)")),
        }
    }
    if o.samples == 0 {
        return Err("--samples must be at least 1".into());
    }
    Ok(o)
}

/// The `serve` process and what it needs removed at the end.
struct Server {
    child: Child,
    data_dir: Option<PathBuf>,
    base: String,
}

impl Server {
    fn start(molecule: &Path) -> Fallible<Server> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
        let mut cmd = Command::new(molecule);
        cmd.arg("serve").env("LISTEN_ADDR", format!("127.0.0.1:{port}")).env("MOLECULE_LOG_FORMAT", "json");
        let data_dir = match std::env::var_os("DATABASE_URL") {
            Some(_) => None,
            None => {
                let preferred = std::env::temp_dir().join(format!("molecule-bench-exec-{}", std::process::id()));
                let dir = molecule_domain::embedded_pg::default_data_dir(&preferred).map_err(|e| e.to_string())?.path;
                cmd.env("MOLECULE_DATA_DIR", &dir);
                Some(dir)
            }
        };
        let log_path = std::env::temp_dir().join(format!("molecule-bench-exec-{}.log", std::process::id()));
        let log = std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let child = cmd
            .stdout(Stdio::from(log.try_clone().map_err(|e| e.to_string())?))
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("{}: {e} (build it: cargo build --release --bin molecule)", molecule.display()))?;
        eprintln!("bench-exec: serve on 127.0.0.1:{port}, log {}", log_path.display());
        Ok(Server { child, data_dir, base: format!("http://127.0.0.1:{port}") })
    }

    /// A new organization's token, from `molecule org create` against the same database.
    fn org_token(&self, molecule: &Path) -> Fallible<String> {
        let mut cmd = Command::new(molecule);
        cmd.args(["org", "create", "bench-exec", "--json"]);
        if let Some(d) = &self.data_dir {
            cmd.env("MOLECULE_DATA_DIR", d);
        }
        let out = cmd.output().map_err(|e| e.to_string())?;
        let v: Value =
            serde_json::from_slice(&out.stdout).map_err(|e| format!("org create: {e}: {}", String::from_utf8_lossy(&out.stderr)))?;
        v["token"].as_str().map(str::to_string).ok_or_else(|| format!("org create answered {v}"))
    }

    fn stop(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        if let Some(d) = self.data_dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>, accept: Option<&str>) -> Fallible<reqwest::Response> {
        let mut rb = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        if let Some(a) = accept {
            rb = rb.header("Accept", a);
        }
        rb.send().await.map_err(|e| format!("{path}: {e}"))
    }

    async fn json(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Fallible<Value> {
        let r = self.send(method, path, body, None).await?;
        let status = r.status();
        let v: Value = r.json().await.map_err(|e| format!("{path}: {e}"))?;
        if !status.is_success() {
            return Err(format!("{path}: {status} {v}"));
        }
        Ok(v)
    }

    async fn until<T>(&self, within: Duration, what: &str, mut f: impl AsyncFnMut(&Api) -> Fallible<Option<T>>) -> Fallible<T> {
        let t0 = Instant::now();
        loop {
            if let Some(v) = f(self).await? {
                return Ok(v);
            }
            if t0.elapsed() > within {
                return Err(format!("{what}: not within {within:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates an echo workspace; its id.
    async fn create(&self, name: &str) -> Fallible<String> {
        let created = self.json(reqwest::Method::POST, "/workspaces", Some(json!({ "name": name, "runtime": "echo", "tier": 3 }))).await?;
        created["workspace"]["id"].as_str().map(str::to_string).ok_or_else(|| format!("no workspace id in {created}"))
    }

    /// Waits, polling every `every`, until the workspace is online.
    async fn online(&self, ws: &str, every: Duration) -> Fallible<()> {
        let path = format!("/workspaces/{ws}");
        let t0 = Instant::now();
        loop {
            let w = self.json(reqwest::Method::GET, &path, None).await?;
            match w["status"].as_str() {
                Some("online") => return Ok(()),
                Some("failed" | "removed") => return Err(format!("workspace {ws} ended {w}")),
                _ if t0.elapsed() > Duration::from_secs(120) => return Err(format!("workspace {ws} not online within 120 s")),
                _ => tokio::time::sleep(every).await,
            }
        }
    }

    /// Deletes a workspace and waits until its jobs (container and volume removed) are done.
    async fn remove(&self, ws: &str) -> Fallible<()> {
        let v = self.json(reqwest::Method::DELETE, &format!("/workspaces/{ws}"), None).await?;
        for j in v["job_ids"].as_array().cloned().unwrap_or_default() {
            let path = format!("/jobs/{}", j.as_str().unwrap_or_default());
            self.until(Duration::from_secs(60), "workspace removed", async |a| {
                let s = a.json(reqwest::Method::GET, &path, None).await?;
                Ok(matches!(s["status"].as_str(), Some("succeeded" | "failed" | "dead" | "cancelled")).then_some(()))
            })
            .await?;
        }
        Ok(())
    }

    /// Provisioning: create, then read the workspace until it is online.
    async fn provision(&self, i: usize) -> Fallible<Duration> {
        let t0 = Instant::now();
        let ws = self.create(&format!("bench-provision-{i}")).await?;
        let up = self.online(&ws, POLL_EVERY).await.map(|()| t0.elapsed());
        self.remove(&ws).await?;
        up
    }

    /// Polling: enqueue, then read the job until it is final.
    async fn exec_polling(&self, ws: &str) -> Fallible<Duration> {
        let t0 = Instant::now();
        let queued = self.json(reqwest::Method::POST, &format!("/workspaces/{ws}/exec"), Some(json!({ "argv": ARGV }))).await?;
        let job = queued["job_id"].as_str().ok_or("no job_id")?.to_string();
        loop {
            let v = self.json(reqwest::Method::GET, &format!("/jobs/{job}"), None).await?;
            match v["status"].as_str() {
                Some("succeeded") => {
                    let took = t0.elapsed();
                    check_stdout(v["result"]["stdout"].as_str())?;
                    return Ok(took);
                }
                Some("pending" | "scheduled" | "running" | "retrying") => tokio::time::sleep(POLL_EVERY).await,
                _ => return Err(format!("exec job ended {v}")),
            }
        }
    }

    /// NDJSON: the same request, read until its `exit_code` frame.
    async fn exec_ndjson(&self, ws: &str) -> Fallible<Duration> {
        let t0 = Instant::now();
        let mut r = self
            .send(reqwest::Method::POST, &format!("/workspaces/{ws}/exec"), Some(json!({ "argv": ARGV })), Some("application/x-ndjson"))
            .await?;
        if !r.status().is_success() {
            return Err(format!("ndjson exec: {}", r.status()));
        }
        let (mut buf, mut stdout) = (Vec::new(), String::new());
        while let Some(chunk) = r.chunk().await.map_err(|e| e.to_string())? {
            buf.extend_from_slice(&chunk);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let v: Value = serde_json::from_slice(&line).map_err(|e| e.to_string())?;
                if let Some(d) = v["data"].as_str() {
                    stdout.push_str(d);
                } else if v.get("exit_code").is_some() {
                    let took = t0.elapsed();
                    check_stdout(Some(&stdout))?;
                    return Ok(took);
                } else {
                    return Err(format!("ndjson exec ended {v}"));
                }
            }
        }
        Err("ndjson stream ended without an exit_code frame".into())
    }
}

fn check_stdout(s: Option<&str>) -> Fallible<()> {
    match s {
        Some("bench\n") => Ok(()),
        other => Err(format!("unexpected stdout {other:?}")),
    }
}

/// The `docker exec` CLI against the same container.
fn exec_docker(container: &str) -> Fallible<Duration> {
    let t0 = Instant::now();
    let out = Command::new("docker").arg("exec").arg(container).args(ARGV).output().map_err(|e| format!("docker: {e}"))?;
    let took = t0.elapsed();
    if !out.status.success() {
        return Err(format!("docker exec: {}", String::from_utf8_lossy(&out.stderr)));
    }
    check_stdout(std::str::from_utf8(&out.stdout).ok())?;
    Ok(took)
}

fn container_of(ws: &str) -> Fallible<String> {
    let out = Command::new("docker")
        .args(["ps", "-q", "--filter", &format!("label=molecule.workspace.id={ws}")])
        .output()
        .map_err(|e| format!("docker: {e}"))?;
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if id.is_empty() || id.contains('\n') {
        return Err(format!("expected one container for workspace {ws}, docker ps said {id:?}"));
    }
    Ok(id)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (median, p90) in milliseconds.
fn summary(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |q: f64| ms(v[((v.len() - 1) as f64 * q).round() as usize]);
    (at(0.5), at(0.9))
}

async fn run(o: &Opts, server: &Server) -> Fallible<()> {
    let api = Api {
        http: reqwest::Client::builder().no_proxy().build().map_err(|e| e.to_string())?,
        base: server.base.clone(),
        token: String::new(),
    };
    api.until(Duration::from_secs(120), "serve ready", async |a| {
        Ok(a.http.get(format!("{}/readyz", a.base)).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()))
    })
    .await?;
    let api = Api { token: server.org_token(&o.molecule)?, ..api };
    let ws = api.create("bench-exec").await?;
    let result = measure(o, &api, &ws).await;
    // Remove the workspace (its container and volume) whatever happened.
    let _ = api.remove(&ws).await;
    result
}

async fn measure(o: &Opts, api: &Api, ws: &str) -> Fallible<()> {
    api.online(ws, Duration::from_millis(50)).await?;
    let container = container_of(ws)?;
    // Warm-up: connections, the container's page cache, the exec pool.
    for _ in 0..3 {
        api.exec_polling(ws).await?;
        api.exec_ndjson(ws).await?;
        exec_docker(&container)?;
    }
    let (mut polling, mut ndjson, mut docker) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..o.samples {
        // Rotate the order so no method always runs right after the same other one.
        for k in 0..3 {
            match (i + k) % 3 {
                0 => polling.push(api.exec_polling(ws).await?),
                1 => ndjson.push(api.exec_ndjson(ws).await?),
                _ => docker.push(exec_docker(&container)?),
            }
        }
    }
    let (p, n, d) = (summary(polling), summary(ndjson), summary(docker));
    println!("exec round trip, {} samples each, `{}` in one echo workspace (ms):", o.samples, ARGV.join(" "));
    println!("  {:<28} {:>8} {:>8}", "", "median", "p90");
    println!("  {:<28} {:>8.1} {:>8.1}", "polling GET /jobs/{id} (5 ms)", p.0, p.1);
    println!("  {:<28} {:>8.1} {:>8.1}", "NDJSON stream", n.0, n.1);
    println!("  {:<28} {:>8.1} {:>8.1}", "docker exec CLI", d.0, d.1);
    println!("  ndjson / polling = {:.3}   polling / docker exec = {:.3}", n.0 / p.0, p.0 / d.0);
    let image = image_of(&container)?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..o.provisions {
        if i % 2 == 0 {
            ours.push(api.provision(i).await?);
            theirs.push(docker_run(&image).await?);
        } else {
            theirs.push(docker_run(&image).await?);
            ours.push(api.provision(i).await?);
        }
    }
    let (pv, dr) = (summary(ours), summary(theirs));
    println!("provision to online, {} samples each, image {image} (ms):", o.provisions);
    println!("  {:<28} {:>8.1} {:>8.1}", "POST /workspaces → online", pv.0, pv.1);
    println!("  {:<28} {:>8.1} {:>8.1}", "docker run → /healthz", dr.0, dr.1);
    println!("  provision / docker run = {:.3}", pv.0 / dr.0);
    println!(
        "{}",
        json!({
            "samples": o.samples,
            "median_ms": { "polling": p.0, "ndjson": n.0, "docker_exec": d.0, "provision": pv.0, "docker_run": dr.0 },
            "p90_ms": { "polling": p.1, "ndjson": n.1, "docker_exec": d.1, "provision": pv.1, "docker_run": dr.1 },
            "ndjson_over_polling": n.0 / p.0,
            "polling_over_docker_exec": p.0 / d.0,
            "provisions": o.provisions,
            "provision_over_docker_run": pv.0 / dr.0,
        })
    );
    Ok(())
}

fn image_of(container: &str) -> Fallible<String> {
    let out =
        Command::new("docker").args(["inspect", "-f", "{{.Config.Image}}", container]).output().map_err(|e| format!("docker: {e}"))?;
    let image = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || image.is_empty() {
        return Err(format!("docker inspect {container}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(image)
}

/// `docker run -d` of the echo image until its agent answers `/healthz`; the container
/// is removed after (not timed). The agent gets the files it reads at start and a
/// platform address nothing listens on: it serves `/healthz` before it registers.
async fn docker_run(image: &str) -> Fallible<Duration> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
    let dir = std::env::temp_dir().join(format!("molecule-bench-run-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    for f in [".auth_token", ".platform_inbound_secret"] {
        std::fs::write(dir.join(f), "bench-not-a-secret").map_err(|e| e.to_string())?;
    }
    let health = format!("http://127.0.0.1:{port}/healthz");
    let http = reqwest::Client::builder().no_proxy().build().map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let out = Command::new("docker")
        .args(["run", "-d", "--network", "host", "-e", "PLATFORM_URL=http://127.0.0.1:9", "-e"])
        .arg(format!("AGENT_PORT={port}"))
        .arg("-v")
        .arg(format!("{}:/configs:ro", dir.display()))
        .arg(image)
        .output()
        .map_err(|e| format!("docker: {e}"))?;
    let container = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let up = if !out.status.success() {
        Err(format!("docker run: {}", String::from_utf8_lossy(&out.stderr)))
    } else {
        loop {
            if http.get(&health).send().await.is_ok_and(|r| r.status().is_success()) {
                break Ok(t0.elapsed());
            }
            if t0.elapsed() > Duration::from_secs(60) {
                break Err(format!("docker run: {health} not answering within 60 s"));
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    };
    if !container.is_empty() {
        let _ = Command::new("docker").args(["rm", "-f", &container]).output();
    }
    let _ = std::fs::remove_dir_all(&dir);
    up
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let o = match opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench-exec: {e}");
            std::process::exit(2);
        }
    };
    let server = match Server::start(&o.molecule) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench-exec: {e}");
            std::process::exit(1);
        }
    };
    let outcome = run(&o, &server).await;
    server.stop();
    if let Err(e) = outcome {
        eprintln!("bench-exec: {e}");
        std::process::exit(1);
    }
}
