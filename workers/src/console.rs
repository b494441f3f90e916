//! The `console` job (A8): fetches the serial console of a workspace's instance through
//! the backend, decoded, redacted and bounded ([`molecule_domain::console::prepare`]),
//! into the console cache the API reads.

use molecule_backends::BackendError;
use molecule_domain::WorkspaceId;
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::{JobContext, JobError};
use serde::Deserialize;
use serde_json::json;

use crate::Deps;
use crate::provision::db_err;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleArgs {
    pub workspace_id: uuid::Uuid,
}

pub async fn run(d: &Deps, ctx: &JobContext, a: ConsoleArgs) -> HandlerResult {
    let ws = WorkspaceId(a.workspace_id);
    let instance: Option<Option<String>> =
        sqlx::query_scalar("SELECT instance_id FROM workspaces WHERE id = $1").bind(ws.0).fetch_optional(&d.db).await.map_err(db_err)?;
    let Some(Some(instance_id)) = instance else {
        return Err(JobError::permanent("no_console", "the workspace has no instance with a console"));
    };
    let raw = d.backend.console_output(ws).await.map_err(|e| match e {
        BackendError::NoBackend => JobError::NoBackend,
        BackendError::Unsupported(_) => JobError::permanent("no_console", e.to_string()),
        other => JobError::retryable("backend", other.to_string()),
    })?;
    let (output, truncated) = molecule_domain::console::prepare(&raw);
    molecule_domain::console::store(&d.db, ws, &instance_id, &output, truncated).await.map_err(db_err)?;
    tracing::info!(event = "console.fetched", workspace_id = %ws, job_id = %ctx.id, bytes = output.len(), truncated);
    Ok(json!({ "bytes": output.len(), "truncated": truncated }))
}
