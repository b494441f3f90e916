//! Queue benchmark: our job core against a raw-SQL baseline on the same PostgreSQL, in
//! one run.
//!
//! (a) drain: N no-op jobs bulk-enqueued, then drained by one pool of our runtime, and
//!     by the raw baseline (C clients, each: claim a batch with FOR UPDATE SKIP LOCKED,
//!     complete the batch). Rounds alternate; the median of each side is reported.
//! (b) pickup: single jobs enqueued one at a time into an idle pool; latency from the
//!     enqueue's commit to the handler's start.
//!
//! The last line is exactly:
//! `drain_jobs_s=<n> raw_jobs_s=<n> drain_ratio=<x> pickup_p50_ms=<x> pickup_p95_ms=<x> pickup_p99_ms=<x>`
//!
//! Flags: --jobs N (20000) --rounds R (3) --samples S (300) --concurrency C (1000)
//! --batch B (1000) --raw-clients K (4) --raw-batch M (50) --pools P (1). DATABASE_URL unset → a private
//! embedded cluster in a temporary directory.

use molecule_domain::embedded_pg::EmbeddedPostgres;
use molecule_jobs::{enqueue, enqueue_many, handler_fn, NewJob, PoolSpec, RetryPolicy, Runtime, RuntimeConfig};
use sqlx::PgPool;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

struct Opts {
    jobs: usize,
    rounds: usize,
    samples: usize,
    concurrency: usize,
    batch: usize,
    raw_clients: usize,
    raw_batch: i64,
    pools: usize,
}

