//! Queue benchmark: our job core against a raw-SQL baseline on the same PostgreSQL, in
//! one run.
//!
//! (a) drain: N no-op jobs bulk-enqueued, then drained by one pool of our runtime, and
//!     by the raw baseline (K clients, each: claim a batch with FOR UPDATE SKIP LOCKED,
//!     complete the batch; sqlx prepares and caches both statements per connection).
//!     Both start warm: our pool is running and idle (a warm-up job through it) when the
//!     fill, one transaction, commits — the clock starts there and stops when every
//!     outcome is written; the raw clients' connections are open when they start.
//!     The raw side runs its default (claim 50, 4 clients: `raw_jobs_s`) and every
//!     claim size of 50 and 500 with 1, 2, 4 and 8 clients; the best of those is
//!     `raw_best_jobs_s`, the strongest figure this PostgreSQL gives with no library in
//!     the way. Rounds alternate; medians are reported. With the cluster on this machine,
//!     each drain's CPU is read from /proc (the cluster's processes, and this process:
//!     our runtime, or the raw clients): the `cpu_us_per_job` line splits
//!     `drain_vs_raw_best` into PostgreSQL's work per job and how busy each side keeps
//!     the machine (medians over rounds, each taken on its own). PostgreSQL's share
//!     includes its background processes meanwhile (an autovacuum that starts during a
//!     drain is charged to it).
//! (b) pickup: single jobs enqueued one at a time into an idle pool, timed two ways:
//!     from the enqueue's commit to the handler's start (`pickup_*`), and from before the
//!     enqueue call (`pickup_e2e_*`: what the Node peers' harness measures); then again
//!     with each job enqueued quietly and announced after its commit (`jobs::announce`,
//!     the API's busy paths), with the pool elsewhere and in the announcer's process, on a
//!     line of its own.
//! (c) `--processes N`: the drain by N worker processes (this binary, re-run as a
//!     worker) on the one PostgreSQL, with PostgreSQL's CPU time over the drain.
//! (d) `--designs 1`: PostgreSQL's time per job to claim and complete in batches of B,
//!     inside PostgreSQL (no client in the loop), for our tables and statements, the
//!     alternative designs and the raw table (designs.sql says what each is).
//!
//! The last line is exactly:
//! `drain_jobs_s=<n> raw_jobs_s=<n> drain_ratio=<x> pickup_p50_ms=<x> pickup_p95_ms=<x> pickup_p99_ms=<x>
//!  pickup_e2e_p50_ms=<x> pickup_e2e_p99_ms=<x> raw_best_jobs_s=<n> drain_vs_raw_best=<x>` (one line).
//!
//! Flags: --jobs N (20000) --rounds R (3) --samples S (300) --concurrency C (1000)
//! --batch B (1000) --raw-clients K (4) --raw-batch M (50) --pools P (1) --processes N (0:
//! in this process) --raw-matrix 0|1 (1) --designs 0|1 (0). DATABASE_URL unset → a private embedded
//! cluster in a temporary directory.

use molecule_bench_cpu::{Cpu, CpuUse, children_cpu_s, cluster_cpu_s};
use molecule_domain::embedded_pg::EmbeddedPostgres;
use molecule_jobs::{Announcer, NewJob, PoolSpec, RetryPolicy, Runtime, RuntimeConfig, enqueue, enqueue_many, handler_fn};
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

struct Opts {
    jobs: usize,
    rounds: usize,
    samples: usize,
    concurrency: usize,
    batch: usize,
    raw_clients: usize,
    raw_batch: i64,
    pools: usize,
    processes: usize,
    raw_matrix: bool,
    designs: bool,
}

fn opts() -> Result<Opts, String> {
    let mut o = Opts {
        jobs: 20_000,
        rounds: 3,
        samples: 300,
        concurrency: 1000,
        batch: 1000,
        raw_clients: 4,
        raw_batch: 50,
        pools: 1,
        processes: 0,
        raw_matrix: true,
        designs: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).ok_or_else(|| format!("{} needs a value", args[i]))?;
        let n: usize = v.parse().map_err(|_| format!("{}: {v:?} is not a number", args[i]))?;
        match args[i].as_str() {
            "--jobs" => o.jobs = n,
            "--rounds" => o.rounds = n.max(1),
            "--samples" => o.samples = n.max(1),
            "--concurrency" => o.concurrency = n.max(1),
            "--batch" => o.batch = n.max(1),
            "--raw-clients" => o.raw_clients = n.max(1),
            "--raw-batch" => o.raw_batch = n.max(1) as i64,
            "--pools" => o.pools = n.max(1),
            "--processes" => o.processes = n,
            "--raw-matrix" => o.raw_matrix = n != 0,
            "--designs" => o.designs = n != 0,
            other => return Err(format!("unknown flag {other}")),
        }
        i += 2;
    }
    Ok(o)
}

