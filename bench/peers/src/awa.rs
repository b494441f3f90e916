//! awa (crates.io `awa`, the facade over `awa-model` + `awa-worker`): a Postgres job
//! queue on sqlx 0.8, whose 0.6 default engine is "queue storage" (append-only ready /
//! done segments, lease and receipt rings, LISTEN/NOTIFY wake-ups).
//!
//! Configured as awa's own throughput benchmarks configure it (tests/benchmark_test.rs
//! `test_throughput_rust_workers_queue_storage` in the crate, and the author's
//! postgresql-job-queue-benchmarking `awa-bench` adapter): queue-storage engine with
//! receipts (the 0.6 default), `poll_interval` 50 ms, `deadline_duration` ZERO (the
//! receipt "short path" for zero-deadline jobs; docs/configuration.md: "Set to
//! Duration::ZERO to skip the deadline rescue path"), `max_workers` the same 1,000 as our
//! pool, and `claim_batch_size` at its default 512 (configuration.md: "a larger claim
//! batch usually helps before extra claimers"; 1,000 and 2,000 measured no better here,
//! nor did max_workers 100 or the default 5-minute deadline). Bulk enqueue is
//! `QueueStorage::enqueue_params_copy`, which `insert_many_copy`'s docs name as the
//! path "for high-volume queue-storage producers".

use crate::probe::{self, Drain, DrainCounter, StartedTx};
use awa::model::insert::params_with;
use awa::{Client, InsertOpts, InsertParams, JobArgs, JobContext, JobError, JobResult, QueueConfig, QueueStorage, QueueStorageConfig};
use serde::{Deserialize, Serialize};
use sqlx08::postgres::PgPoolOptions;
use sqlx08::PgPool;
use std::time::{Duration, Instant};

pub const VERSION: &str = "awa 0.6.9";

/// The no-op job; awa routes by `kind`.
#[derive(Serialize, Deserialize)]
struct Noop {}

impl JobArgs for Noop {
    fn kind() -> &'static str {
        "peers_noop"
    }
}

/// Enqueue statements of this many jobs (the same chunk as ours).
const CHUNK: usize = 5000;

#[derive(Clone, Copy)]
pub struct AwaOpts {
    pub max_workers: u32,
    pub claim_batch: usize,
    pub poll: Duration,
    pub deadline: Duration,
}

pub struct Awa {
    pool: PgPool,
    store: QueueStorage,
    o: AwaOpts,
}

impl Awa {
    pub async fn setup(url: &str, pool: u32, o: AwaOpts) -> Self {
        let pool = PgPoolOptions::new().max_connections(pool).connect(url).await.expect("awa: connect");
        awa::migrations::run(&pool).await.expect("awa: migrations");
        let awa = Self { pool, store: QueueStorage::new(QueueStorageConfig::default()).expect("awa: storage config"), o };
        // A fresh database is still in the 'canonical' transition state; the first runtime
        // start installs the queue-storage schema and finalizes it as the active engine
        // (Client::resolve_effective_storage, "fresh-install auto-finalize"). Done here, so
        // no drain pays for it and enqueues go to the engine the workers read.
        let warm = awa.client("peers_warmup", 1, None, None);
        warm.start().await.expect("awa: first start");
        warm.shutdown(Duration::from_secs(5)).await;
        awa
    }

    pub fn settings(&self) -> String {
        let o = &self.o;
        format!(
            "queue storage (default), max_workers {}, claim_batch_size {}, poll_interval {} ms, deadline_duration {} ms; QueueStorage::enqueue_params_copy x{CHUNK}",
            o.max_workers,
            o.claim_batch,
            o.poll.as_millis(),
            o.deadline.as_millis()
        )
    }

    /// A runtime on one queue whose handler either counts (drain) or reports its start.
    fn client(&self, queue: &str, max_workers: u32, counter: Option<DrainCounter>, started: Option<StartedTx>) -> Client {
        let cfg = QueueConfig {
            max_workers,
            poll_interval: self.o.poll,
            deadline_duration: self.o.deadline,
            claim_batch_size: self.o.claim_batch,
            ..QueueConfig::default()
        };
        Client::builder(self.pool.clone())
            .queue(queue, cfg)
            .register::<Noop, _, _>(move |_args: Noop, _ctx: &JobContext| {
                if let Some(tx) = &started {
                    let _ = tx.send(Instant::now());
                }
                if let Some(c) = &counter {
                    c.ran();
                }
                async { Ok::<_, JobError>(JobResult::Completed) }
            })
            .build()
            .expect("awa: build client")
    }

