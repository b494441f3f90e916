//! J2 stop (reason delete | restart | hibernate). The config volume is removed only after
//! a successful stop of a deleted workspace (a failed stop leaves it for the orphan
//! sweeper; hibernation and restart keep it).

use molecule_domain::WorkspaceId;
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::{JobContext, JobError};
use serde_json::json;

use crate::Deps;
use crate::provision::db_err;

pub async fn run(d: &Deps, ctx: &JobContext, ws: WorkspaceId, reason: Option<&str>) -> HandlerResult {
    let reason = reason.unwrap_or("delete");
    if !matches!(reason, "delete" | "restart" | "hibernate") {
        return Err(JobError::permanent("invalid_input", format!("unknown stop reason {reason:?}")));
    }
    // A restart's and a hibernation's stop run under the workspace's restart lock: they
    // never interleave with a restart or a launch (a restart's new instance may have the
    // same name as the old one; an EC2 stop lists instances by tag).
    if reason != "delete" {
        let work = async {
            match reason {
                "hibernate" => hibernate(d, ctx, ws).await,
                _ => {
                    d.backend.stop(ws).await.map_err(backend_err)?;
                    tracing::info!(event = "stop.done", workspace_id = %ws, job_id = %ctx.id, reason, volume_removed = false);
                    Ok(json!({ "stopped": true, "volume_removed": false }))
                }
            }
        };
        return match crate::restart::one_at_a_time(&d.db, ws, work).await? {
            Some(r) => r,
            None => Err(crate::restart::wait_turn(d, ctx, "a restart of this workspace is running").await),
        };
    }
    d.backend.stop(ws).await.map_err(backend_err)?;
    d.backend.remove_volume(ws).await.map_err(|e| JobError::retryable("backend", e.to_string()))?;
    // The API wrote `removed` already; this repeats it for a stop enqueued otherwise.
    sqlx::query("UPDATE workspaces SET status = 'removed', updated_at = now() WHERE id = $1 AND status <> 'removed'")
        .bind(ws.0)
        .execute(&d.db)
        .await
        .map_err(db_err)?;
    tracing::info!(event = "stop.done", workspace_id = %ws, job_id = %ctx.id, reason, volume_removed = true);
    Ok(json!({ "stopped": true, "volume_removed": true }))
}

fn backend_err(e: molecule_backends::BackendError) -> JobError {
    match e {
        molecule_backends::BackendError::NoBackend => JobError::NoBackend,
        other => JobError::retryable("backend", other.to_string()),
    }
}

/// Stops a `hibernating` workspace and marks it `hibernated`; anything else (a restart or
/// a delete came first) is left alone.
async fn hibernate(d: &Deps, ctx: &JobContext, ws: WorkspaceId) -> HandlerResult {
    let status: Option<String> =
        sqlx::query_scalar("SELECT status::text FROM workspaces WHERE id = $1").bind(ws.0).fetch_optional(&d.db).await.map_err(db_err)?;
    if status.as_deref() != Some("hibernating") {
        return Ok(json!({ "skipped": format!("no longer hibernating ({})", status.as_deref().unwrap_or("gone")) }));
    }
    d.backend.stop(ws).await.map_err(backend_err)?;
    sqlx::query("UPDATE workspaces SET status = 'hibernated', updated_at = now() WHERE id = $1 AND status = 'hibernating'")
        .bind(ws.0)
        .execute(&d.db)
        .await
        .map_err(db_err)?;
    tracing::info!(event = "stop.done", workspace_id = %ws, job_id = %ctx.id, reason = "hibernate", volume_removed = false);
    Ok(json!({ "stopped": true, "volume_removed": false }))
}

#[cfg(test)]
mod tests {
    //! The ordering rule with a fake backend (the Docker end-to-end tests cover the engine).
    use super::*;
    use molecule_backends::{Backend, BackendError, ChunkSink, ExecOutcome, ExecRequest, ManagedInstance, StartSpec, Started};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct FailingStop {
        volume_removals: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Backend for FailingStop {
        fn name(&self) -> &'static str {
            "fake"
        }
        async fn start(&self, _: &StartSpec) -> Result<Started, BackendError> {
            unreachable!("not used")
        }
        async fn stop(&self, _: WorkspaceId) -> Result<(), BackendError> {
            Err(BackendError::Engine { status: 500, message: "engine said no".into() })
        }
        async fn remove_volume(&self, _: WorkspaceId) -> Result<(), BackendError> {
            self.volume_removals.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn is_running(&self, _: WorkspaceId) -> (bool, Option<BackendError>) {
            (true, None)
        }
        async fn list_managed(&self) -> Result<Vec<ManagedInstance>, BackendError> {
            Ok(vec![])
        }
        async fn exec(&self, _: WorkspaceId, _: &ExecRequest, _: ChunkSink<'_>) -> Result<ExecOutcome, BackendError> {
            unreachable!("not used")
        }
        async fn read_file(&self, _: WorkspaceId, _: &str) -> Result<Option<Vec<u8>>, BackendError> {
            unreachable!("not used")
        }
        async fn rescue_sections(&self, _: WorkspaceId) -> Result<Vec<(String, String)>, BackendError> {
            unreachable!("not used")
        }
    }

    #[tokio::test]
    async fn a_failed_stop_never_removes_the_volume_and_is_retried() {
        let fake = Arc::new(FailingStop::default());
        // Never connected: a failed stop must return before any database write.
        let db = sqlx::postgres::PgPoolOptions::new().connect_lazy("postgres://x@127.0.0.254:9/none").unwrap();
        let deps = Deps {
            db: db.clone(),
            backend: fake.clone(),
            platform_url: String::new(),
            registry: String::new(),
            image_local_override: false,
            redactor: None,
            loki_url: None,
            agents: crate::a2a::AgentClient::new(true).expect("agent client"),
        };
        let ctx = molecule_jobs::JobContext { max_attempts: 10, ..molecule_jobs::JobContext::outside_queue(db, "stop") };
        let err = run(&deps, &ctx, WorkspaceId::new(), Some("delete")).await.unwrap_err();
        assert!(matches!(err, JobError::Retryable(_)), "{err:?}");
        assert_eq!(fake.volume_removals.load(Ordering::SeqCst), 0);
    }
}