fn runtime_cfg(batch: usize) -> RuntimeConfig {
    RuntimeConfig {
        lease: Duration::from_secs(30),
        heartbeat: Duration::from_secs(5),
        poll_interval: Duration::from_secs(1),
        grace: Duration::from_secs(10),
        batch,
        node: "bench".into(),
        ..Default::default()
    }
}

const RETRY: RetryPolicy = RetryPolicy { base: Duration::from_secs(1), cap: Duration::from_secs(10), max_attempts: 3 };

/// Bulk-enqueues `n` jobs in 5 000-job statements on `conn`; returns jobs/s.
async fn fill(conn: &mut sqlx::PgConnection, queue: &str, n: usize) -> f64 {
    let payload = serde_json::json!({});
    let t0 = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
        let jobs: Vec<NewJob> = chunk.iter().map(|_| NewJob::to_queue(queue, &payload)).collect();
        enqueue_many(conn, &jobs).await.expect("enqueue");
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

/// Drains `n` queued no-op jobs through our runtime: jobs/s from the commit of the fill
/// until every outcome is written. The pool is running by then, idle, its connections
/// open (as the raw clients' are): the runtime's start and shutdown — connecting, the
/// first heartbeat, the lease; the last heartbeat — are not a drain's work (BENCH_PHASES
/// prints them). The jobs are filled in one transaction, so none is claimed before all are
/// there.
async fn drain_ours(db: &PgPool, o: &Opts, round: usize, pm: Option<u32>) -> (f64, f64, CpuUse) {
    let queue = format!("bench_drain_{round}");
    let handled = Arc::new(AtomicUsize::new(0));
    let (first, last) = (Arc::new(std::sync::OnceLock::<Instant>::new()), Arc::new(std::sync::OnceLock::<Instant>::new()));
    let (h, f, l, n) = (handled.clone(), first.clone(), last.clone(), o.jobs);
    let handler = handler_fn(move |_ctx| {
        let (h, f, l) = (h.clone(), f.clone(), l.clone());
        async move {
            // The first job is the warm-up's, the next n the drain's.
            match h.fetch_add(1, Ordering::Relaxed) + 1 {
                2 => drop(f.set(Instant::now())),
                c if c == n + 1 => drop(l.set(Instant::now())),
                _ => {}
            }
            Ok(serde_json::Value::Null)
        }
    });
    let started = Instant::now();
    let specs = (0..o.pools).map(|_| PoolSpec::new(queue.clone(), o.concurrency, RETRY, handler.clone())).collect();
    let rt = Runtime::start(db.clone(), runtime_cfg(o.batch), specs);
    // Warm-up: one job through the pool, its outcome written.
    enqueue(&mut *db.acquire().await.expect("connection"), &NewJob::to_queue(&queue, &serde_json::json!({}))).await.expect("enqueue");
    until_acks_applied(&rt, db, &queue, 1).await;
    let warm = started.elapsed();

    let mut tx = db.begin().await.expect("begin");
    let enqueue_rate = fill(&mut tx, &queue, o.jobs).await;
    sqlx::query("ANALYZE apalis.jobs").execute(&mut *tx).await.ok();
    let cpu = Cpu::now(pm);
    let t0 = Instant::now();
    tx.commit().await.expect("commit the fill");
    until_acks_applied(&rt, db, &queue, o.jobs as u64 + 1).await;
    let secs = t0.elapsed().as_secs_f64();
    let used = cpu.used(o.jobs);
    let t_stop = Instant::now();
    rt.shutdown().await;
    if std::env::var_os("BENCH_PHASES").is_some() {
        let ms = |t: Option<&Instant>| t.map(|t| t.saturating_duration_since(t0).as_secs_f64() * 1000.0).unwrap_or(0.0);
        eprintln!(
            "  phases: runtime start to a warm-up job's outcome {:.0} ms; from the fill's commit: first handler {:.0} ms, last handler {:.0} ms, every outcome written {:.0} ms; shutdown {:.0} ms",
            warm.as_secs_f64() * 1000.0,
            ms(first.get()),
            ms(last.get()),
            secs * 1000.0,
            t_stop.elapsed().as_secs_f64() * 1000.0
        );
    }
    assert_all_succeeded(db, &queue, o.jobs + 1).await;
    (o.jobs as f64 / secs, enqueue_rate, used)
}

/// Until `rt` has written the outcomes of `n` jobs of `queue` (its counter, checked every
/// millisecond: no query). After a second without progress the table is asked instead: an
/// ack batch written again after a lost answer reads as refused and is not counted.
async fn until_acks_applied(rt: &Runtime, db: &PgPool, queue: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut seen, mut since) = (rt.acks_applied(), Instant::now());
    while rt.acks_applied() < n {
        assert!(Instant::now() < deadline, "{} of {n} outcomes written after 10 minutes", rt.acks_applied());
        tokio::time::sleep(Duration::from_millis(1)).await;
        let now = rt.acks_applied();
        if now != seen {
            (seen, since) = (now, Instant::now());
        } else if since.elapsed() >= Duration::from_secs(1) {
            let done: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE job_type = $1 AND status = 'Done'")
                .bind(queue)
                .fetch_one(db)
                .await
                .expect("count");
            if done as u64 >= n {
                return;
            }
            since = Instant::now();
        }
    }
}