    fn params(queue: &str) -> InsertParams {
        params_with(&Noop {}, InsertOpts { queue: queue.into(), ..Default::default() }).expect("awa: params")
    }

    async fn fill(&self, queue: &str, n: usize) -> f64 {
        let t0 = Instant::now();
        let mut left = n;
        while left > 0 {
            let k = left.min(CHUNK);
            let jobs: Vec<InsertParams> = (0..k).map(|_| Self::params(queue)).collect();
            self.store.enqueue_params_copy(&self.pool, &jobs).await.expect("awa: enqueue_params_copy");
            left -= k;
        }
        probe::rate(n, t0)
    }

    pub async fn drain(&self, n: usize, round: usize) -> Drain {
        let queue = format!("peers_drain_{round}");
        let enqueue_jobs_s = self.fill(&queue, n).await;
        let counter = DrainCounter::new(n);
        let client = self.client(&queue, self.o.max_workers, Some(counter.clone()), None);
        let t0 = Instant::now();
        let cpu = probe::cpu_sample();
        client.start().await.expect("awa: start");
        counter.wait_all("awa", Duration::from_secs(120)).await;
        // Shutdown waits for in-flight jobs, which release only after their completion
        // was acknowledged by the completion batcher (client.rs).
        client.shutdown(Duration::from_secs(30)).await;
        // Sampled before the check: its query is the harness's, not the system's work.
        let cpu = cpu.used(n);
        let took = probe::settle("awa", t0, async || self.verify(&queue, n).await).await;
        counter.print_phases("awa", t0, took);
        Drain { enqueue_jobs_s, drain_jobs_s: n as f64 / took.as_secs_f64(), cpu }
    }

    /// Every job terminal, none left ready or running (`queue_counts`, awa's rollup-safe
    /// count: segments rotate and may be pruned), and none of them failed, cancelled,
    /// dead-lettered or waiting for a retry (the tables those states live in; the
    /// `awa.jobs` compatibility view answers the same question in minutes, not ms).
    async fn verify(&self, queue: &str, n: usize) -> Result<(), String> {
        let c = self.store.queue_counts(&self.pool, queue).await.map_err(|e| e.to_string())?;
        if c.terminal as usize != n || c.available != 0 || c.running != 0 {
            return Err(format!("terminal {}/{n}, available {}, running {}", c.terminal, c.available, c.running));
        }
        let bad: i64 = sqlx08::query_scalar(
            "SELECT (SELECT count(*) FROM awa.done_entries WHERE queue = $1 AND state::text <> 'completed') \
                  + (SELECT count(*) FROM awa.dlq_entries WHERE queue = $1) \
                  + (SELECT count(*) FROM awa.deferred_jobs WHERE queue = $1)",
        )
        .bind(queue)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| e.to_string())?;
        if bad == 0 { Ok(()) } else { Err(format!("{bad} jobs failed, cancelled or retrying")) }
    }

    /// Pickup with 4 workers, the drain's settings otherwise; single jobs through
    /// `enqueue_params_batch` (what awa's own pickup benchmark uses).
    pub async fn pickup(&self, samples: usize, round: usize) -> Vec<f64> {
        let queue = format!("peers_pickup_{round}");
        let (tx, mut rx) = probe::started_channel();
        let client = self.client(&queue, 4, None, Some(tx));
        client.start().await.expect("awa: start");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let lat = probe::time_pickups("awa", samples, &mut rx, async || {
            self.store.enqueue_params_batch(&self.pool, &[Self::params(&queue)]).await.expect("awa: enqueue");
        })
        .await;
        client.shutdown(Duration::from_secs(5)).await;
        lat
    }

    pub async fn close(self) {
        self.pool.close().await;
    }
}
