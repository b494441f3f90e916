//! Restart requests (A4, and J6's dead-agent recovery): one waiting restart per workspace.

use molecule_domain::{JobId, OrgId, WorkspaceId, events};
use sqlx::PgConnection;

use crate::enqueue::{NewJob, enqueue};
use crate::kinds::JobKind;
use crate::store::stats::waiting_job_of;

/// A restart's job, and whether it was already waiting (coalesced) rather than added now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requested {
    pub job_id: JobId,
    pub coalesced: bool,
}

/// Queues a restart of `ws` unless one is already waiting, and records `RESTART_REQUESTED`
/// with `reason` when one is added. The caller holds the workspace's row lock (`FOR
/// UPDATE`) in this transaction, so concurrent requests take turns and the second sees
/// the first's job.
pub async fn request(conn: &mut PgConnection, org: OrgId, ws: WorkspaceId, reason: &str) -> Result<Requested, sqlx::Error> {
    if let Some(job_id) = waiting_job_of(&mut *conn, ws, JobKind::Restart).await? {
        return Ok(Requested { job_id, coalesced: true });
    }
    let job = NewJob::new(JobKind::Restart, &serde_json::json!({ "workspace_id": ws })).org(org).workspace(ws);
    let job_id = enqueue(&mut *conn, &job).await?;
    events::record(conn, org, ws.0, "RESTART_REQUESTED", serde_json::json!({ "job_id": job_id.to_string(), "reason": reason })).await?;
    Ok(Requested { job_id, coalesced: false })
}