/// A drain counts only if every job of it ended succeeded.
async fn assert_all_succeeded(db: &PgPool, queue: &str, n: usize) {
    let succeeded: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE job_type = $1 AND status = 'Done'")
        .bind(queue)
        .fetch_one(db)
        .await
        .expect("count");
    assert_eq!(succeeded as usize, n, "every job must end succeeded");
}

const RAW_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS bench_raw (
    id bigserial PRIMARY KEY,
    queue text NOT NULL,
    status text NOT NULL DEFAULT 'available',
    run_at timestamptz NOT NULL DEFAULT now(),
    payload bytea
);
CREATE INDEX IF NOT EXISTS bench_raw_claim ON bench_raw (queue, run_at, id) WHERE status = 'available';
"#;

const RAW_CLAIM: &str = r#"
UPDATE bench_raw SET status = 'running'
WHERE id = ANY(ARRAY(SELECT id FROM bench_raw WHERE queue = $1 AND status = 'available' AND run_at <= now()
                     ORDER BY run_at, id LIMIT $2 FOR UPDATE SKIP LOCKED))
RETURNING id, payload
"#;

/// The physical baseline: `clients` clients, each claiming `batch` with SKIP LOCKED and
/// completing it.
async fn drain_raw(db: &PgPool, o: &Opts, queue: &str, clients: usize, batch: i64, pm: Option<u32>) -> (f64, CpuUse) {
    let queue = queue.to_string();
    sqlx::query("INSERT INTO bench_raw (queue, payload) SELECT $1, '\\x7b7d' FROM generate_series(1, $2)")
        .bind(&queue)
        .bind(o.jobs as i64)
        .execute(db)
        .await
        .expect("fill raw");
    sqlx::query("ANALYZE bench_raw").execute(db).await.ok();
    // Its clients' connections open before the clock starts, as our pool's are: held at
    // once, then back in the pool (a released connection returns in a task of its own).
    let mut held = Vec::new();
    for _ in 0..clients {
        held.push(db.acquire().await.expect("connection"));
    }
    drop(held);
    let back_by = Instant::now() + Duration::from_secs(2);
    while db.num_idle() < clients && Instant::now() < back_by {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let cpu = Cpu::now(pm);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (db, queue) = (db.clone(), queue.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let rows: Vec<(i64, Option<Vec<u8>>)> =
                    sqlx::query_as(RAW_CLAIM).bind(&queue).bind(batch).fetch_all(&db).await.expect("claim");
                if rows.is_empty() {
                    break;
                }
                let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
                sqlx::query("UPDATE bench_raw SET status = 'done' WHERE id = ANY($1)").bind(&ids).execute(&db).await.expect("complete");
            }
        }));
    }
    for t in tasks {
        t.await.expect("raw client");
    }
    let secs = t0.elapsed().as_secs_f64();
    let used = cpu.used(o.jobs);
    let done: i64 = sqlx::query_scalar("SELECT count(*) FROM bench_raw WHERE queue = $1 AND status = 'done'")
        .bind(&queue)
        .fetch_one(db)
        .await
        .expect("count");
    assert_eq!(done as usize, o.jobs);
    (o.jobs as f64 / secs, used)
}

