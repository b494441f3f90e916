//! What each job kind does: pool → handler (here) → backend (`molecule-backends`).
//!
//! - [`provision`] (J1), [`stop`] (J2), [`restart`] (J3): workspace lifecycle.
//! - [`exec`] (J5): one-shot commands.
//! - [`a2a`] (J6): A2A message delivery to agents.
//! - [`rescue`] (J4): forensic bundles of boot failures.
//! - [`console`] (A8): an instance's serial console into the console cache.
//! - [`instances`]: the records the EC2 backend reads (instance ids, pinned host keys).
//! - [`sweeps`]: maintenance fired by the scheduler (S1 provision timeout, S7 retention).
//! - [`handlers`]: the handler of every kind and the pool specs for a worker process.

pub mod a2a;
pub mod console;
pub mod exclusive;
pub mod exec;
pub mod handlers;
pub mod instances;
pub mod provision;
pub mod rescue;
pub mod restart;
pub mod stop;
pub mod sweeps;

use molecule_backends::Backend;
use sqlx::PgPool;
use std::sync::Arc;

/// What the handlers need, shared by every pool of a process.
#[derive(Clone)]
pub struct Deps {
    pub db: PgPool,
    pub backend: Arc<dyn Backend>,
    /// The URL workspaces use to reach the API (PLATFORM_URL).
    pub platform_url: String,
    /// MOLECULE_IMAGE_REGISTRY (prefix, no trailing slash).
    pub registry: String,
    /// WORKSPACE_IMAGE_LOCAL_OVERRIDE=1: ignore digest pins.
    pub image_local_override: bool,
    /// The secret redactor (X4). None → rescue capture stores and ships nothing.
    pub redactor: Option<std::sync::Arc<molecule_domain::redact::Redactor>>,
    /// LOKI_URL: where rescue sections are pushed (unset: not shipped).
    pub loki_url: Option<String>,
    /// Calls agents (J6) under the X5 rules of this process.
    pub agents: a2a::AgentClient,
}

impl Deps {
    /// Handlers' dependencies with nothing optional: no registry prefix, no redactor (so no
    /// rescue capture), no Loki, agents on loopback allowed. For tools and tests that drive
    /// one handler or sweep directly.
    pub fn minimal(db: PgPool, backend: Arc<dyn Backend>) -> Result<Deps, String> {
        Ok(Deps {
            db,
            backend,
            platform_url: String::new(),
            registry: String::new(),
            image_local_override: false,
            redactor: None,
            loki_url: None,
            agents: a2a::AgentClient::new(true)?,
        })
    }
}
