//! Peers in the same harness: our job core beside awa and graphile_worker (Rust), on one
//! PostgreSQL, in one run, each in a database of its own.
//!
//! Three phases per system and round, rounds interleaved (ours, awa, graphile, ours, …)
//! because this machine is noisy; the table reports medians over rounds:
//! (1) bulk enqueue of N no-op jobs through the system's own bulk API (jobs/s);
//! (2) drain of those N jobs, timed from the worker's start until every job's outcome is
//!     in the database (each system's drain is verified before its figure counts);
//! (3) pickup: single jobs into an idle worker of 4, latency from BEFORE the enqueue call
//!     to the handler's start, p50/p95/p99 over S samples, 20 ms idle between samples.
//!
//! Each drain starts once no autovacuum worker runs on the cluster, and reports the CPU per
//! job it cost, for the cluster and for this process (the draining system's worker), when
//! the cluster runs on this machine; their medians come in a line before the last.
//!
//! The last line is
//! `ours_drain=<n> awa_drain=<n> graphile_drain=<n> drain_vs_awa=<x> drain_vs_graphile=<x>
//!  ours_pickup_p99_ms=<x> awa_pickup_p99_ms=<x> graphile_pickup_p99_ms=<x> …` (one line;
//! ratios are ours / peer, so > 1 means ours is faster for drain; for pickup the ratios
//! printed in the table are ours / peer latency, so < 1 means ours is faster).
//!
//! Flags (defaults): --jobs 20000 --rounds 3 --samples 300 --pool 40 (connections per
//! system) --concurrency 1000 (every system's worker slots in the drain) --batch 1000
//! (ours: claim batch) --awa-claim-batch 512 --awa-poll-ms 50 --awa-deadline-ms 0
//! --gw-local-size 1000 --gw-local-count 1 --gw-poll-ms 500 --gw-batch-delay-ms 5
//! --only ours,awa,graphile. DATABASE_URL unset → a private embedded cluster, removed at
//! exit.

mod awa;
mod graphile;
mod ours;
mod probe;

use molecule_domain::embedded_pg::EmbeddedPostgres;
use probe::Drain;
use std::path::PathBuf;
use std::time::Duration;

struct Opts {
    jobs: usize,
    rounds: usize,
    samples: usize,
    pool: u32,
    concurrency: usize,
    batch: usize,
    awa: awa::AwaOpts,
    graphile: graphile::GraphileOpts,
    only: Vec<String>,
}

fn opts() -> Result<Opts, String> {
    let mut o = Opts {
        jobs: 20_000,
        rounds: 3,
        samples: 300,
        pool: 40,
        concurrency: 1000,
        batch: 1000,
        awa: awa::AwaOpts { max_workers: 0, claim_batch: 512, poll: Duration::from_millis(50), deadline: Duration::ZERO },
        graphile: graphile::GraphileOpts {
            concurrency: 0,
            local_queue_size: 1000,
            local_queue_count: 1,
            poll: Duration::from_millis(500),
            batch_delay: Duration::from_millis(5),
        },
        only: vec!["ours".into(), "awa".into(), "graphile".into()],
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let flag = pair[0].as_str();
        let v = pair.get(1).ok_or_else(|| format!("{flag} needs a value"))?;
        if flag == "--only" {
            o.only = v.split(',').map(|s| s.trim().to_string()).collect();
            continue;
        }
        let n: usize = v.parse().map_err(|_| format!("{flag}: {v:?} is not a number"))?;
        let ms = Duration::from_millis(n as u64);
        match flag {
            "--jobs" => o.jobs = n.max(1),
            "--rounds" => o.rounds = n.max(1),
            "--samples" => o.samples = n.max(1),
            "--pool" => o.pool = n.max(2) as u32,
            "--concurrency" => o.concurrency = n.max(1),
            "--batch" => o.batch = n.max(1),
            "--awa-claim-batch" => o.awa.claim_batch = n.max(1),
            "--awa-poll-ms" => o.awa.poll = ms,
            "--awa-deadline-ms" => o.awa.deadline = ms,
            "--gw-local-size" => o.graphile.local_queue_size = n.max(1),
            "--gw-local-count" => o.graphile.local_queue_count = n.max(1),
            "--gw-poll-ms" => o.graphile.poll = ms,
            "--gw-batch-delay-ms" => o.graphile.batch_delay = ms,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    // Every system gets the same number of worker slots in the drain.
    o.awa.max_workers = o.concurrency as u32;
    o.graphile.concurrency = o.concurrency;
    Ok(o)
}

/// One system under test, so the harness can loop over them.
enum System {
    Ours(ours::Ours),
    Awa(awa::Awa),
    Graphile(graphile::Graphile),
}

impl System {
    fn name(&self) -> &'static str {
        match self {
            System::Ours(_) => "ours",
            System::Awa(_) => "awa",
            System::Graphile(_) => "graphile",
        }
    }

    fn version(&self) -> &'static str {
        match self {
            System::Ours(_) => ours::VERSION,
            System::Awa(_) => awa::VERSION,
            System::Graphile(_) => graphile::VERSION,
        }
    }

    fn settings(&self) -> String {
        match self {
            System::Ours(s) => s.settings(),
            System::Awa(s) => s.settings(),
            System::Graphile(s) => s.settings(),
        }
    }

    async fn drain(&self, n: usize, round: usize) -> Drain {
        match self {
            System::Ours(s) => s.drain(n, round).await,
            System::Awa(s) => s.drain(n, round).await,
            System::Graphile(s) => s.drain(n, round).await,
        }
    }

    async fn pickup(&self, samples: usize, round: usize) -> Vec<f64> {
        match self {
            System::Ours(s) => s.pickup(samples, round).await,
            System::Awa(s) => s.pickup(samples, round).await,
            System::Graphile(s) => s.pickup(samples, round).await,
        }
    }

    async fn close(self) {
        match self {
            System::Ours(s) => s.close().await,
            System::Awa(s) => s.close().await,
            System::Graphile(s) => s.close().await,
        }
    }
}

