//! The API under load, beside what the same PostgreSQL does with no server in the way
//! (issue 15). One run, one table:
//!
//! - **raw INSERT**: C connections each inserting single rows (autocommit) for S seconds
//!   — the ceiling for a request that commits one transaction;
//! - **POST /workspaces**: C clients creating `echo` workspaces (each: validation, one
//!   transaction writing the row, its event and the provision job);
//! - **POST /workspaces/{id}/exec**: C clients enqueueing a command in one workspace;
//! - the server's resident memory idle (after start-up) and its peak under those loads.
//!
//! The two request phases run twice: against `molecule serve` (its pools take the jobs
//! the load enqueues, on the same two cores, as a one-process install does), then against
//! `molecule api` alone (the request path only: validation, one transaction, the job
//! queued for pools elsewhere). `serve` runs with `MOLECULE_BACKEND=none`: the jobs are
//! taken and fail at once instead of starting thousands of containers (its workers are
//! busy meanwhile, as under real load). The exec target is marked online in the database,
//! the one shortcut (no agent could come up without a backend).
//!
//! Options: --clients C (64) --secs S (10) --molecule PATH --compare-notify (the api
//! phases once more with a NOTIFY in every enqueuing transaction, as before wake-ups
//! moved after the commit). DATABASE_URL unset: a private
//! PostgreSQL in a temporary directory, removed at the end.

use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Fallible<T> = Result<T, String>;

struct Opts {
    clients: usize,
    secs: u64,
    molecule: PathBuf,
    /// Also run the api phases with the insert trigger notifying in every transaction.
    compare_notify: bool,
}

/// The insert trigger as it was before migrations/…_announce_after_commit.sql: a NOTIFY
/// in every enqueuing transaction, whatever the statement asked.
const LOUD_TRIGGER: &str = r#"
CREATE OR REPLACE FUNCTION apalis.molecule_notify_inserted() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('apalis::job::insert', json_build_object('job_type', q.job_type)::text)
    FROM (SELECT DISTINCT job_type FROM inserted) q;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
"#;

/// The trigger as the migrations leave it.
const QUIET_TRIGGER: &str = include_str!("../../../migrations/20261201000009_notify_names_shards.sql");

async fn set_trigger(url: &str, sql: &str) -> Fallible<()> {
    let db = sqlx::PgPool::connect(url).await.map_err(|e| e.to_string())?;
    let done = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&db).await.map_err(|e| format!("insert trigger: {e}"));
    db.close().await;
    done.map(|_| ())
}

fn opts() -> Fallible<Opts> {
    let mut o = Opts {
        clients: 64,
        secs: 10,
        molecule: std::env::current_exe().map_err(|e| e.to_string())?.with_file_name("molecule"),
        compare_notify: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--clients" => o.clients = value()?.parse().map_err(|e| format!("--clients: {e}"))?,
            "--secs" => o.secs = value()?.parse().map_err(|e| format!("--secs: {e}"))?,
            "--molecule" => o.molecule = value()?.into(),
            "--compare-notify" => o.compare_notify = true,
            other => return Err(format!("unknown option {other} (options: --clients C, --secs S, --molecule PATH, --compare-notify)")),
        }
    }
    if o.clients == 0 || o.secs == 0 {
        return Err("--clients and --secs must be at least 1".into());
    }
    Ok(o)
}

/// Requests (or inserts) done in a phase and their latencies.
struct Phase {
    name: String,
    ok: usize,
    failed: usize,
    secs: f64,
    lat_ms: Vec<f64>,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.secs
    }
    fn pct(&self, p: f64) -> f64 {
        if self.lat_ms.is_empty() {
            return f64::NAN;
        }
        let i = ((self.lat_ms.len() as f64 - 1.0) * p).round() as usize;
        self.lat_ms[i.min(self.lat_ms.len() - 1)]
    }
}

/// Runs `op` from `clients` tasks for `secs`; each call's latency is kept.
async fn load<F, Fut>(name: String, clients: usize, secs: u64, op: F) -> Phase
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let until = Instant::now() + Duration::from_secs(secs);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut lat) = (0usize, 0usize, Vec::new());
            let mut n = 0usize;
            while Instant::now() < until {
                let t = Instant::now();
                if op(c * 1_000_000 + n).await {
                    ok += 1;
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                } else {
                    failed += 1;
                }
                n += 1;
            }
            (ok, failed, lat)
        }));
    }
    let mut p = Phase { name, ok: 0, failed: 0, secs: 0.0, lat_ms: Vec::new() };
    for t in tasks {
        if let Ok((ok, failed, lat)) = t.await {
            p.ok += ok;
            p.failed += failed;
            p.lat_ms.extend(lat);
        }
    }
    p.secs = t0.elapsed().as_secs_f64();
    p.lat_ms.sort_by(|a, b| a.total_cmp(b));
    p
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The highest RSS of `pid` while `fut` runs (sampled every 100 ms).
async fn with_peak_rss<T>(pid: u32, fut: impl std::future::Future<Output = T>) -> (T, f64) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let sampler = tokio::spawn(async move {
        let mut peak: f64 = 0.0;
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(rss_mib(pid));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        peak.max(rss_mib(pid))
    });
    let out = fut.await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    (out, sampler.await.unwrap_or(f64::NAN))
}

