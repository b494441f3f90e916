//! Workspace backends (SPEC §6): where a workspace actually runs. The job handlers
//! (`molecule-workers`) drive them; the API never links this crate.
//!
//! - [`docker`]: containers on a Docker engine (bollard).
//! - [`ec2`]: EC2 instances (aws-sdk-ec2), reached over EC2 Instance Connect and SSH.
//! - [`NoBackend`]: fails every call with [`BackendError::NoBackend`] — never panics,
//!   never pretends.
//! - [`image`]: image resolution and tag classification (J1).

pub mod docker;
pub mod ec2;
pub mod image;
pub mod isolation;
pub mod shell;

use molecule_domain::tokens::MintedSecrets;
use molecule_domain::{OrgId, WorkspaceId};

/// Upstream bodies are read into errors up to this many bytes, never more.
pub const MAX_UPSTREAM_BODY: usize = 64 * 1024;

/// Most bytes [`Backend::read_file`] returns of a file.
pub const MAX_FILE_READ: usize = 4 * MAX_UPSTREAM_BODY;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("no backend configured")]
    NoBackend,
    #[error("container engine unavailable: {0}")]
    EngineUnavailable(String),
    #[error("image {0} is not available")]
    ImageNotFound(String),
    #[error("container engine error (status {status}): {message}")]
    Engine { status: u16, message: String },
    /// The backend has no such thing (a console on Docker).
    #[error("not supported by the {0} backend")]
    Unsupported(&'static str),
}

impl BackendError {
    /// Worth another attempt later (engine hiccups), as opposed to a definite answer.
    pub fn is_retryable(&self) -> bool {
        match self {
            BackendError::NoBackend | BackendError::Unsupported(_) => false,
            BackendError::ImageNotFound(_) => true, // a registry may come back
            BackendError::EngineUnavailable(_) => true,
            BackendError::Engine { status, .. } => *status >= 500,
        }
    }

    /// An engine's or AWS's answer: redacted (X4: an upstream body can quote what it was
    /// sent — an environment value, user-data — and this text reaches the server log and
    /// the operators' job detail), then capped (§6).
    pub(crate) fn engine(status: u16, message: &str) -> Self {
        let mut m = molecule_domain::redact::shared().redact(message).into_owned();
        if m.len() > MAX_UPSTREAM_BODY {
            let mut end = MAX_UPSTREAM_BODY;
            while !m.is_char_boundary(end) {
                end -= 1;
            }
            m.truncate(end);
        }
        BackendError::Engine { status, message: m }
    }
}

/// Where the platform will reach a workspace's agent, decided by the backend before the
/// instance starts (host networking: a free loopback port). The provision job records the
/// URL as the workspace's `assigned_url`; an agent registering exactly it is trusted (A12).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentEndpoint {
    pub url: String,
    pub port: u16,
}

/// Everything a backend needs to start a workspace. It can only be built with secrets
/// from [`molecule_domain::tokens::mint_workspace_secrets`], so no provision path can
/// skip minting them (seed 003).
pub struct StartSpec {
    pub workspace_id: WorkspaceId,
    pub org_id: OrgId,
    pub parent_id: Option<WorkspaceId>,
    pub runtime: String,
    /// Resolved image reference (J1).
    pub image: String,
    pub platform_url: String,
    /// The agent's endpoint when the backend assigns one ([`Backend::assign_agent_endpoint`]).
    pub agent: Option<AgentEndpoint>,
    /// 1–4: sets the instance's resource limits ([`isolation::TierLimits`]).
    pub tier: i16,
    secrets: MintedSecrets,
}

impl StartSpec {
    pub fn new(
        workspace_id: WorkspaceId,
        org_id: OrgId,
        parent_id: Option<WorkspaceId>,
        runtime: String,
        image: String,
        platform_url: String,
        secrets: MintedSecrets,
    ) -> Self {
        StartSpec { workspace_id, org_id, parent_id, runtime, image, platform_url, agent: None, tier: 2, secrets }
    }

    pub fn with_tier(mut self, tier: i16) -> Self {
        self.tier = tier;
        self
    }

    pub fn with_agent(mut self, agent: Option<AgentEndpoint>) -> Self {
        self.agent = agent;
        self
    }

    pub fn secrets(&self) -> &MintedSecrets {
        &self.secrets
    }

    /// Environment of the workspace: platform URL, ids, runtime; PARENT_ID only when set;
    /// AGENT_PORT and AGENT_URL when the backend assigned the agent's endpoint.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("PLATFORM_URL".to_string(), self.platform_url.clone()),
            ("WORKSPACE_ID".to_string(), self.workspace_id.to_string()),
            ("RUNTIME".to_string(), self.runtime.clone()),
        ];
        if let Some(p) = self.parent_id {
            env.push(("PARENT_ID".to_string(), p.to_string()));
        }
        if let Some(a) = &self.agent {
            env.push(("AGENT_PORT".to_string(), a.port.to_string()));
            env.push(("AGENT_URL".to_string(), a.url.clone()));
        }
        env
    }
}