/// Latency of single jobs into an idle pool, in ms, sorted: (from the enqueue's commit,
/// from before the enqueue call) to the handler's start.
/// How a pickup's job reaches the idle pool.
#[derive(Clone, Copy, PartialEq)]
enum Wake {
    /// The insert trigger's NOTIFY at the enqueue's commit.
    Trigger,
    /// Enqueued quietly, announced after the commit by an announcer's NOTIFY (the API's
    /// busy paths, with the pools in other processes).
    Announced,
    /// The same, with the pool in the announcer's process (`serve`): woken directly.
    AnnouncedLocally,
}

async fn pickup(db: &PgPool, o: &Opts, wake: Wake, queue: &str) -> (Vec<f64>, Vec<f64>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
    let handler = handler_fn(move |_ctx| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(Instant::now());
            Ok(serde_json::Value::Null)
        }
    });
    let rt = Runtime::start(db.clone(), runtime_cfg(o.batch), vec![PoolSpec::new(queue, 4, RETRY, handler)]);
    let announcer = (wake != Wake::Trigger).then(|| Announcer::start(db.connect_options().as_ref().clone()));
    if let (Some(a), Wake::AnnouncedLocally) = (&announcer, wake) {
        a.wake_locally(rt.local_wakers());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut conn = db.acquire().await.expect("connection");
    let mut lat = Vec::with_capacity(o.samples);
    let mut e2e = Vec::with_capacity(o.samples);
    for _ in 0..o.samples {
        let called = Instant::now();
        let job = NewJob::to_queue(queue, &serde_json::json!({}));
        match &announcer {
            Some(a) => {
                enqueue(&mut conn, &job.announce_after_commit()).await.expect("enqueue");
                a.announce(queue);
            }
            None => {
                enqueue(&mut conn, &job).await.expect("enqueue");
            }
        }
        let committed = Instant::now();
        let started = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("pickup within 10 s").expect("handler");
        lat.push(started.saturating_duration_since(committed).as_secs_f64() * 1000.0);
        e2e.push(started.saturating_duration_since(called).as_secs_f64() * 1000.0);
        // Let the pool go idle again before the next sample.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(conn);
    rt.shutdown().await;
    lat.sort_by(|a, b| a.total_cmp(b));
    e2e.sort_by(|a, b| a.total_cmp(b));
    (lat, e2e)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--worker-child") {
        let n = |i: usize| args.get(i).and_then(|v| v.parse().ok()).expect("worker-child arguments");
        worker_child(&args[2], &args[3], n(4), n(5)).await;
        return;
    }
    let o = match opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench-queue: {e}");
            std::process::exit(2);
        }
    };
    let (embedded, admin) = match std::env::var("DATABASE_URL") {
        Ok(u) => (None, u),
        Err(_) => {
            // Under TMPDIR unless the cluster's user cannot reach it there (a 0700 TMPDIR, as root).
            let preferred = std::env::temp_dir().join(format!("molecule-bench-{}", std::process::id()));
            let dir = molecule_domain::embedded_pg::default_data_dir(&preferred).expect("data directory").path;
            eprintln!("bench-queue: private PostgreSQL in {}", dir.display());
            let pg = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&dir)).await.unwrap().expect("embedded PostgreSQL");
            let url = pg.database_url();
            (Some((pg, preferred)), url)
        }
    };
    // A database of its own, so the figures never depend on leftovers.
    let name = format!("bench_{}", std::process::id());
    let admin_pool = molecule_domain::db::connect(&admin, 2).await.expect("connect");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin_pool).await.expect("create database");
    let (base, _) = admin.rsplit_once('/').expect("URL with a database");
    let db = molecule_domain::db::connect(&format!("{base}/{name}"), 40).await.expect("connect bench db");
    molecule_domain::db::migrate(&db).await.expect("migrate");
    sqlx::raw_sql(RAW_SCHEMA).execute(&db).await.expect("raw schema");

    if o.designs {
        designs(&db, &o).await;
    } else if o.processes > 0 {
        scale_out(&db, &o, &format!("{base}/{name}")).await;
    } else {
        in_process(&db, &o).await;
    }
    db.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name}"))).execute(&admin_pool).await.ok();
    admin_pool.close().await;
    // The private cluster goes with the run (each is ~40 MB or more).
    if let Some((mut pg, dir)) = embedded {
        pg.stop();
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// (a) and (b): the drain rounds beside the raw baselines, then pickup; the last line.
async fn in_process(db: &PgPool, o: &Opts) {
    let pm = local_postmaster(db).await;
    let mut ours = Vec::new();
    let mut raw = Vec::new();
    let mut best = Vec::new();
    let mut enq = Vec::new();
    let (mut ours_cpu, mut best_cpu) = (Vec::new(), Vec::new());
    for round in 0..o.rounds {
        let (r, r_cpu) = drain_raw(db, o, &format!("raw_{round}"), o.raw_clients, o.raw_batch, pm).await;
        let mut round_best = (r, r_cpu);
        if o.raw_matrix {
            for batch in [50, 500] {
                let mut line = format!("round {round}: raw claim {batch:>3}:");
                for clients in [1, 2, 4, 8] {
                    let (rate, cpu) = drain_raw(db, o, &format!("raw_{round}_{batch}_{clients}"), clients, batch, pm).await;
                    line.push_str(&format!(" {clients} clients {rate:.0}"));
                    if rate > round_best.0 {
                        round_best = (rate, cpu);
                    }
                }
                println!("{line} jobs/s");
            }
        }
        let (d, e, d_cpu) = drain_ours(db, o, round, pm).await;
        println!(
            "round {round}: ours {d:.0} jobs/s, raw {r:.0} jobs/s (claim {}, {} clients), raw best {:.0} jobs/s, bulk enqueue {e:.0} jobs/s ({} jobs)",
            o.raw_batch, o.raw_clients, round_best.0, o.jobs
        );
        if pm.is_some() {
            println!("round {round}: CPU per job: ours {d_cpu}; raw best {}", round_best.1);
        }
        ours.push(d);
        raw.push(r);
        best.push(round_best.0);
        enq.push(e);
        ours_cpu.push(d_cpu);
        best_cpu.push(round_best.1);
    }
    println!("bulk_enqueue_jobs_s={:.0}", median(enq));
    if pm.is_some() {
        // Where drain_vs_raw_best goes: the PostgreSQL work per job (the schema's and the
        // statements' share), and how much of the machine each side keeps busy.
        // postgres_work_vs_raw_best < 1: a job of ours costs PostgreSQL more.
        let (op, oc, rp, rc) = (
            median(ours_cpu.iter().map(|c| c.pg_us).collect()),
            median(ours_cpu.iter().map(|c| c.own_us).collect()),
            median(best_cpu.iter().map(|c| c.pg_us).collect()),
            median(best_cpu.iter().map(|c| c.own_us).collect()),
        );
        println!(
            "cpu_us_per_job: ours postgres={op:.1} runtime={oc:.1} cores={:.2}; raw_best postgres={rp:.1} clients={rc:.1} cores={:.2}; postgres_work_vs_raw_best={:.2}",
            median(ours_cpu.iter().map(|c| c.cores).collect()),
            median(best_cpu.iter().map(|c| c.cores).collect()),
            rp / op
        );
    }
    // First, while its claimed jobs' index entries are still there (no vacuum yet): pickup
    // on the queue the last round drained, by a pool started on it.
    let drained = format!("bench_drain_{}", o.rounds - 1);
    let (_, after_drain) = pickup(db, o, Wake::Trigger, &drained).await;
    println!(
        "pickup on the queue just drained ({} jobs), from before the enqueue call: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        o.jobs,
        pct(&after_drain, 0.5),
        pct(&after_drain, 0.99),
        after_drain[after_drain.len() - 1]
    );
    let (lat, e2e) = pickup(db, o, Wake::Trigger, "bench_pickup").await;
    let (_, announced) = pickup(db, o, Wake::Announced, "bench_pickup").await;
    let (_, local) = pickup(db, o, Wake::AnnouncedLocally, "bench_pickup").await;
    println!(
        "pickup from before the enqueue call, p50/p99 ms over {} samples: trigger's NOTIFY {:.2}/{:.2}; announced after the commit {:.2}/{:.2}; announced, pool in the same process {:.2}/{:.2}",
        e2e.len(),
        pct(&e2e, 0.5),
        pct(&e2e, 0.99),
        pct(&announced, 0.5),
        pct(&announced, 0.99),
        pct(&local, 0.5),
        pct(&local, 0.99)
    );
    let (d, r, b) = (median(ours), median(raw), median(best));
    println!(
        "pickup over {} samples, from the commit: min {:.2} ms, max {:.2} ms; from before the enqueue call: min {:.2} ms, max {:.2} ms",
        lat.len(),
        lat[0],
        lat[lat.len() - 1],
        e2e[0],
        e2e[e2e.len() - 1]
    );
    let dead: Option<(i64, i64, i64)> = sqlx::query_as(
        "SELECT n_dead_tup, n_live_tup, pg_total_relation_size('apalis.jobs') FROM pg_stat_user_tables \
         WHERE schemaname = 'apalis' AND relname = 'jobs'",
    )
    .fetch_optional(db)
    .await
    .ok()
    .flatten();
    if let Some((dead, live, bytes)) = dead {
        println!("apalis.jobs after the run: {live} live rows, {dead} dead tuples, {:.1} MiB with its indexes", bytes as f64 / 1048576.0);
    }
    println!(
        "drain_jobs_s={:.0} raw_jobs_s={:.0} drain_ratio={:.2} pickup_p50_ms={:.2} pickup_p95_ms={:.2} pickup_p99_ms={:.2} \
         pickup_e2e_p50_ms={:.2} pickup_e2e_p99_ms={:.2} raw_best_jobs_s={:.0} drain_vs_raw_best={:.2}",
        d,
        r,
        d / r,
        pct(&lat, 0.50),
        pct(&lat, 0.95),
        pct(&lat, 0.99),
        pct(&e2e, 0.50),
        pct(&e2e, 0.99),
        b,
        d / b
    );
}

/// `raw` last: the others are printed against it.
const DESIGNS: [&str; 9] = ["current", "held", "before", "hot_ready", "ready_claims", "hot_live", "our_indexes", "apalis_row", "raw"];

/// (d): µs per job of each table design, in rounds (the order rotating), medians last.
async fn designs(db: &PgPool, o: &Opts) {
    sqlx::raw_sql(include_str!("../designs.sql")).execute(db).await.expect("designs.sql");
    let mut conn = db.acquire().await.expect("connection");
    let mut us: Vec<Vec<f64>> = vec![Vec::new(); DESIGNS.len()];
    for round in 0..o.rounds {
        let q = format!("d{round}");
        sqlx::query("CALL bench_designs.fill($1, $2)").bind(&q).bind(o.jobs as i32).execute(&mut *conn).await.expect("fill");
        sqlx::raw_sql(
            "VACUUM ANALYZE bench_designs.current_jobs, bench_designs.held_jobs, bench_designs.before_jobs, bench_designs.claims, bench_designs.hot_jobs, bench_designs.ready, bench_designs.live, \
             bench_designs.our_indexes, bench_designs.apalis_row, bench_designs.raw",
        )
            .execute(&mut *conn)
            .await
            .expect("vacuum");
        let mut line = format!("round {round}: µs per job (claim {} + complete):", o.batch);
        for k in 0..DESIGNS.len() {
            let d = (k + round) % DESIGNS.len();
            let call = format!("CALL bench_designs.drain_{}($1, $2, 0)", DESIGNS[d]);
            let t0 = Instant::now();
            let n: i32 =
                sqlx::query_scalar(sqlx::AssertSqlSafe(call)).bind(&q).bind(o.batch as i32).fetch_one(&mut *conn).await.expect("drain");
            assert_eq!(n as usize, o.jobs, "{} drained every job", DESIGNS[d]);
            let v = t0.elapsed().as_secs_f64() * 1e6 / o.jobs as f64;
            line.push_str(&format!(" {} {v:.1}", DESIGNS[d]));
            us[d].push(v);
        }
        println!("{line}");
    }
    drop(conn);
    sqlx::raw_sql("DROP SCHEMA bench_designs CASCADE").execute(db).await.ok();
    let m: Vec<f64> = us.into_iter().map(median).collect();
    let raw = m[DESIGNS.len() - 1];
    let each = |f: &dyn Fn(f64) -> String| DESIGNS.iter().zip(&m).map(|(d, v)| format!("{d}={}", f(*v))).collect::<Vec<_>>();
    let per_job = each(&|v| format!("{v:.1}"));
    let vs = each(&|v| format!("{:.2}", raw / v));
    println!("designs_us_per_job: {}; raw_vs: {}", per_job.join(" "), vs[..DESIGNS.len() - 1].join(" "));
}

/// The postmaster of the cluster `db` is on (None when it runs elsewhere).
async fn local_postmaster(db: &PgPool) -> Option<u32> {
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(db).await.expect("backend pid");
    molecule_bench_cpu::postmaster_of(backend as u32)
}

/// (c): N worker processes drain one queue; jobs/s, and the CPU PostgreSQL and the
/// workers used over the drain (in cores: CPU seconds per second). The clock runs from
/// before the processes start (their start is part of scaling out) to the last outcome
/// written (its `done_at`, on PostgreSQL's clock as the start is): a worker process
/// stops a moment after it runs out of jobs, and that moment is not the drain's.
async fn scale_out(db: &PgPool, o: &Opts, url: &str) {
    let exe = std::env::current_exe().expect("this binary");
    let postmaster = local_postmaster(db).await.expect("--processes counts PostgreSQL's CPU: the cluster must run on this machine");
    let mut results = Vec::new();
    for round in 0..o.rounds {
        let queue = format!("bench_scale_{}_{round}", o.processes);
        fill(&mut *db.acquire().await.expect("connection"), &queue, o.jobs).await;
        sqlx::query("ANALYZE apalis.jobs").execute(db).await.ok();
        let (pg0, kids0) = (cluster_cpu_s(postmaster), children_cpu_s());
        let t0 = Instant::now();
        let start: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()").fetch_one(db).await.expect("clock");
        let children: Vec<_> = (0..o.processes)
            .map(|_| {
                std::process::Command::new(&exe)
                    .args(["--worker-child", url, &queue, &o.concurrency.to_string(), &o.batch.to_string()])
                    .spawn()
                    .expect("spawn a worker process")
            })
            .collect();
        for mut c in children {
            let st = tokio::task::spawn_blocking(move || c.wait()).await.unwrap().expect("worker process");
            assert!(st.success(), "a worker process failed: {st}");
        }
        let ran = t0.elapsed().as_secs_f64();
        let (pg_s, kids_s) = (cluster_cpu_s(postmaster) - pg0, children_cpu_s() - kids0);
        assert_all_succeeded(db, &queue, o.jobs).await;
        let last: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT max(done_at) FROM apalis.jobs WHERE job_type = $1")
            .bind(&queue)
            .fetch_one(db)
            .await
            .expect("last outcome");
        let secs = (last - start).as_seconds_f64();
        let rate = o.jobs as f64 / secs;
        // Over the drain's time: what the processes used after the last outcome (their
        // idle moment, their shutdown) is little.
        let (pg, kids) = (pg_s / secs, kids_s / secs);
        println!(
            "round {round}: {} processes: {rate:.0} jobs/s ({secs:.2} s; the processes ran {ran:.2} s), PostgreSQL {pg:.2} cores, workers {kids:.2} cores",
            o.processes
        );
        results.push((rate, pg, kids));
    }
    results.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (rate, pg, kids) = results[results.len() / 2];
    println!("processes={} drain_jobs_s={rate:.0} postgres_cores={pg:.2} worker_cores={kids:.2}", o.processes);
}

/// A worker process of `--processes`: one pool on `queue` until it has had nothing to do
/// for 100 ms and none of the queue's jobs waits to be claimed, then a clean shutdown (the
/// last acks written). Its own progress (outcomes written) is what it watches: a query
/// counting the queue every few milliseconds was most of PostgreSQL's work per job.
async fn worker_child(url: &str, queue: &str, concurrency: usize, batch: usize) {
    let db = molecule_domain::db::connect(url, 4).await.expect("connect");
    let handler = handler_fn(|_ctx| async { Ok(serde_json::Value::Null) });
    let rt = Runtime::start(db.clone(), runtime_cfg(batch), vec![PoolSpec::new(queue, concurrency, RETRY, handler)]);
    let mut seen = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = rt.acks_applied();
        if std::mem::replace(&mut seen, now) != now {
            continue;
        }
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM apalis.jobs WHERE job_type = $1 AND lock_at IS NULL AND status IN ('Pending', 'Failed'))",
        )
        .bind(queue)
        .fetch_one(&db)
        .await
        .expect("jobs waiting");
        if !waiting {
            break;
        }
    }
    rt.shutdown().await;
}
