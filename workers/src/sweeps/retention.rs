//! S7 retention: finished jobs older than the retention, and their output, are deleted in batches.

use molecule_jobs::handler::HandlerResult;
use molecule_jobs::{maintenance, JobContext, JobError};
use std::time::Duration;

use super::SweepArgs;

pub const NAME: &str = "retention";

pub const DEFAULT_JOB_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

pub async fn run(ctx: &JobContext, args: &SweepArgs) -> HandlerResult {
    let retention = args.retention_s.map(Duration::from_secs).unwrap_or(DEFAULT_JOB_RETENTION);
    let pruned = maintenance::prune_finished(&ctx.db, retention, 1000)
        .await
        .map_err(|e| JobError::Retryable(format!("prune failed: {e}")))?;
    tracing::info!(event = "sweep.retention", jobs = pruned.jobs, output_chunks = pruned.output_chunks,
        workers = pruned.workers, job_id = %ctx.id, "pruned finished jobs and their output");
    Ok(serde_json::json!({ "pruned_jobs": pruned.jobs, "pruned_output_chunks": pruned.output_chunks }))
}