struct Serve {
    child: Child,
    base: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

async fn run(o: &Opts, url: &str) -> Fallible<()> {
    // Raw INSERTs first, on a pool as wide as the clients, configured as ours (no ping
    // before a connection in steady use).
    let raw_db = molecule_domain::db::pool_options(molecule_domain::db::PING_IF_IDLE_FOR)
        .max_connections(o.clients as u32)
        .connect(url)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS bench_rows (id bigserial PRIMARY KEY, org uuid NOT NULL, name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())")
        .execute(&raw_db)
        .await
        .map_err(|e| e.to_string())?;
    let org = uuid::Uuid::new_v4();
    let db = raw_db.clone();
    let raw = load("raw single-row INSERT".into(), o.clients, o.secs, move |n| {
        let db = db.clone();
        async move {
            sqlx::query("INSERT INTO bench_rows (org, name) VALUES ($1, $2)").bind(org).bind(format!("w-{n}")).execute(&db).await.is_ok()
        }
    })
    .await;
    raw_db.close().await;

    // `serve` first (its pools drain what the load enqueues, on the same cores), then
    // `api` alone (the request path only; its jobs stay queued).
    let served = server_phases(o, url, "serve", "serve").await?;
    // With --compare-notify: the api phases first with the insert trigger's NOTIFY in
    // every enqueuing transaction (the trigger as it was before wake-ups moved after the
    // commit), then as they are — on the fuller tables, so the difference is not flattered.
    let loud = match o.compare_notify {
        true => {
            set_trigger(url, LOUD_TRIGGER).await?;
            let loud = server_phases(o, url, "api", "api alone, NOTIFY in the transaction").await?;
            set_trigger(url, QUIET_TRIGGER).await?;
            Some(loud)
        }
        false => None,
    };
    let api = server_phases(o, url, "api", "api alone").await?;

    println!("| phase | ok | failed | per second | p50 ms | p99 ms | vs raw INSERT |");
    println!("|---|---|---|---|---|---|---|");
    let mut phases = vec![&raw, &served.create, &served.exec];
    if let Some(l) = &loud {
        phases.extend([&l.create, &l.exec]);
    }
    phases.extend([&api.create, &api.exec]);
    for p in phases {
        println!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} |",
            p.name,
            p.ok,
            p.failed,
            p.rate(),
            p.pct(0.5),
            p.pct(0.99),
            p.rate() / raw.rate()
        );
    }
    for m in [Some(&served), loud.as_ref(), Some(&api)].into_iter().flatten() {
        println!(
            "{} RSS: idle {:.1} MiB, peak under POST /workspaces {:.1} MiB, under exec {:.1} MiB",
            m.command, m.idle_rss, m.create_rss, m.exec_rss
        );
    }
    println!(
        "clients={} secs={} raw_insert_tps={:.0} create_rps={:.0} create_p99_ms={:.2} create_vs_raw={:.2} exec_rps={:.0} exec_p99_ms={:.2} exec_vs_raw={:.2} rss_idle_mib={:.1} rss_load_mib={:.1} api_create_rps={:.0} api_create_p99_ms={:.2} api_create_vs_raw={:.2} api_exec_rps={:.0} api_exec_p99_ms={:.2} api_exec_vs_raw={:.2}",
        o.clients,
        o.secs,
        raw.rate(),
        served.create.rate(),
        served.create.pct(0.99),
        served.create.rate() / raw.rate(),
        served.exec.rate(),
        served.exec.pct(0.99),
        served.exec.rate() / raw.rate(),
        served.idle_rss,
        served.create_rss.max(served.exec_rss),
        api.create.rate(),
        api.create.pct(0.99),
        api.create.rate() / raw.rate(),
        api.exec.rate(),
        api.exec.pct(0.99),
        api.exec.rate() / raw.rate(),
    );
    Ok(())
}

/// The two request phases against one `molecule <command>` process, and its memory.
struct ServerPhases {
    command: String,
    create: Phase,
    exec: Phase,
    idle_rss: f64,
    create_rss: f64,
    exec_rss: f64,
}

