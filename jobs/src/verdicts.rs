//! Boot-failure verdicts: the one entry point shared by `POST
//! /admin/workspaces/:id/bootstrap-failed` (A7) and the provision-timeout sweeper (S1).
//! It flips `provisioning → failed` only, and fires the rescue capture only when the
//! UPDATE actually flipped the row — never on a race, never twice.

use molecule_domain::{JobId, OrgId, WorkspaceId};
use sqlx::PgConnection;

use crate::enqueue::{NewJob, enqueue};
use crate::kinds::JobKind;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    ProvisionTimeout,
    BootstrapFailed,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::ProvisionTimeout => "provision_timeout",
            Trigger::BootstrapFailed => "bootstrap_failed",
        }
    }
}

/// Run inside the caller's transaction. Some((org, rescue job)) when the row flipped.
pub async fn boot_failed(
    conn: &mut PgConnection,
    ws: WorkspaceId,
    trigger: Trigger,
    last_sample_error: &str,
) -> Result<Option<(OrgId, JobId)>, sqlx::Error> {
    flip(conn, ws, trigger, last_sample_error, None).await
}

/// S1's verdict: like [`boot_failed`] with trigger `provision_timeout`, and the age
/// predicate re-checked in the UPDATE itself, so a workspace that went online, or was
/// restarted (provisioning anew), after the sweep selected it is left alone.
pub async fn provision_timed_out(
    conn: &mut PgConnection,
    ws: WorkspaceId,
    timeout: std::time::Duration,
    last_sample_error: &str,
) -> Result<Option<(OrgId, JobId)>, sqlx::Error> {
    flip(conn, ws, Trigger::ProvisionTimeout, last_sample_error, Some(timeout.as_secs_f64())).await
}

/// Queues the rescue capture (J4) of a workspace that just flipped `provisioning →
/// failed` in the caller's transaction: for flips made elsewhere (J1's provision giving
/// up), which record their own event. Call it only when the row actually flipped.
pub async fn queue_rescue(conn: &mut PgConnection, org: OrgId, ws: WorkspaceId, trigger: Trigger) -> Result<JobId, sqlx::Error> {
    let job =
        NewJob::new(JobKind::RescueCapture, &serde_json::json!({ "workspace_id": ws, "trigger": trigger.as_str() })).org(org).workspace(ws);
    enqueue(conn, &job).await
}

async fn flip(
    conn: &mut PgConnection,
    ws: WorkspaceId,
    trigger: Trigger,
    last_sample_error: &str,
    provisioning_for_s: Option<f64>,
) -> Result<Option<(OrgId, JobId)>, sqlx::Error> {
    let flipped: Option<uuid::Uuid> = sqlx::query_scalar(
        "UPDATE workspaces SET status = 'failed', last_sample_error = $2, updated_at = now() \
         WHERE id = $1 AND status = 'provisioning' \
           AND ($3::float8 IS NULL OR status_changed_at <= now() - make_interval(secs => $3)) \
         RETURNING org_id",
    )
    .bind(ws.0)
    .bind(last_sample_error)
    .bind(provisioning_for_s)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(org) = flipped else { return Ok(None) };
    let org = OrgId(org);
    let job_id = queue_rescue(&mut *conn, org, ws, trigger).await?;
    molecule_domain::events::record(
        conn,
        org,
        ws.0,
        "WORKSPACE_PROVISION_FAILED",
        serde_json::json!({ "source": trigger.as_str(), "job_id": job_id.as_str() }),
    )
    .await?;
    Ok(Some((org, job_id)))
}