/// Per-round figures of one system.
#[derive(Default)]
struct Figures {
    enqueue: Vec<f64>,
    drain: Vec<f64>,
    pg_us: Vec<f64>,
    worker_us: Vec<f64>,
    p50: Vec<f64>,
    p95: Vec<f64>,
    p99: Vec<f64>,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The PostgreSQL server: DATABASE_URL's, or a private cluster (and its directories,
/// removed at exit).
struct Server {
    admin_url: String,
    embedded: Option<(EmbeddedPostgres, Vec<PathBuf>)>,
}

async fn server() -> Server {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return Server { admin_url: url, embedded: None };
    }
    // Under TMPDIR unless the cluster's user cannot reach it there (a 0700 TMPDIR, as root).
    let preferred = std::env::temp_dir().join(format!("molecule-bench-peers-{}", std::process::id()));
    let dir = molecule_domain::embedded_pg::default_data_dir(&preferred).expect("data directory").path;
    eprintln!("bench-peers: private PostgreSQL in {}", dir.display());
    let d = dir.clone();
    let pg = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&d)).await.unwrap().expect("embedded PostgreSQL");
    let admin_url = pg.database_url();
    Server { admin_url, embedded: Some((pg, vec![dir, preferred])) }
}

impl Server {
    /// A fresh database on this server; its URL.
    async fn create_db(&self, admin: &sqlx::PgPool, name: &str) -> String {
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(admin).await.expect("create database");
        let (base, _) = self.admin_url.rsplit_once('/').expect("URL with a database");
        format!("{base}/{name}")
    }

    fn stop(self) {
        // The private cluster goes with the run (each is ~40 MB or more; disk is limited).
        if let Some((mut pg, dirs)) = self.embedded {
            pg.stop();
            for d in dirs {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}

async fn setup(o: &Opts, name: &str, url: &str) -> System {
    match name {
        "ours" => System::Ours(ours::Ours::setup(url, o.pool, o.concurrency, o.batch).await),
        "awa" => System::Awa(awa::Awa::setup(url, o.pool, o.awa).await),
        "graphile" => System::Graphile(graphile::Graphile::setup(url, o.pool, o.graphile).await),
        other => panic!("unknown system {other} (ours, awa, graphile)"),
    }
}

#[tokio::main]
async fn main() {
    let o = match opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench-peers: {e}");
            std::process::exit(2);
        }
    };
    let server = server().await;
    let admin = molecule_domain::db::connect(&server.admin_url, 2).await.expect("connect");
    let version: String = sqlx::query_scalar("SHOW server_version").fetch_one(&admin).await.expect("server version");
    println!("PostgreSQL {version}; {} jobs, {} rounds, {} pickup samples, {} connections per system", o.jobs, o.rounds, o.samples, o.pool);
    // CPU per drained job, when the cluster runs here: work per job is steadier than jobs/s
    // on a machine shared with other work.
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&admin).await.expect("backend pid");
    probe::watch_cluster(molecule_bench_cpu::postmaster_of(backend as u32));

    // A database of its own per system, so no system reads another's tables or leftovers.
    let mut systems = Vec::new();
    let mut dbs = Vec::new();
    for name in &o.only {
        let db = format!("peers_{}_{name}", std::process::id());
        let url = server.create_db(&admin, &db).await;
        let s = setup(&o, name, &url).await;
        println!("{:<9} {:<34} {}", s.name(), s.version(), s.settings());
        systems.push(s);
        dbs.push(db);
    }

    let figures = run_rounds(&o, &systems, &admin).await;
    report(&systems, &figures);

