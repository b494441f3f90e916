//! What each product job kind does. The workspace backends (Docker, EC2) arrive in later
//! issues; until one is wired, every backend-dependent kind fails its job with
//! [`JobError::NoBackend`], visible in the job's `last_error` — never a fake success.

use serde::Deserialize;
use std::collections::HashMap;
use std::time::Duration;

use crate::handler::{typed_handler, Handler, JobError};
use crate::kinds::JobKind;
use crate::maintenance;
use crate::runtime::PoolSpec;

/// Payload of the jobs that act on one workspace.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceArgs {
    pub workspace_id: uuid::Uuid,
    #[serde(default)]
    pub reason: Option<String>,
}

/// Payload of a sweep job: which sweeper, and its tick (for the idempotency key).
#[derive(Debug, Deserialize)]
pub struct SweepArgs {
    pub sweeper: String,
    #[serde(default)]
    pub retention_s: Option<u64>,
}

pub const DEFAULT_JOB_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

fn no_backend() -> Handler {
    typed_handler(|_ctx, _args: WorkspaceArgs| async { Err(JobError::NoBackend) })
}

fn sweep() -> Handler {
    typed_handler(|ctx, args: SweepArgs| async move {
        match args.sweeper.as_str() {
            "retention" => {
                let retention = args.retention_s.map(Duration::from_secs).unwrap_or(DEFAULT_JOB_RETENTION);
                let pruned = maintenance::prune_finished(&ctx.db, retention, 1000)
                    .await
                    .map_err(|e| JobError::Retryable(format!("prune failed: {e}")))?;
                tracing::info!(event = "sweep.retention", pruned, job_id = %ctx.id, "pruned finished jobs");
                Ok(serde_json::json!({ "pruned_jobs": pruned }))
            }
            other => Err(JobError::Permanent(format!("unknown sweeper {other:?}"))),
        }
    })
}

/// The handler of a product kind.
pub fn handler_for(kind: JobKind) -> Handler {
    match kind {
        JobKind::Sweep => sweep(),
        JobKind::Provision
        | JobKind::Stop
        | JobKind::Restart
        | JobKind::RescueCapture
        | JobKind::Exec
        | JobKind::A2aDispatch => no_backend(),
    }
}

/// Pool specs for the given kinds (all kinds when `concurrency` is empty), each with its
/// configured or default concurrency.
pub fn pool_specs(concurrency: &HashMap<JobKind, usize>) -> Vec<PoolSpec> {
    let kinds: Vec<JobKind> = if concurrency.is_empty() {
        JobKind::ALL.to_vec()
    } else {
        JobKind::ALL.into_iter().filter(|k| concurrency.contains_key(k)).collect()
    };
    kinds
        .into_iter()
        .map(|k| PoolSpec {
            queue: k.queue().to_string(),
            concurrency: concurrency.get(&k).copied().unwrap_or_else(|| k.default_concurrency()),
            retry: k.retry_policy(),
            handler: handler_for(k),
        })
        .collect()
}