async fn server_phases(o: &Opts, url: &str, command: &'static str, label: &str) -> Fallible<ServerPhases> {
    let names = (format!("POST /workspaces ({label})"), format!("POST /workspaces/{{id}}/exec ({label})"));
    // `api` does not migrate; `serve` (run first) has.
    // The server process on the same database.
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
    let log = std::env::temp_dir().join(format!("molecule-bench-e2e-{}-{command}.log", std::process::id()));
    let logf = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let child = Command::new(&o.molecule)
        .arg(command)
        .env("DATABASE_URL", url)
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("MOLECULE_BACKEND", "none")
        .env("MOLECULE_LOG_FORMAT", "json")
        .env("RUST_LOG", "warn")
        .env("MOLECULE_DB_MAX_CONNECTIONS", "40")
        .stdout(Stdio::null())
        .stderr(Stdio::from(logf))
        .spawn()
        .map_err(|e| format!("{}: {e} (cargo build --release --bin molecule)", o.molecule.display()))?;
    let serve = Serve { child, base: format!("http://127.0.0.1:{port}") };
    let pid = serve.child.id();
    let http = reqwest::Client::builder().pool_max_idle_per_host(o.clients).build().map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{}/readyz", serve.base)).send().await {
            if r.status().is_success() {
                break;
            }
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!("serve did not become ready; its log: {}", log.display()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = Command::new(&o.molecule)
        .args(["org", "create", "bench-e2e", "--json"])
        .env("DATABASE_URL", url)
        .output()
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("org create: {e}: {}", String::from_utf8_lossy(&out.stderr)))?;
    let token = v["token"].as_str().ok_or("org create printed no token")?.to_string();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = rss_mib(pid);

    let (base, tok) = (serve.base.clone(), token.clone());
    let h = http.clone();
    let (create, create_rss) = with_peak_rss(
        pid,
        load(names.0, o.clients, o.secs, move |n| {
            let (h, base, tok) = (h.clone(), base.clone(), tok.clone());
            async move {
                let body = json!({"name": format!("w-{n}"), "runtime": "echo", "tier": 3});
                match h.post(format!("{base}/workspaces")).bearer_auth(&tok).json(&body).send().await {
                    Ok(r) => r.status().as_u16() == 202,
                    Err(_) => false,
                }
            }
        }),
    )
    .await;

    // The exec target: a tier-3 workspace, marked online (no backend can bring it up).
    let ws: Value = http
        .post(format!("{}/workspaces", serve.base))
        .bearer_auth(&token)
        .json(&json!({"name": "exec-target", "runtime": "echo", "tier": 3}))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let ws_id = ws["workspace"]["id"].as_str().ok_or_else(|| format!("create answered {ws}"))?.to_string();
    let db = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(url).await.map_err(|e| e.to_string())?;
    sqlx::query("UPDATE workspaces SET status = 'online' WHERE id = $1::uuid")
        .bind(&ws_id)
        .execute(&db)
        .await
        .map_err(|e| e.to_string())?;
    let (base, tok, target) = (serve.base.clone(), token.clone(), ws_id.clone());
    let h = http.clone();
    let (exec, exec_rss) = with_peak_rss(
        pid,
        load(names.1, o.clients, o.secs, move |_| {
            let (h, base, tok, target) = (h.clone(), base.clone(), tok.clone(), target.clone());
            async move {
                let body = json!({"argv": ["echo", "bench"], "timeout_s": 5});
                match h.post(format!("{base}/workspaces/{target}/exec")).bearer_auth(&tok).json(&body).send().await {
                    Ok(r) => r.status().as_u16() == 202,
                    Err(_) => false,
                }
            }
        }),
    )
    .await;
    db.close().await;
    drop(serve);
    Ok(ServerPhases { command: label.to_string(), create, exec, idle_rss, create_rss, exec_rss })
}

#[tokio::main]
async fn main() {
    let o = match opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench-e2e: {e}");
            std::process::exit(2);
        }
    };
    let mut embedded = None;
    let admin = match std::env::var("DATABASE_URL") {
        Ok(u) => u,
        Err(_) => {
            let preferred = std::env::temp_dir().join(format!("molecule-bench-e2e-{}", std::process::id()));
            let dir = match molecule_domain::embedded_pg::default_data_dir(&preferred) {
                Ok(d) => d.path,
                Err(e) => {
                    eprintln!("bench-e2e: {e}");
                    std::process::exit(1);
                }
            };
            let pg = match tokio::task::spawn_blocking(move || molecule_domain::embedded_pg::EmbeddedPostgres::start(&dir)).await {
                Ok(Ok(pg)) => pg,
                other => {
                    eprintln!("bench-e2e: embedded PostgreSQL: {:?}", other.err().map(|e| e.to_string()));
                    std::process::exit(1);
                }
            };
            let url = pg.database_url();
            embedded = Some((pg, preferred));
            url
        }
    };
    // A database of its own, migrated by serve itself.
    let name = format!("bench_e2e_{}", std::process::id());
    let url = match sqlx::PgPool::connect(&admin).await {
        Ok(a) => {
            let made = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&a).await;
            a.close().await;
            if let Err(e) = made {
                eprintln!("bench-e2e: create database: {e}");
                std::process::exit(1);
            }
            let (base, _) = admin.rsplit_once('/').unwrap_or((&admin, ""));
            format!("{base}/{name}")
        }
        Err(e) => {
            eprintln!("bench-e2e: connect {e}");
            std::process::exit(1);
        }
    };
    let outcome = run(&o, &url).await;
    if let Ok(a) = sqlx::PgPool::connect(&admin).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).execute(&a).await;
        a.close().await;
    }
    if let Some((mut pg, dir)) = embedded {
        pg.stop();
        let _ = std::fs::remove_dir_all(dir);
    }
    if let Err(e) = outcome {
        eprintln!("bench-e2e: {e}");
        std::process::exit(1);
    }
}
