//! S2 orphans: what the backend runs or keeps for workspaces that are gone.
//!
//! - a managed instance or volume whose workspace row is `removed` (its stop job failed,
//!   or never ran) → the instance is stopped, then its volume removed — the volume only
//!   after a successful stop;
//! - a `failed` workspace's instances and volume are never touched, however long ago it
//!   failed (SPEC S2, J4: kept for rescue; seed 000 pins the reaper to `removed`);
//! - a managed instance whose workspace id has no row at all (the database was wiped and
//!   recreated, seed 002) → stopped at once; its volume is removed only once it is older
//!   than the grace (a database restored from an older backup has not lost its workspaces'
//!   configuration on the first sweep);
//! - an instance of a workspace that stays, other than the one its row records (EC2:
//!   a launch whose record another overwrote), once [`STRAY_AGE`] old → reaped alone;
//! - only what carries the managed label, under the name the platform gives it, is acted
//!   on: an unlabelled `ws-…` container is never touched; a workspace id from a label is
//!   used only when it is a UUID — anything else (SQL wildcards included) never reaches a
//!   query;
//! - at most [`BATCH`] workspaces per sweep (stops take seconds each); the next sweep goes on.

use chrono::{DateTime, Utc};
use molecule_backends::{BackendError, ManagedInstance};
use molecule_domain::WorkspaceId;
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::sweeper::SweepArgs;
use molecule_jobs::{JobContext, JobError};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::Deps;

/// SPEC J4's rescue grace (24 h): how long a volume with no row at all is kept. (A
/// `failed` row's are kept for good: S2 never reaps them.)
pub const RESCUE_VOLUME_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Most workspaces reaped per sweep.
pub const BATCH: usize = 50;

/// A live workspace's instance that is not the one its row records is a stray once it is
/// this old (younger, its launch may still be about to record it).
pub const STRAY_AGE: Duration = Duration::from_secs(600);

#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// Workspaces whose instance was stopped and volume removed.
    pub reaped: Vec<String>,
    /// Stopped; the volume is kept (younger than the grace, or its removal failed).
    pub volume_kept: Vec<String>,
    /// The stop failed: the volume is kept for the next sweep.
    pub stop_failed: Vec<String>,
    /// Instances of a live workspace other than the one its row records (a launch whose
    /// record was overwritten), older than [`STRAY_AGE`]: reaped.
    pub strays: Vec<String>,
    /// Listed things that are not the platform's (a label that is not a workspace id, or a
    /// name that is not the one the platform gives): never acted on.
    pub ignored: usize,
}

/// A label's workspace id, when it is one: a UUID in its canonical hyphenated form.
pub fn workspace_id(label: &str) -> Option<WorkspaceId> {
    let id: uuid::Uuid = label.parse().ok()?;
    (id.hyphenated().to_string() == label.to_ascii_lowercase()).then_some(WorkspaceId(id))
}

/// What the backend holds for one workspace.
#[derive(Default)]
struct Held {
    /// The workspace's listed instances (the backend reaps by them: the row may be gone).
    instances: Vec<ManagedInstance>,
    volume_created: Option<Option<DateTime<Utc>>>,
}

