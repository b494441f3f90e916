//! S2 orphans: what the backend runs or keeps for workspaces that are gone.
//!
//! - a managed instance or volume whose workspace row is `removed` (its stop job failed,
//!   or never ran) → the instance is stopped, then its volume removed — the volume only
//!   after a successful stop;
//! - a managed instance or volume whose workspace id has no row at all (the database was
//!   wiped and recreated) → reaped the same way (seed 002);
//! - only what carries the managed label is ever listed: an unlabelled `ws-…` container is
//!   never touched; neither is anything of a `failed` workspace (its instance and volume
//!   are kept for rescue) or of any other status;
//! - a workspace id from a label is used only when it is a UUID: anything else (SQL
//!   wildcards included) never reaches a query.

use molecule_backends::BackendError;
use molecule_domain::WorkspaceId;
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::{JobContext, JobError};
use std::collections::{BTreeSet, HashMap};

use crate::Deps;

#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// Workspaces whose instance was stopped and volume removed.
    pub reaped: Vec<String>,
    /// Stopped, but the volume could not be removed (the next sweep tries again).
    pub volume_kept: Vec<String>,
    /// The stop failed: the volume is kept for the next sweep.
    pub stop_failed: Vec<String>,
    /// Labels that are not workspace ids (never queried).
    pub ignored_labels: usize,
}

/// A label's workspace id, when it is one: a UUID in its canonical hyphenated form.
pub fn workspace_id(label: &str) -> Option<WorkspaceId> {
    let id: uuid::Uuid = label.parse().ok()?;
    (id.hyphenated().to_string() == label.to_ascii_lowercase()).then_some(WorkspaceId(id))
}

pub async fn sweep(d: &Deps) -> Result<Report, JobError> {
    let listed = match d.backend.list_managed().await {
        Ok(c) => c,
        Err(BackendError::NoBackend) => return Ok(Report::default()),
        Err(e) => return Err(JobError::Retryable(format!("listing managed instances: {e}"))),
    };
    let volumes = d.backend.list_managed_volumes().await.map_err(|e| JobError::Retryable(format!("listing managed volumes: {e}")))?;
    let mut report = Report::default();
    let mut ids = BTreeSet::new();
    for label in listed.iter().chain(&volumes).map(|m| m.workspace_id.as_deref().unwrap_or("")) {
        match workspace_id(label) {
            Some(ws) => {
                ids.insert(ws.0);
            }
            None => report.ignored_labels += 1,
        }
    }
    if ids.is_empty() {
        return Ok(report);
    }
    let ids: Vec<uuid::Uuid> = ids.into_iter().collect();
    let rows: HashMap<uuid::Uuid, String> = sqlx::query_as::<_, (uuid::Uuid, String)>("SELECT id, status::text FROM workspaces WHERE id = ANY($1)")
        .bind(&ids)
        .fetch_all(&d.db)
        .await
        .map_err(super::db)?
        .into_iter()
        .collect();
    for id in ids {
        let why = match rows.get(&id).map(String::as_str) {
            None => "no_row",
            Some("removed") => "removed",
            Some(_) => continue,
        };
        let ws = WorkspaceId(id);
        match d.backend.stop(ws).await {
            Err(e) => {
                tracing::warn!(event = "sweep.orphans", workspace_id = %ws, reason = why, error = %e, "stop failed; volume kept");
                report.stop_failed.push(ws.to_string());
            }
            Ok(()) => match d.backend.remove_volume(ws).await {
                Ok(()) => {
                    tracing::info!(event = "sweep.orphans", workspace_id = %ws, reason = why, "reaped");
                    report.reaped.push(ws.to_string());
                }
                Err(e) => {
                    tracing::warn!(event = "sweep.orphans", workspace_id = %ws, reason = why, error = %e, "stopped; volume removal failed");
                    report.volume_kept.push(ws.to_string());
                }
            },
        }
    }
    Ok(report)
}

pub async fn run(d: &Deps, _ctx: &JobContext) -> HandlerResult {
    let report = sweep(d).await?;
    Ok(serde_json::to_value(report).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seed 002: label values become query parameters only when they are workspace ids —
    /// never a prefix with SQL wildcards, never something merely shaped like one.
    #[test]
    fn only_workspace_ids_are_taken_from_labels() {
        let id = "0b9e4c6e-8f1a-4f5e-9c2d-3a4b5c6d7e8f";
        assert_eq!(workspace_id(id).map(|w| w.to_string()), Some(id.to_string()));
        assert!(workspace_id(&id.to_uppercase()).is_some());
        for bad in ["", "ws-0b9e4c6e8f1a", "0b9e4c6e%", "0b9e4c6e_8f1a", "' OR 1=1 --", "0b9e4c6e8f1a4f5e9c2d3a4b5c6d7e8f",
                    "{0b9e4c6e-8f1a-4f5e-9c2d-3a4b5c6d7e8f}", "urn:uuid:0b9e4c6e-8f1a-4f5e-9c2d-3a4b5c6d7e8f"] {
            assert!(workspace_id(bad).is_none(), "{bad:?}");
        }
    }
}