    for s in systems {
        s.close().await;
    }
    for db in dbs {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {db} WITH (FORCE)"))).execute(&admin).await.ok();
    }
    admin.close().await;
    server.stop();
}

/// Rounds interleaved across systems: drain, then pickup, for each system in turn.
async fn run_rounds(o: &Opts, systems: &[System], admin: &sqlx::PgPool) -> Vec<Figures> {
    let mut figures: Vec<Figures> = systems.iter().map(|_| Figures::default()).collect();
    for round in 0..o.rounds {
        for (s, f) in systems.iter().zip(figures.iter_mut()) {
            let waited = probe::until_autovacuum_idle(admin, Duration::from_secs(60)).await;
            if std::env::var_os("PEERS_PHASES").is_some() && waited > Duration::from_millis(100) {
                eprintln!("  waited {} ms for autovacuum before {}'s drain", waited.as_millis(), s.name());
            }
            let d = s.drain(o.jobs, round).await;
            let lat = s.pickup(o.samples, round).await;
            println!(
                "round {round}: {:<9} enqueue {:>7.0} jobs/s, drain {:>7.0} jobs/s, pickup p50 {:>6.2} ms p95 {:>6.2} ms p99 {:>6.2} ms (max {:.2}){}",
                s.name(),
                d.enqueue_jobs_s,
                d.drain_jobs_s,
                pct(&lat, 0.50),
                pct(&lat, 0.95),
                pct(&lat, 0.99),
                lat[lat.len() - 1],
                if probe::cluster_watched() {
                    format!("; drain CPU per job: PostgreSQL {:.1} µs, worker {:.1} µs", d.cpu.pg_us, d.cpu.own_us)
                } else {
                    String::new()
                }
            );
            f.enqueue.push(d.enqueue_jobs_s);
            f.drain.push(d.drain_jobs_s);
            f.pg_us.push(d.cpu.pg_us);
            f.worker_us.push(d.cpu.own_us);
            f.p50.push(pct(&lat, 0.50));
            f.p95.push(pct(&lat, 0.95));
            f.p99.push(pct(&lat, 0.99));
        }
    }
    figures
}

/// The table of medians, the ratios against our core, and the one-line summary.
fn report(systems: &[System], figures: &[Figures]) {
    println!();
    println!("medians over rounds");
    println!("| system   | version                            | enqueue jobs/s | drain jobs/s | pickup p50 ms | pickup p95 ms | pickup p99 ms |");
    println!("|----------|------------------------------------|---------------:|-------------:|--------------:|--------------:|--------------:|");
    for (s, f) in systems.iter().zip(figures) {
        println!(
            "| {:<8} | {:<34} | {:>14.0} | {:>12.0} | {:>13.2} | {:>13.2} | {:>13.2} |",
            s.name(),
            s.version(),
            median(&f.enqueue),
            median(&f.drain),
            median(&f.p50),
            median(&f.p95),
            median(&f.p99)
        );
    }
    let ours = systems.iter().position(|s| s.name() == "ours");
    let mut last = Vec::new();
    for (s, f) in systems.iter().zip(figures) {
        last.push(format!("{}_drain={:.0}", s.name(), median(&f.drain)));
    }
    if let Some(i) = ours {
        let o = &figures[i];
        println!();
        println!("ratios, ours / peer (enqueue and drain: > 1 = ours faster; pickup latency: < 1 = ours faster)");
        for (s, f) in systems.iter().zip(figures).filter(|(s, _)| s.name() != "ours") {
            println!(
                "  vs {:<9} enqueue {:.2}x  drain {:.2}x  pickup p50 {:.2}x  pickup p99 {:.2}x",
                s.name(),
                median(&o.enqueue) / median(&f.enqueue),
                median(&o.drain) / median(&f.drain),
                median(&o.p50) / median(&f.p50),
                median(&o.p99) / median(&f.p99)
            );
            last.push(format!("drain_vs_{}={:.2}", s.name(), median(&o.drain) / median(&f.drain)));
        }
    }
    if probe::cluster_watched() {
        let cpu: Vec<String> = systems
            .iter()
            .zip(figures)
            .map(|(s, f)| format!("{} postgres={:.1} worker={:.1}", s.name(), median(&f.pg_us), median(&f.worker_us)))
            .collect();
        println!("drain cpu_us_per_job (medians): {}", cpu.join("; "));
    }
    for (s, f) in systems.iter().zip(figures) {
        last.push(format!("{}_pickup_p99_ms={:.2}", s.name(), median(&f.p99)));
    }
    for (s, f) in systems.iter().zip(figures) {
        last.push(format!("{}_pickup_p50_ms={:.2}", s.name(), median(&f.p50)));
    }
    for (s, f) in systems.iter().zip(figures) {
        last.push(format!("{}_enqueue={:.0}", s.name(), median(&f.enqueue)));
    }
    println!("{}", last.join(" "));
}
