//! graphile_worker (crates.io `graphile_worker`, the Rust port of Graphile Worker), on
//! sqlx 0.9 like our core.
//!
//! Configured after its guide's "Throughput-oriented worker" (docs/src/configuration/
//! worker-options.md): a tuned concurrency, `poll_interval` 500 ms,
//! `complete_job_batch_delay` / `fail_job_batch_delay` 5 ms (batched completion
//! updates), and the LocalQueue (guides/local-queue.md: "for high-throughput workloads
//! ... many small jobs"), TTL 60 s. Concurrency is the same 1,000 as our pool; the local
//! queue's size and count are flags (the guide: "There is no universal best setting for
//! throughput; benchmark"), with defaults from a sweep on this machine (README).
//! LISTEN/NOTIFY is on (the default). Bulk enqueue is `WorkerUtils::add_jobs`, one
//! statement per 5,000 jobs.
//!
//! Pickup runs without the LocalQueue: the guide says it trades latency for throughput
//! and that for rare jobs the direct fetch path is the better fit.

use crate::probe::{self, Drain, DrainCounter, StartedTx};
use graphile_worker::{IntoTaskHandlerResult, JobSpec, LocalQueueConfig, TaskHandler, Worker, WorkerContext, WorkerOptions, WorkerUtils};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const VERSION: &str = "graphile_worker 0.14.1";

const SCHEMA: &str = "graphile_worker";
const CHUNK: usize = 5000;

/// What the handler reports to: a drain's counter or a pickup's start channel.
#[derive(Clone, Debug, Default)]
struct Probe {
    counter: Option<DrainCounter>,
    started: Option<StartedTx>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Noop {}

impl TaskHandler for Noop {
    const IDENTIFIER: &'static str = "peers_noop";

    async fn run(self, ctx: WorkerContext) -> impl IntoTaskHandlerResult {
        if let Some(p) = ctx.get_ext::<Probe>() {
            if let Some(tx) = &p.started {
                let _ = tx.send(Instant::now());
            }
            if let Some(c) = &p.counter {
                c.ran();
            }
        }
        Ok::<(), String>(())
    }
}

#[derive(Clone, Copy)]
pub struct GraphileOpts {
    pub concurrency: usize,
    pub local_queue_size: usize,
    pub local_queue_count: usize,
    pub poll: Duration,
    pub batch_delay: Duration,
}

pub struct Graphile {
    pool: PgPool,
    o: GraphileOpts,
}

impl Graphile {
    pub async fn setup(url: &str, pool: u32, o: GraphileOpts) -> Self {
        let pool = PgPoolOptions::new().max_connections(pool).connect(url).await.expect("graphile: connect");
        let g = Self { pool, o };
        // init() migrates the schema; once here so no drain pays for it.
        g.options(1, false, Probe::default()).init().await.expect("graphile: init");
        g
    }

    pub fn settings(&self) -> String {
        let o = &self.o;
        format!(
            "concurrency {}, LocalQueue size {} x{} (TTL 60 s), poll_interval {} ms + LISTEN/NOTIFY, complete/fail batch delay {} ms; add_jobs x{CHUNK}",
            o.concurrency,
            o.local_queue_size,
            o.local_queue_count,
            o.poll.as_millis(),
            o.batch_delay.as_millis()
        )
    }

    fn options(&self, concurrency: usize, local_queue: bool, probe: Probe) -> WorkerOptions {
        let mut opts = WorkerOptions::default()
            .pg_pool(self.pool.clone())
            .schema(SCHEMA)
            .concurrency(concurrency)
            .poll_interval(self.o.poll)
            .complete_job_batch_delay(self.o.batch_delay)
            .fail_job_batch_delay(self.o.batch_delay)
            .listen_os_shutdown_signals(false)
            .add_extension(probe)
            .define_job::<Noop>();
        if local_queue {
            opts = opts.local_queue(
                LocalQueueConfig::default()
                    .with_size(self.o.local_queue_size)
                    .with_queue_count(self.o.local_queue_count)
                    .with_ttl(Duration::from_secs(60)),
            );
        }
        opts
    }

    fn utils(&self) -> WorkerUtils {
        WorkerUtils::new(self.pool.clone(), SCHEMA)
    }

    async fn fill(&self, n: usize) -> f64 {
        let utils = self.utils();
        let spec = JobSpec::default();
        let t0 = Instant::now();
        let mut left = n;
        while left > 0 {
            let k = left.min(CHUNK);
            let jobs: Vec<(Noop, &JobSpec)> = (0..k).map(|_| (Noop {}, &spec)).collect();
            utils.add_jobs(&jobs).await.expect("graphile: add_jobs");
            left -= k;
        }
        probe::rate(n, t0)
    }

    /// Runs `worker` on a task of its own; the handle yields run()'s result.
    fn spawn(worker: &Arc<Worker>) -> tokio::task::JoinHandle<()> {
        let w = worker.clone();
        tokio::spawn(async move { w.run().await.expect("graphile: worker run") })
    }

    pub async fn drain(&self, n: usize, _round: usize) -> Drain {
        let enqueue_jobs_s = self.fill(n).await;
        let counter = DrainCounter::new(n);
        let probe = Probe { counter: Some(counter.clone()), started: None };
        let worker = Arc::new(self.options(self.o.concurrency, true, probe).init().await.expect("graphile: init"));
        let t0 = Instant::now();
        let cpu = probe::cpu_sample();
        let run = Self::spawn(&worker);
        counter.wait_all("graphile", Duration::from_secs(120)).await;
        // run() returns after the completion batcher flushed (Worker::await_batchers).
        worker.request_shutdown();
        run.await.expect("graphile: worker task");
        // Sampled before the check: its query is the harness's, not the system's work.
        let cpu = cpu.used(n);
        let took = probe::settle("graphile", t0, async || self.verify().await).await;
        counter.print_phases("graphile", t0, took);
        Drain { enqueue_jobs_s, drain_jobs_s: n as f64 / took.as_secs_f64(), cpu }
    }

    /// Graphile Worker deletes a job when it succeeds; a failed one stays (to retry or
    /// as permanently failed). This database holds only this drain's jobs, so "none
    /// left" means every job succeeded.
    async fn verify(&self) -> Result<(), String> {
        let left: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {SCHEMA}._private_jobs")))
            .fetch_one(&self.pool)
            .await
            .map_err(|e| e.to_string())?;
        if left == 0 { Ok(()) } else { Err(format!("{left} jobs left")) }
    }

    pub async fn pickup(&self, samples: usize, _round: usize) -> Vec<f64> {
        let (tx, mut rx) = probe::started_channel();
        let probe = Probe { counter: None, started: Some(tx) };
        let worker = Arc::new(self.options(4, false, probe).init().await.expect("graphile: init"));
        let run = Self::spawn(&worker);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let utils = self.utils();
        let lat = probe::time_pickups("graphile", samples, &mut rx, async || {
            utils.add_job(Noop {}, JobSpec::default()).await.expect("graphile: add_job");
        })
        .await;
        worker.request_shutdown();
        run.await.expect("graphile: worker task");
        lat
    }

    pub async fn close(self) {
        self.pool.close().await;
    }
}
