//! The handler of every job kind.

use molecule_domain::WorkspaceId;
use molecule_jobs::{Handler, JobKind, PoolSpec, typed_handler};
use serde::Deserialize;
use std::collections::HashMap;

use crate::Deps;

/// Payload of the jobs that act on one workspace.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceArgs {
    pub workspace_id: uuid::Uuid,
    #[serde(default)]
    pub reason: Option<String>,
}

/// The handler of a product kind.
pub fn handler_for(kind: JobKind, deps: &Deps) -> Handler {
    let d = deps.clone();
    match kind {
        JobKind::Sweep => crate::sweeps::handler(deps),
        JobKind::Provision => typed_handler(move |ctx, a: WorkspaceArgs| {
            let d = d.clone();
            async move { crate::provision::run(&d, &ctx, WorkspaceId(a.workspace_id)).await }
        }),
        JobKind::Stop => typed_handler(move |ctx, a: WorkspaceArgs| {
            let d = d.clone();
            async move { crate::stop::run(&d, &ctx, WorkspaceId(a.workspace_id), a.reason.as_deref()).await }
        }),
        JobKind::Restart => typed_handler(move |ctx, a: WorkspaceArgs| {
            let d = d.clone();
            async move { crate::restart::run(&d, &ctx, WorkspaceId(a.workspace_id)).await }
        }),
        JobKind::RescueCapture => typed_handler(move |ctx, a: crate::rescue::RescueArgs| {
            let d = d.clone();
            async move { crate::rescue::run(&d, &ctx, a).await }
        }),
        JobKind::Exec => typed_handler(move |ctx, a: crate::exec::ExecArgs| {
            let d = d.clone();
            async move { crate::exec::run(&d, &ctx, a).await }
        }),
        JobKind::A2aDispatch => typed_handler(move |ctx, a: crate::a2a::dispatch::DispatchArgs| {
            let d = d.clone();
            async move { crate::a2a::dispatch::run(&d, &ctx, a).await }
        }),
        JobKind::Console => typed_handler(move |ctx, a: crate::console::ConsoleArgs| {
            let d = d.clone();
            async move { crate::console::run(&d, &ctx, a).await }
        }),
    }
}

/// Pool specs for the given kinds (all kinds when `concurrency` is empty), each with its
/// configured or default concurrency.
pub fn pool_specs(deps: &Deps, concurrency: &HashMap<JobKind, usize>) -> Vec<PoolSpec> {
    let kinds: Vec<JobKind> = if concurrency.is_empty() {
        JobKind::ALL.to_vec()
    } else {
        JobKind::ALL.into_iter().filter(|k| concurrency.contains_key(k)).collect()
    };
    kinds
        .into_iter()
        .map(|k| PoolSpec::for_kind(k, concurrency.get(&k).copied().unwrap_or_else(|| k.default_concurrency()), handler_for(k, deps)))
        .collect()
}
