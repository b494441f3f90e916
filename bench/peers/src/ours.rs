//! Our core (`molecule-jobs`), driven exactly as `bench/queue` drives it: `enqueue_many`
//! in 5,000-job statements, one pool of 1,000 with claim batches of 1,000, timing until
//! `shutdown()` has flushed the last acks and every job reads `Done`.

use crate::probe::{self, Drain, DrainCounter};
use molecule_jobs::{enqueue, enqueue_many, handler_fn, NewJob, PoolSpec, RetryPolicy, Runtime, RuntimeConfig};
use sqlx::PgPool;
use std::time::{Duration, Instant};

pub const VERSION: &str = "molecule-jobs (path ../../jobs)";

pub struct Ours {
    db: PgPool,
    concurrency: usize,
    batch: usize,
}

const RETRY: RetryPolicy = RetryPolicy { base: Duration::from_secs(1), cap: Duration::from_secs(10), max_attempts: 3 };

/// Enqueue statements of this many jobs (what bench/queue uses).
const CHUNK: usize = 5000;

fn runtime_cfg(batch: usize) -> RuntimeConfig {
    RuntimeConfig {
        lease: Duration::from_secs(30),
        heartbeat: Duration::from_secs(5),
        poll_interval: Duration::from_secs(1),
        grace: Duration::from_secs(10),
        batch,
        node: "bench-peers".into(),
        ..Default::default()
    }
}

impl Ours {
    pub async fn setup(url: &str, pool: u32, concurrency: usize, batch: usize) -> Self {
        let db = molecule_domain::db::connect(url, pool).await.expect("ours: connect");
        molecule_domain::db::migrate(&db).await.expect("ours: migrate");
        Self { db, concurrency, batch }
    }

    pub fn settings(&self) -> String {
        format!(
            "one PoolSpec, concurrency {}, RuntimeConfig.batch {}, poll 1 s + LISTEN/NOTIFY, lease 30 s; enqueue_many x{CHUNK}",
            self.concurrency, self.batch
        )
    }

    async fn fill(&self, queue: &str, n: usize) -> f64 {
        let mut conn = self.db.acquire().await.expect("ours: connection");
        let payload = serde_json::json!({});
        let t0 = Instant::now();
        let mut left = n;
        while left > 0 {
            let k = left.min(CHUNK);
            let jobs: Vec<NewJob> = (0..k).map(|_| NewJob::to_queue(queue, &payload)).collect();
            enqueue_many(&mut conn, &jobs).await.expect("ours: enqueue_many");
            left -= k;
        }
        probe::rate(n, t0)
    }

    pub async fn drain(&self, n: usize, round: usize) -> Drain {
        let queue = format!("peers_drain_{round}");
        let enqueue_jobs_s = self.fill(&queue, n).await;
        sqlx::query("ANALYZE apalis.jobs").execute(&self.db).await.ok();
        let counter = DrainCounter::new(n);
        let c = counter.clone();
        let handler = handler_fn(move |_ctx| {
            let c = c.clone();
            async move {
                c.ran();
                Ok(serde_json::Value::Null)
            }
        });
        let t0 = Instant::now();
        let cpu = probe::cpu_sample();
        let rt = Runtime::start(
            self.db.clone(),
            runtime_cfg(self.batch),
            vec![PoolSpec::new(queue.clone(), self.concurrency, RETRY, handler)],
        );
        counter.wait_all("ours", Duration::from_secs(120)).await;
        rt.shutdown().await; // flushes the last acks
        // Sampled before the check: its query is the harness's, not the system's work.
        let cpu = cpu.used(n);
        let took = probe::settle("ours", t0, async || self.verify(&queue, n).await).await;
        counter.print_phases("ours", t0, took);
        Drain { enqueue_jobs_s, drain_jobs_s: n as f64 / took.as_secs_f64(), cpu }
    }

    async fn verify(&self, queue: &str, n: usize) -> Result<(), String> {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE job_type = $1 AND status = 'Done'")
            .bind(queue)
            .fetch_one(&self.db)
            .await
            .map_err(|e| e.to_string())?;
        if done as usize == n { Ok(()) } else { Err(format!("{done}/{n} Done")) }
    }

    /// Pickup with a pool of 4 (as bench/queue), same runtime settings as the drain.
    pub async fn pickup(&self, samples: usize, round: usize) -> Vec<f64> {
        let queue = format!("peers_pickup_{round}");
        let (tx, mut rx) = probe::started_channel();
        let handler = handler_fn(move |_ctx| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Instant::now());
                Ok(serde_json::Value::Null)
            }
        });
        let rt = Runtime::start(self.db.clone(), runtime_cfg(self.batch), vec![PoolSpec::new(queue.clone(), 4, RETRY, handler)]);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut conn = self.db.acquire().await.expect("ours: connection");
        let payload = serde_json::json!({});
        let lat = probe::time_pickups("ours", samples, &mut rx, async || {
            enqueue(&mut conn, &NewJob::to_queue(&queue, &payload)).await.expect("ours: enqueue");
        })
        .await;
        drop(conn);
        rt.shutdown().await;
        lat
    }

    pub async fn close(self) {
        self.db.close().await;
    }
}