fn opts() -> Result<Opts, String> {
    let mut o = Opts { jobs: 20_000, rounds: 3, samples: 300, concurrency: 1000, batch: 1000, raw_clients: 4, raw_batch: 50, pools: 1 };
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

/// Bulk-enqueues `n` jobs in 5 000-job statements; returns jobs/s.
async fn fill(db: &PgPool, queue: &str, n: usize) -> f64 {
    let mut conn = db.acquire().await.expect("connection");
    let payload = serde_json::json!({});
    let t0 = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
        let jobs: Vec<NewJob> = chunk.iter().map(|_| NewJob::to_queue(queue, &payload)).collect();
        enqueue_many(&mut conn, &jobs).await.expect("enqueue");
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

/// Drains `n` queued no-op jobs through our runtime; jobs/s until every outcome is written.
async fn drain_ours(db: &PgPool, o: &Opts, round: usize) -> (f64, f64) {
    let queue = format!("bench_drain_{round}");
    let enqueue_rate = fill(db, &queue, o.jobs).await;
    sqlx::query("ANALYZE apalis.jobs").execute(db).await.ok();
    let done = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(Notify::new());
    let (d, a, n) = (done.clone(), all_done.clone(), o.jobs);
    let handler = handler_fn(move |_ctx| {
        let (d, a) = (d.clone(), a.clone());
        async move {
            if d.fetch_add(1, Ordering::Relaxed) + 1 == n {
                a.notify_one();
            }
            Ok(serde_json::Value::Null)
        }
    });
    let t0 = Instant::now();
    let specs = (0..o.pools)
        .map(|_| PoolSpec::new(queue.clone(), o.concurrency, RETRY, handler.clone()))
        .collect();
    let rt = Runtime::start(db.clone(), runtime_cfg(o.batch), specs);
    all_done.notified().await;
    rt.shutdown().await; // flushes the last acks
    let secs = t0.elapsed().as_secs_f64();
    let succeeded: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE job_type = $1 AND status = 'Done'")
        .bind(&queue)
        .fetch_one(db)
        .await
        .expect("count");
    assert_eq!(succeeded as usize, o.jobs, "every job must end succeeded");
    (o.jobs as f64 / secs, enqueue_rate)
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
WHERE id IN (SELECT id FROM bench_raw WHERE queue = $1 AND status = 'available' AND run_at <= now()
             ORDER BY run_at, id LIMIT $2 FOR UPDATE SKIP LOCKED)
RETURNING id, payload
"#;

/// The physical baseline: K clients, each claiming a batch with SKIP LOCKED and completing it.
async fn drain_raw(db: &PgPool, o: &Opts, round: usize) -> f64 {
    let queue = format!("raw_{round}");
    sqlx::query("INSERT INTO bench_raw (queue, payload) SELECT $1, '\\x7b7d' FROM generate_series(1, $2)")
        .bind(&queue)
        .bind(o.jobs as i64)
        .execute(db)
        .await
        .expect("fill raw");
    sqlx::query("ANALYZE bench_raw").execute(db).await.ok();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..o.raw_clients {
        let (db, queue, batch) = (db.clone(), queue.clone(), o.raw_batch);
        tasks.push(tokio::spawn(async move {
            loop {
                let rows: Vec<(i64, Option<Vec<u8>>)> =
                    sqlx::query_as(RAW_CLAIM).bind(&queue).bind(batch).fetch_all(&db).await.expect("claim");
                if rows.is_empty() {
                    break;
                }
                let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
                sqlx::query("UPDATE bench_raw SET status = 'done' WHERE id = ANY($1)")
                    .bind(&ids)
                    .execute(&db)
                    .await
                    .expect("complete");
            }
        }));
    }
    for t in tasks {
        t.await.expect("raw client");
    }
    let secs = t0.elapsed().as_secs_f64();
    let done: i64 = sqlx::query_scalar("SELECT count(*) FROM bench_raw WHERE queue = $1 AND status = 'done'")
        .bind(&queue)
        .fetch_one(db)
        .await
        .expect("count");
    assert_eq!(done as usize, o.jobs);
    o.jobs as f64 / secs
}

/// Enqueue-commit → handler-start latency of single jobs into an idle pool, in ms, sorted.
async fn pickup(db: &PgPool, o: &Opts) -> Vec<f64> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
    let handler = handler_fn(move |_ctx| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(Instant::now());
            Ok(serde_json::Value::Null)
        }
    });
    let rt = Runtime::start(
        db.clone(),
        runtime_cfg(o.batch),
        vec![PoolSpec::new("bench_pickup", 4, RETRY, handler)],
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut conn = db.acquire().await.expect("connection");
    let mut lat = Vec::with_capacity(o.samples);
    for _ in 0..o.samples {
        enqueue(&mut conn, &NewJob::to_queue("bench_pickup", &serde_json::json!({}))).await.expect("enqueue");
        let committed = Instant::now();
        let started = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("pickup within 10 s").expect("handler");
        lat.push(started.saturating_duration_since(committed).as_secs_f64() * 1000.0);
        // Let the pool go idle again before the next sample.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(conn);
    rt.shutdown().await;
    lat.sort_by(|a, b| a.total_cmp(b));
    lat
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
    let o = match opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench-queue: {e}");
            std::process::exit(2);
        }
    };
    let (_embedded, admin) = match std::env::var("DATABASE_URL") {
        Ok(u) => (None, u),
        Err(_) => {
            // Under TMPDIR unless the cluster's user cannot reach it there (a 0700 TMPDIR, as root).
            let preferred = std::env::temp_dir().join(format!("molecule-bench-{}", std::process::id()));
            let dir = molecule_domain::embedded_pg::default_data_dir(&preferred).expect("data directory").path;
            eprintln!("bench-queue: private PostgreSQL in {}", dir.display());
            let pg = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&dir)).await.unwrap().expect("embedded PostgreSQL");
            let url = pg.database_url();
            (Some(pg), url)
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

    let mut ours = Vec::new();
    let mut raw = Vec::new();
    let mut enq = Vec::new();
    for round in 0..o.rounds {
        let r = drain_raw(&db, &o, round).await;
        let (d, e) = drain_ours(&db, &o, round).await;
        println!("round {round}: ours {d:.0} jobs/s, raw {r:.0} jobs/s, bulk enqueue {e:.0} jobs/s ({} jobs)", o.jobs);
        ours.push(d);
        raw.push(r);
        enq.push(e);
    }
    println!("bulk_enqueue_jobs_s={:.0}", median(enq));
    let lat = pickup(&db, &o).await;
    let (d, r) = (median(ours), median(raw));
    println!(
        "pickup over {} samples: min {:.2} ms, max {:.2} ms",
        lat.len(),
        lat[0],
        lat[lat.len() - 1]
    );
    db.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name}"))).execute(&admin_pool).await.ok();
    admin_pool.close().await;
    println!(
        "drain_jobs_s={:.0} raw_jobs_s={:.0} drain_ratio={:.2} pickup_p50_ms={:.2} pickup_p95_ms={:.2} pickup_p99_ms={:.2}",
        d,
        r,
        d / r,
        pct(&lat, 0.50),
        pct(&lat, 0.95),
        pct(&lat, 0.99)
    );
}