#[derive(Debug, Clone)]
pub struct Started {
    pub container_name: String,
    pub image_digest: Option<String>,
    /// The backend's own id of the instance (EC2's `i-…`), stored on the workspace row:
    /// stop, exec and the console find the instance by it, never by the workspace id.
    pub instance_id: Option<String>,
    /// Where the agent will listen, when only the launch tells (EC2's private address):
    /// recorded as the workspace's `assigned_url`, like [`AgentEndpoint`].
    pub agent_url: Option<String>,
}

/// A workspace instance the backend manages (carries the managed label).
#[derive(Debug, Clone)]
pub struct ManagedInstance {
    pub name: String,
    pub workspace_id: Option<String>,
    pub running: bool,
    /// When the engine created it, when it says.
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A one-shot command: argv only (no shell is added), a timeout, a cap per stream.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    pub timeout: std::time::Duration,
    pub max_bytes_per_stream: usize,
    /// When this turns true (the worker's shutdown grace ran out) the command is killed
    /// and the outcome says `interrupted`.
    pub stop: Option<tokio::sync::watch::Receiver<bool>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// How a command ended. Output beyond the cap is dropped and flagged.
#[derive(Debug, Default)]
pub struct ExecOutcome {
    /// None when it timed out (killed) or the engine did not report one.
    pub exit_code: Option<i64>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub timed_out: bool,
    /// Killed because [`ExecRequest::stop`] fired.
    pub interrupted: bool,
}

/// Called with each chunk of output as it arrives (after the cap is applied).
pub type ChunkSink<'a> = &'a (dyn Fn(OutputStream, &[u8]) + Send + Sync);

impl ExecOutcome {
    /// Keeps a chunk of a stream up to the cap (flagging what it drops) and hands what it
    /// keeps to the sink.
    pub(crate) fn take(&mut self, stream: OutputStream, bytes: &[u8], cap: usize, sink: ChunkSink<'_>) {
        let (buf, truncated) = match stream {
            OutputStream::Stdout => (&mut self.stdout, &mut self.stdout_truncated),
            OutputStream::Stderr => (&mut self.stderr, &mut self.stderr_truncated),
        };
        let take = bytes.len().min(cap.saturating_sub(buf.len()));
        if take < bytes.len() {
            *truncated = true;
        }
        if take > 0 {
            buf.extend_from_slice(&bytes[..take]);
            sink(stream, &bytes[..take]);
        }
    }
}

/// Resolves when `stop` turns true; never without one.
pub(crate) async fn stopped(stop: Option<tokio::sync::watch::Receiver<bool>>) {
    match stop {
        Some(mut rx) => {
            if rx.wait_for(|v| *v).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// The endpoint the workspace's agent will listen on, when this backend decides it
    /// (None: the agent reports its own URL, which the X5 check then judges).
    fn assign_agent_endpoint(&self, _ws: WorkspaceId) -> Result<Option<AgentEndpoint>, BackendError> {
        Ok(None)
    }
    /// Whether instances are known by an id the backend assigns at launch (EC2's `i-…`),
    /// recorded on the row: then two launches for one workspace are possible (nothing
    /// like a container name forbids them), and an instance other than the recorded one is
    /// a stray. False: one name per workspace (Docker). Starts take turns on every backend
    /// (workers/src/provision.rs: the restart lock).
    fn assigns_instance_ids(&self) -> bool {
        false
    }
    /// Starts (or replaces) the workspace's instance, with its secrets written into its
    /// config volume before it starts.
    async fn start(&self, spec: &StartSpec) -> Result<Started, BackendError>;
    /// Stops and removes the instance. Already gone is success.
    async fn stop(&self, ws: WorkspaceId) -> Result<(), BackendError>;
    /// Removes the config volume (call only after a successful stop).
    async fn remove_volume(&self, ws: WorkspaceId) -> Result<(), BackendError>;
    /// `(true, Some(err))` when the answer is unknown: alive, degraded signal — never a
    /// reason to restart. `(false, None)` only when definitely not running.
    async fn is_running(&self, ws: WorkspaceId) -> (bool, Option<BackendError>);
    async fn list_managed(&self) -> Result<Vec<ManagedInstance>, BackendError>;
    /// Stops what the orphan sweeper listed for `ws` (its row may be gone, and with it the
    /// instance id a plain [`Backend::stop`] goes by). By default: `stop(ws)`.
    async fn reap(&self, ws: WorkspaceId, _listed: &[ManagedInstance]) -> Result<(), BackendError> {
        self.stop(ws).await
    }
    /// Whether a listed instance (or volume) carries the name this backend gives `ws`'s:
    /// the orphan sweeper acts only on those (it stops and removes by workspace, not by name).
    fn is_named_for(&self, _m: &ManagedInstance, _ws: WorkspaceId, _volume: bool) -> bool {
        true
    }
    /// Config volumes the backend manages (carrying the managed label); `running` is false.
    /// Backends without volumes list none.
    async fn list_managed_volumes(&self) -> Result<Vec<ManagedInstance>, BackendError> {
        Ok(vec![])
    }
    /// Runs argv in the workspace; on timeout the process is killed.
    async fn exec(&self, ws: WorkspaceId, req: &ExecRequest, sink: ChunkSink<'_>) -> Result<ExecOutcome, BackendError>;
    /// A file of the workspace (its first [`MAX_FILE_READ`] bytes); None when it does not exist.
    async fn read_file(&self, ws: WorkspaceId, path: &str) -> Result<Option<Vec<u8>>, BackendError>;
    /// The instance's serial console output as the provider returns it (decoded, not yet
    /// bounded or redacted). Backends without a console answer `Unsupported`.
    async fn console_output(&self, _ws: WorkspaceId) -> Result<Vec<u8>, BackendError> {
        Err(BackendError::Unsupported(self.name()))
    }
    /// The fixed rescue section set (J4), raw (the caller redacts): each section's text,
    /// or a note saying why it could not be read. Works on a stopped instance.
    async fn rescue_sections(&self, ws: WorkspaceId) -> Result<Vec<(String, String)>, BackendError>;
}

/// The sections of a rescue bundle, in order (J4).
pub const RESCUE_SECTIONS: [&str; 6] =
    ["config.yaml", "system-prompt.md", "cloud-init-output.log", "docker-ps", "agent-logs", "runtime-env"];

/// The backend of a process with none configured.
pub struct NoBackend;

#[async_trait::async_trait]
impl Backend for NoBackend {
    fn name(&self) -> &'static str {
        "none"
    }
    async fn start(&self, _: &StartSpec) -> Result<Started, BackendError> {
        Err(BackendError::NoBackend)
    }
    async fn stop(&self, _: WorkspaceId) -> Result<(), BackendError> {
        Err(BackendError::NoBackend)
    }
    async fn remove_volume(&self, _: WorkspaceId) -> Result<(), BackendError> {
        Err(BackendError::NoBackend)
    }
    async fn is_running(&self, _: WorkspaceId) -> (bool, Option<BackendError>) {
        (true, Some(BackendError::NoBackend))
    }
    async fn list_managed(&self) -> Result<Vec<ManagedInstance>, BackendError> {
        Err(BackendError::NoBackend)
    }
    async fn list_managed_volumes(&self) -> Result<Vec<ManagedInstance>, BackendError> {
        Err(BackendError::NoBackend)
    }
    async fn exec(&self, _: WorkspaceId, _: &ExecRequest, _: ChunkSink<'_>) -> Result<ExecOutcome, BackendError> {
        Err(BackendError::NoBackend)
    }
    async fn read_file(&self, _: WorkspaceId, _: &str) -> Result<Option<Vec<u8>>, BackendError> {
        Err(BackendError::NoBackend)
    }
    async fn console_output(&self, _: WorkspaceId) -> Result<Vec<u8>, BackendError> {
        Err(BackendError::NoBackend)
    }
    async fn rescue_sections(&self, _: WorkspaceId) -> Result<Vec<(String, String)>, BackendError> {
        Err(BackendError::NoBackend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// §6 and X4: an upstream answer that quotes a secret (here the engine echoing an
    /// environment value) leaves the error redacted, and a huge one capped.
    #[test]
    fn an_upstream_answer_is_redacted_and_capped() {
        let token = "mol_ws_0123456789abcdef0123456789abcdef";
        let e = BackendError::engine(400, &format!("invalid environment variable: MOLECULE_WORKSPACE_TOKEN={token}"));
        let shown = e.to_string();
        assert!(!shown.contains(token) && !shown.contains("0123456789abcdef") && shown.contains("[REDACTED]"), "{shown}");
        assert!(shown.contains("invalid environment variable"), "the engine's words stay: {shown}");
        let BackendError::Engine { message, .. } = BackendError::engine(500, &"x".repeat(3 * MAX_UPSTREAM_BODY)) else { unreachable!() };
        assert_eq!(message.len(), MAX_UPSTREAM_BODY);
    }
}
