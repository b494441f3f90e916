//! A worker process for the process-level tests: our job runtime with one pool on the
//! `test` queue whose handler does what the payload says. Every attempt is recorded in
//! `test_runs` (job id, attempt, pid, time) before it does anything else.
//!
//! Payload: `{"fail_times": n, "sleep_ms": m, "sleep_first_ms": k}` — fail the first n
//! attempts, sleep m ms in every attempt, and k ms more in the first one.
//! Env: DATABASE_URL, TW_CONCURRENCY, TW_LEASE_MS, TW_GRACE_MS, TW_BASE_MS, TW_CAP_MS,
//! TW_MAX_ATTEMPTS, TW_POLL_MS. SIGTERM → graceful shutdown, exit 0.

use molecule_jobs::{JobError, PoolSpec, RetryPolicy, Runtime, RuntimeConfig, handler_fn};
use serde::Deserialize;
use std::time::Duration;

#[derive(Deserialize, Default)]
struct Plan {
    #[serde(default)]
    fail_times: i32,
    #[serde(default)]
    sleep_ms: u64,
    #[serde(default)]
    sleep_first_ms: u64,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt().with_env_filter("info,sqlx=warn").with_writer(std::io::stderr).init();
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let db = loop {
        match molecule_domain::db::connect(&url, 10).await {
            Ok(p) => break p,
            Err(e) => {
                eprintln!("connect: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    let pid = std::process::id() as i32;
    let handler = handler_fn(move |ctx| async move {
        let plan: Plan = ctx.decode()?;
        sqlx::query("INSERT INTO test_runs (job_id, attempt, pid) VALUES ($1, $2, $3)")
            .bind(ctx.id.as_str())
            .bind(ctx.attempt)
            .bind(pid)
            .execute(&ctx.db)
            .await
            .map_err(|e| JobError::retryable("database", format!("record run: {e}")))?;
        let mut sleep = plan.sleep_ms;
        if ctx.attempt == 1 {
            sleep += plan.sleep_first_ms;
        }
        if sleep > 0 {
            tokio::time::sleep(Duration::from_millis(sleep)).await;
        }
        if ctx.attempt <= plan.fail_times {
            return Err(JobError::retryable("test", format!("planned failure {}", ctx.attempt)));
        }
        Ok(serde_json::json!({ "pid": pid, "attempt": ctx.attempt }))
    });
    let cfg = RuntimeConfig {
        lease: Duration::from_millis(env_u64("TW_LEASE_MS", 30_000)),
        heartbeat: Duration::from_millis(env_u64("TW_LEASE_MS", 30_000) / 6),
        poll_interval: Duration::from_millis(env_u64("TW_POLL_MS", 1000)),
        grace: Duration::from_millis(env_u64("TW_GRACE_MS", 10_000)),
        batch: 100,
        ..Default::default()
    };
    let retry = RetryPolicy {
        base: Duration::from_millis(env_u64("TW_BASE_MS", 500)),
        cap: Duration::from_millis(env_u64("TW_CAP_MS", 60_000)),
        max_attempts: env_u64("TW_MAX_ATTEMPTS", 10) as i32,
    };
    let spec = PoolSpec::new("test", env_u64("TW_CONCURRENCY", 8) as usize, retry, handler);
    let rt = Runtime::start(db, cfg, vec![spec]);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    term.recv().await;
    let report = rt.shutdown().await;
    eprintln!("testworker stopped, released {}", report.released);
}
