//! Sweeps: maintenance run as `sweep` jobs fired by the scheduler, one module per sweeper.
//! The job's payload names the sweeper and carries its settings.
//!
//! - [`retention`] (S7): prune finished jobs.
//! - [`provision_timeout`] (S1): a workspace whose agent never registered → `failed`.
//! - [`a2a_ttl`] (S6): queued A2A messages past their TTL → `expired`.

pub mod a2a_ttl;
pub mod provision_timeout;
pub mod retention;

use molecule_jobs::{typed_handler, Handler, JobError};
use serde::Deserialize;

/// Payload of a sweep job: which sweeper, and its settings.
#[derive(Debug, Deserialize)]
pub struct SweepArgs {
    pub sweeper: String,
    /// retention: finished jobs older than this are pruned.
    #[serde(default)]
    pub retention_s: Option<u64>,
    /// provision_timeout: how long a workspace may stay `provisioning`.
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

pub fn handler() -> Handler {
    typed_handler(|ctx, args: SweepArgs| async move {
        match args.sweeper.as_str() {
            retention::NAME => retention::run(&ctx, &args).await,
            provision_timeout::NAME => provision_timeout::run(&ctx, &args).await,
            a2a_ttl::NAME => a2a_ttl::run(&ctx).await,
            other => Err(JobError::Permanent(format!("unknown sweeper {other:?}"))),
        }
    })
}
