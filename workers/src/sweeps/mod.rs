//! The sweepers (SPEC §5): maintenance the scheduler fires as `sweep` jobs, one module per
//! sweeper with its test beside it. Each works in bounded batches, re-checks its predicate
//! in the statement that changes a row (a row that changed since it was selected is left
//! alone), changes each row in one transaction with everything that goes with it, and logs
//! `sweep.<name>` with what it changed. Two sweeps of one kind never run at once (a lock
//! per sweeper): a second one finds the lock taken and ends at once.
//!
//! - [`provision_timeout`] (S1): `provisioning` for too long → `failed` + rescue.
//! - [`orphans`] (S2): instances and volumes of removed workspaces, and managed ones with no row, reaped.
//! - [`stale_tokens`] (S3): stale tokens of workspaces with no running container revoked.
//! - [`health`] (S4): dead containers of online workspaces restarted; silent external agents → `awaiting_agent`.
//! - [`hibernation`] (S5): idle workspaces → `hibernating` → stopped → `hibernated`.
//! - [`a2a_ttl`] (S6): queued A2A messages past their TTL → `expired`.
//! - [`retention`] (S7): old rows pruned, table by table.

pub mod a2a_ttl;
pub mod health;
pub mod hibernation;
pub mod orphans;
pub mod provision_timeout;
pub mod retention;
pub mod stale_tokens;

use molecule_jobs::sweeper::{SweepArgs, Sweeper};
use molecule_jobs::{Handler, JobError, typed_handler};

use crate::Deps;

/// Most rows one sweep changes per batch.
pub const BATCH: i64 = 500;

pub fn handler(deps: &Deps) -> Handler {
    let d = deps.clone();
    typed_handler(move |ctx, args: SweepArgs| {
        let d = d.clone();
        async move {
            let key = format!("molecule.sweep.{}", args.sweeper);
            let ran = crate::exclusive::one_at_a_time(&ctx.db, &key, async {
                match args.sweeper {
                    Sweeper::ProvisionTimeout => provision_timeout::run(&ctx, &args).await,
                    Sweeper::Orphans => orphans::run(&d, &ctx, &args).await,
                    Sweeper::StaleTokens => stale_tokens::run(&d, &ctx, &args).await,
                    Sweeper::Health => health::run(&d, &ctx, &args).await,
                    Sweeper::Hibernation => hibernation::run(&ctx, &args).await,
                    Sweeper::A2aTtl => a2a_ttl::run(&ctx).await,
                    Sweeper::Retention => retention::run(&d, &ctx, &args).await,
                }
            })
            .await?;
            ran.unwrap_or_else(|| Ok(serde_json::json!({ "skipped": "another sweep of this kind is running" })))
        }
    })
}

/// The workspaces whose instance the backend runs now; None with no backend. A backend
/// that cannot be listed is an error: a sweep never acts on "nothing runs" it did not see.
pub(crate) async fn running_workspaces(d: &Deps) -> Result<Option<std::collections::HashSet<uuid::Uuid>>, JobError> {
    match d.backend.list_managed().await {
        Ok(listed) => Ok(Some(
            listed
                .iter()
                .filter(|m| m.running)
                .filter_map(|m| m.workspace_id.as_deref().and_then(orphans::workspace_id))
                .map(|w| w.0)
                .collect(),
        )),
        Err(molecule_backends::BackendError::NoBackend) => Ok(None),
        Err(e) => Err(JobError::retryable("sweep", format!("listing managed instances: {e}"))),
    }
}

/// A database error in a sweep: worth the next attempt.
pub(crate) fn db(e: sqlx::Error) -> JobError {
    JobError::retryable("database", e.to_string())
}

/// For tests: an engine that cannot list its instances (down, or answering 500s).
#[cfg(test)]
pub(crate) struct Unlistable;

#[cfg(test)]
#[async_trait::async_trait]
impl molecule_backends::Backend for Unlistable {
    fn name(&self) -> &'static str {
        "unlistable"
    }
    async fn start(&self, _: &molecule_backends::StartSpec) -> Result<molecule_backends::Started, molecule_backends::BackendError> {
        unreachable!("not used")
    }
    async fn stop(&self, _: molecule_domain::WorkspaceId) -> Result<(), molecule_backends::BackendError> {
        unreachable!("not used")
    }
    async fn remove_volume(&self, _: molecule_domain::WorkspaceId) -> Result<(), molecule_backends::BackendError> {
        unreachable!("not used")
    }
    async fn is_running(&self, _: molecule_domain::WorkspaceId) -> (bool, Option<molecule_backends::BackendError>) {
        unreachable!("nothing is asked about before the list")
    }
    async fn list_managed(&self) -> Result<Vec<molecule_backends::ManagedInstance>, molecule_backends::BackendError> {
        Err(molecule_backends::BackendError::EngineUnavailable("connection refused".into()))
    }
    async fn exec(
        &self,
        _: molecule_domain::WorkspaceId,
        _: &molecule_backends::ExecRequest,
        _: molecule_backends::ChunkSink<'_>,
    ) -> Result<molecule_backends::ExecOutcome, molecule_backends::BackendError> {
        unreachable!("not used")
    }
    async fn read_file(&self, _: molecule_domain::WorkspaceId, _: &str) -> Result<Option<Vec<u8>>, molecule_backends::BackendError> {
        unreachable!("not used")
    }
    async fn rescue_sections(&self, _: molecule_domain::WorkspaceId) -> Result<Vec<(String, String)>, molecule_backends::BackendError> {
        unreachable!("not used")
    }
}