pub async fn sweep(d: &Deps, grace: Duration) -> Result<Report, JobError> {
    let listed = match d.backend.list_managed().await {
        Ok(c) => c,
        Err(BackendError::NoBackend) => return Ok(Report::default()),
        Err(e) => return Err(JobError::retryable("sweep", format!("listing managed instances: {e}"))),
    };
    let volumes =
        d.backend.list_managed_volumes().await.map_err(|e| JobError::retryable("sweep", format!("listing managed volumes: {e}")))?;
    let mut report = Report::default();
    let mut held: BTreeMap<uuid::Uuid, Held> = BTreeMap::new();
    let mut take = |m: &ManagedInstance, volume: bool, report: &mut Report| {
        let ws = match m.workspace_id.as_deref().and_then(workspace_id) {
            Some(ws) if d.backend.is_named_for(m, ws, volume) => ws,
            _ => {
                report.ignored += 1;
                return;
            }
        };
        let h = held.entry(ws.0).or_default();
        if volume {
            h.volume_created = Some(m.created_at);
        } else {
            h.instances.push(m.clone());
        }
    };
    for m in &listed {
        take(m, false, &mut report);
    }
    for m in &volumes {
        take(m, true, &mut report);
    }
    if held.is_empty() {
        return Ok(report);
    }
    let ids: Vec<uuid::Uuid> = held.keys().copied().collect();
    // Per row: its status and the instance it records (EC2's id; none on Docker).
    let rows: HashMap<uuid::Uuid, (String, Option<String>)> = sqlx::query_as::<_, (uuid::Uuid, String, Option<String>)>(
        "SELECT id, status::text, instance_id FROM workspaces WHERE id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&d.db)
    .await
    .map_err(super::db)?
    .into_iter()
    .map(|(id, status, instance)| (id, (status, instance)))
    .collect();
    let stray_before = Utc::now() - chrono::Duration::from_std(STRAY_AGE).unwrap_or_default();
    let grace_ago = Utc::now() - chrono::Duration::from_std(grace).unwrap_or_default();
    let mut acted = 0;
    for (id, h) in held {
        if acted >= BATCH {
            break;
        }
        let (why, remove_volume) = match rows.get(&id) {
            None => {
                // Unknown creation time: treated as old (the engine always reports it).
                let old_volume = h.volume_created.is_some_and(|c| c.is_none_or(|c| c < grace_ago));
                ("no_row", old_volume)
            }
            Some((status, _)) if status == "removed" => ("removed", true),
            // Kept for rescue (J4), strays included: no reaper touches a failed row.
            Some((status, _)) if status == "failed" => continue,
            Some((_, Some(recorded))) if d.backend.assigns_instance_ids() => {
                // A workspace that stays: only instances other than the one its row
                // records, launched long enough ago that the record had time to land.
                let strays: Vec<ManagedInstance> =
                    h.instances.iter().filter(|m| m.name != *recorded && m.created_at.is_some_and(|c| c < stray_before)).cloned().collect();
                if strays.is_empty() {
                    continue;
                }
                acted += 1;
                let ws = WorkspaceId(id);
                match d.backend.reap(ws, &strays).await {
                    Ok(()) => {
                        tracing::info!(event = "sweep.orphans", workspace_id = %ws, reason = "stray_instance", count = strays.len(), "reaped");
                        report.strays.extend(strays.into_iter().map(|m| m.name));
                    }
                    Err(e) => {
                        tracing::warn!(event = "sweep.orphans", workspace_id = %ws, reason = "stray_instance", error = %e, "reap failed");
                        report.stop_failed.push(ws.to_string());
                    }
                }
                continue;
            }
            Some(_) => continue,
        };
        if h.instances.is_empty() && (!remove_volume || h.volume_created.is_none()) {
            continue; // nothing to do for it now
        }
        acted += 1;
        let ws = WorkspaceId(id);
        match d.backend.reap(ws, &h.instances).await {
            Err(e) => {
                tracing::warn!(event = "sweep.orphans", workspace_id = %ws, reason = why, error = %e, "stop failed; volume kept");
                report.stop_failed.push(ws.to_string());
            }
            Ok(()) if !remove_volume || h.volume_created.is_none() => {
                tracing::info!(event = "sweep.orphans", workspace_id = %ws, reason = why, "instance reaped; volume kept");
                report.volume_kept.push(ws.to_string());
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

pub async fn run(d: &Deps, _ctx: &JobContext, args: &SweepArgs) -> HandlerResult {
    let grace = args.volume_grace_s.map(Duration::from_secs).unwrap_or(RESCUE_VOLUME_GRACE);
    let report = sweep(d, grace).await?;
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
        for bad in [
            "",
            "ws-0b9e4c6e8f1a",
            "0b9e4c6e%",
            "0b9e4c6e_8f1a",
            "' OR 1=1 --",
            "0b9e4c6e8f1a4f5e9c2d3a4b5c6d7e8f",
            "{0b9e4c6e-8f1a-4f5e-9c2d-3a4b5c6d7e8f}",
            "urn:uuid:0b9e4c6e-8f1a-4f5e-9c2d-3a4b5c6d7e8f",
        ] {
            assert!(workspace_id(bad).is_none(), "{bad:?}");
        }
    }

    /// Lists what it is given; records what it is asked to reap (or fails every reap) and
    /// which volumes it removes.
    #[derive(Default)]
    struct Listed {
        instances: Vec<ManagedInstance>,
        volumes: Vec<ManagedInstance>,
        reap_fails: bool,
        reaped: std::sync::Mutex<Vec<String>>,
        volumes_removed: std::sync::Mutex<Vec<WorkspaceId>>,
    }

    #[async_trait::async_trait]
    impl molecule_backends::Backend for Listed {
        fn name(&self) -> &'static str {
            "listed"
        }
        fn assigns_instance_ids(&self) -> bool {
            true
        }
        async fn start(&self, _: &molecule_backends::StartSpec) -> Result<molecule_backends::Started, BackendError> {
            unreachable!("not used")
        }
        async fn stop(&self, _: WorkspaceId) -> Result<(), BackendError> {
            unreachable!("the sweep reaps by the listed instances")
        }
        async fn remove_volume(&self, ws: WorkspaceId) -> Result<(), BackendError> {
            self.volumes_removed.lock().unwrap().push(ws);
            Ok(())
        }
        async fn is_running(&self, _: WorkspaceId) -> (bool, Option<BackendError>) {
            (true, None)
        }
        async fn list_managed(&self) -> Result<Vec<ManagedInstance>, BackendError> {
            Ok(self.instances.clone())
        }
        async fn list_managed_volumes(&self) -> Result<Vec<ManagedInstance>, BackendError> {
            Ok(self.volumes.clone())
        }
        async fn reap(&self, _: WorkspaceId, listed: &[ManagedInstance]) -> Result<(), BackendError> {
            if self.reap_fails {
                return Err(BackendError::EngineUnavailable("the engine did not answer".into()));
            }
            self.reaped.lock().unwrap().extend(listed.iter().map(|m| m.name.clone()));
            Ok(())
        }
        async fn exec(
            &self,
            _: WorkspaceId,
            _: &molecule_backends::ExecRequest,
            _: molecule_backends::ChunkSink<'_>,
        ) -> Result<molecule_backends::ExecOutcome, BackendError> {
            unreachable!("not used")
        }
        async fn read_file(&self, _: WorkspaceId, _: &str) -> Result<Option<Vec<u8>>, BackendError> {
            unreachable!("not used")
        }
        async fn rescue_sections(&self, _: WorkspaceId) -> Result<Vec<(String, String)>, BackendError> {
            unreachable!("not used")
        }
    }

    /// A live workspace's instances other than the recorded one are reaped once they are
    /// older than STRAY_AGE, alone; the recorded one, young strays, workspaces with no
    /// recorded instance (Docker) and everything of a failed one (J4) are left.
    #[tokio::test]
    async fn strays_beside_the_recorded_instance_are_reaped() {
        let (db, _) = molecule_domain::testing::fresh_db().await;
        let org: uuid::Uuid =
            sqlx::query_scalar("INSERT INTO organizations (name) VALUES ('o') RETURNING id").fetch_one(&db).await.unwrap();
        let (online, docker, failed) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        for (id, status, instance) in
            [(online, "online", Some("i-recorded")), (docker, "online", None), (failed, "failed", Some("i-failed"))]
        {
            sqlx::query(
                "INSERT INTO workspaces (id, org_id, name, runtime, tier, status, instance_id) \
                 VALUES ($1, $2, 'w', 'echo', 2, $4::workspace_status, $3)",
            )
            .bind(id)
            .bind(org)
            .bind(instance)
            .bind(status)
            .execute(&db)
            .await
            .unwrap();
        }
        let at = |name: &str, ws: uuid::Uuid, age_s: i64| ManagedInstance {
            name: name.into(),
            workspace_id: Some(ws.to_string()),
            running: true,
            created_at: Some(Utc::now() - chrono::Duration::seconds(age_s)),
        };
        let old = STRAY_AGE.as_secs() as i64 + 60;
        let backend = std::sync::Arc::new(Listed {
            instances: vec![
                at("i-recorded", online, old),
                at("i-stray-old", online, old),
                at("i-stray-young", online, 30),
                at("ws-docker", docker, old),
                at("i-failed", failed, old),
                at("i-failed-stray", failed, old),
            ],
            ..Listed::default()
        });
        let deps = Deps::minimal(db, backend.clone()).unwrap();
        let report = sweep(&deps, RESCUE_VOLUME_GRACE).await.unwrap();
        assert_eq!(report.strays, vec!["i-stray-old".to_string()], "{report:?}");
        assert_eq!(*backend.reaped.lock().unwrap(), vec!["i-stray-old".to_string()]);
        assert!(report.reaped.is_empty() && report.stop_failed.is_empty());
    }

    /// S2(a): a removed workspace's instance is stopped, and its volume removed only if
    /// the stop succeeded: a failed stop keeps the volume for the next sweep.
    #[tokio::test]
    async fn a_removed_workspaces_volume_goes_only_after_its_stop_succeeded() {
        let (db, _) = molecule_domain::testing::fresh_db().await;
        let ws: uuid::Uuid = sqlx::query_scalar(
            "WITH o AS (INSERT INTO organizations (name) VALUES ('o') RETURNING id) \
             INSERT INTO workspaces (org_id, name, runtime, tier, status) SELECT id, 'w', 'echo', 2, 'removed' FROM o RETURNING id",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        let listed = |name: &str| ManagedInstance {
            name: name.into(),
            workspace_id: Some(ws.to_string()),
            running: true,
            created_at: Some(Utc::now() - chrono::Duration::hours(1)),
        };
        for reap_fails in [true, false] {
            let backend = std::sync::Arc::new(Listed {
                instances: vec![listed("ws-container")],
                volumes: vec![listed("ws-volume")],
                reap_fails,
                ..Listed::default()
            });
            let deps = Deps::minimal(db.clone(), backend.clone()).unwrap();
            let report = sweep(&deps, RESCUE_VOLUME_GRACE).await.unwrap();
            let removed = backend.volumes_removed.lock().unwrap().clone();
            if reap_fails {
                assert_eq!((report.stop_failed.clone(), removed), (vec![ws.to_string()], vec![]), "{report:?}");
                assert!(report.reaped.is_empty(), "{report:?}");
            } else {
                assert_eq!((report.reaped.clone(), removed), (vec![ws.to_string()], vec![WorkspaceId(ws)]), "{report:?}");
                assert_eq!(*backend.reaped.lock().unwrap(), vec!["ws-container".to_string()]);
            }
        }
    }
}
