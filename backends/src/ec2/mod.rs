//! The EC2 backend (SPEC §6): one instance per workspace, launched with RunInstances and
//! found again by its real `i-…` id — the one recorded on the workspace row, never the
//! workspace id (seed 002, the orphan-EC2 leak). Commands and file reads go over SSH after
//! EC2 Instance Connect ([`ssh`]); the console through GetConsoleOutput.
//!
//! - start: any live instance already tagged for the workspace (an earlier attempt's) is
//!   terminated first, then one is launched with the managed tags and the user-data of
//!   [`user_data`]; its id and private address come back in [`Started`].
//! - stop: TerminateInstances by the recorded id; no id → nothing to stop; an id EC2 no
//!   longer knows → already gone; any other failure is an error (the stop job retries).
//! - is_running: DescribeInstances; no answer, an error status or an unreadable answer →
//!   `(true, err)` (alive, degraded signal); terminated, stopped or unknown id → false.

pub mod aws;
pub mod ssh;
pub mod user_data;

use aws_sdk_ec2::types::{Filter, HttpTokensState, InstanceMetadataOptionsRequest, InstanceStateName, ResourceType, Tag, TagSpecification};
use base64::Engine as _;
use molecule_domain::WorkspaceId;
use std::sync::Arc;
use std::time::Duration;

use self::aws::{Clients, Fault};
use crate::docker::{MANAGED_LABEL, WORKSPACE_LABEL};
use crate::{Backend, BackendError, ChunkSink, ExecOutcome, ExecRequest, ManagedInstance, StartSpec, Started};

/// Tag of the workspace's organization.
pub const ORG_TAG: &str = "molecule.org.id";

/// What the backend needs from the platform's records: which instance a workspace has,
/// and the host key pinned for an instance. Implemented over the database by the workers.
#[async_trait::async_trait]
pub trait InstanceStore: Send + Sync {
    /// The `i-…` id recorded for the workspace, if any.
    async fn instance_id(&self, ws: WorkspaceId) -> Result<Option<String>, BackendError>;
    /// The SSH host key pinned for the instance, if one is.
    async fn host_key(&self, instance_id: &str) -> Result<Option<String>, BackendError>;
    /// Pins `key` for the instance unless one is pinned already; returns the pinned key.
    async fn pin_host_key(&self, instance_id: &str, key: &str) -> Result<String, BackendError>;
}

/// MOLECULE_EC2_* and the AWS settings (validated at start by the CLI).
#[derive(Clone, Debug)]
pub struct Ec2Config {
    pub region: String,
    /// AWS_ENDPOINT_URL: a local AWS API mock in tests.
    pub endpoint_url: Option<String>,
    pub ami: String,
    pub instance_type: String,
    pub subnet_id: Option<String>,
    pub security_group_ids: Vec<String>,
    /// The OS user EC2 Instance Connect pushes keys for and SSH logs in as.
    pub ssh_user: String,
    /// `host:port` used for every instance instead of its private address (tests).
    pub ssh_address: Option<String>,
    /// Where the instance keeps the agent's config and secrets.
    pub config_dir: String,
    /// Where the agent listens on the instance.
    pub agent_port: u16,
    /// Memory, CPU and process limits of the agent's container, by tier (as on Docker).
    pub limits: crate::isolation::TierLimits,
}

pub struct Ec2Backend {
    aws: Clients,
    cfg: Ec2Config,
    store: Arc<dyn InstanceStore>,
}

/// The instance's Name tag (what the console shows; also the row's `container_name`).
pub fn instance_name(ws: WorkspaceId) -> String {
    crate::docker::container_name(ws)
}

/// States in which an instance still exists and costs money.
const LIVE: [&str; 4] = ["pending", "running", "stopping", "stopped"];

/// Longest a file read may take.
const READ_DEADLINE: Duration = Duration::from_secs(20);
/// A rescue capture's time on the instance: inside the capture's 45 s budget (J4).
const RESCUE_DEADLINE: Duration = Duration::from_secs(35);
/// Opening its SSH session (EC2 calls included), and each of its commands.
const SESSION_DEADLINE: Duration = Duration::from_secs(20);
const COMMAND_DEADLINE: Duration = Duration::from_secs(8);

/// `sh` line that runs `cmd` as root where the SSH user may (`sudo -n`), as itself otherwise:
/// the config directory is root's (user-data runs as root, umask 077).
fn as_root(cmd: &str) -> String {
    let q = crate::shell::quote(cmd);
    format!(
        "if [ \"$(id -u)\" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; \
         then exec sudo -n sh -c {q}; else exec sh -c {q}; fi"
    )
}

/// Exit status of a read whose file does not exist.
const ABSENT: i64 = 44;

fn read_line(path: &str) -> String {
    as_root(&format!("f={}; [ -e \"$f\" ] || exit {ABSENT}; head -c {} -- \"$f\"", crate::shell::quote(path), crate::MAX_FILE_READ))
}

impl Ec2Backend {
    /// Clients for the configured region and endpoint; checks that the EC2 API answers
    /// (credentials included) with one small DescribeInstances.
    pub async fn connect(cfg: Ec2Config, store: Arc<dyn InstanceStore>) -> Result<Self, BackendError> {
        let b = Self::new(cfg, store).await;
        b.aws
            .ec2
            .describe_instances()
            .filters(Filter::builder().name(format!("tag:{MANAGED_LABEL}")).values("true").build())
            .max_results(5)
            .send()
            .await
            .map_err(|e| Fault::of(&e).into_backend("DescribeInstances"))?;
        Ok(b)
    }

    /// The backend without that check.
    pub async fn new(cfg: Ec2Config, store: Arc<dyn InstanceStore>) -> Self {
        let aws = aws::clients(&cfg.region, cfg.endpoint_url.as_deref()).await;
        Ec2Backend { aws, cfg, store }
    }

    fn tags(spec: &StartSpec) -> Vec<Tag> {
        [
            (MANAGED_LABEL, "true".to_string()),
            (WORKSPACE_LABEL, spec.workspace_id.to_string()),
            (ORG_TAG, spec.org_id.to_string()),
            ("Name", instance_name(spec.workspace_id)),
        ]
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
    }

    /// Live managed instances, all of them or one workspace's.
    async fn live(&self, ws: Option<WorkspaceId>) -> Result<Vec<ManagedInstance>, BackendError> {
        let mut filters = vec![
            Filter::builder().name(format!("tag:{MANAGED_LABEL}")).values("true").build(),
            Filter::builder().name("instance-state-name").set_values(Some(LIVE.map(String::from).to_vec())).build(),
        ];
        if let Some(ws) = ws {
            filters.push(Filter::builder().name(format!("tag:{WORKSPACE_LABEL}")).values(ws.to_string()).build());
        }
        let mut out = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page = self
                .aws
                .ec2
                .describe_instances()
                .set_filters(Some(filters.clone()))
                .set_next_token(next.take())
                .send()
                .await
                .map_err(|e| Fault::of(&e).into_backend("DescribeInstances"))?;
            for i in page.reservations().iter().flat_map(|r| r.instances()) {
                let Some(id) = i.instance_id() else { continue };
                let tag = |k: &str| i.tags().iter().find(|t| t.key() == Some(k)).and_then(|t| t.value()).map(String::from);
                let state = i.state().and_then(|s| s.name());
                out.push(ManagedInstance {
                    name: id.to_string(),
                    workspace_id: tag(WORKSPACE_LABEL),
                    running: matches!(state, Some(InstanceStateName::Running | InstanceStateName::Pending)),
                    created_at: i.launch_time().and_then(|t| chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos())),
                });
            }
            match page.next_token() {
                Some(t) if !t.is_empty() => next = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(out)
    }

    /// Terminates instances by id; ids EC2 no longer knows count as terminated.
    async fn terminate(&self, ids: Vec<String>) -> Result<(), BackendError> {
        if ids.is_empty() {
            return Ok(());
        }
        match self.aws.ec2.terminate_instances().set_instance_ids(Some(ids.clone())).send().await {
            Ok(_) => {
                tracing::info!(event = "ec2.terminated", instance_ids = ?ids);
                Ok(())
            }
            Err(e) => match Fault::of(&e) {
                Fault::NotFound if ids.len() == 1 => Ok(()),
                // One unknown id fails the whole call: the others, one by one.
                Fault::NotFound => {
                    for id in ids {
                        Box::pin(self.terminate(vec![id])).await?;
                    }
                    Ok(())
                }
                f => Err(f.into_backend("TerminateInstances")),
            },
        }
    }

    async fn recorded(&self, ws: WorkspaceId) -> Result<String, BackendError> {
        self.store.instance_id(ws).await?.ok_or_else(|| BackendError::engine(404, "the workspace has no instance recorded"))
    }

    /// The instance's SSH address: the configured override, or its private address.
    async fn ssh_address(&self, instance_id: &str) -> Result<String, BackendError> {
        if let Some(a) = &self.cfg.ssh_address {
            return Ok(a.clone());
        }
        let out = self
            .aws
            .ec2
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| Fault::of(&e).into_backend("DescribeInstances"))?;
        let ip = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find_map(|i| i.private_ip_address())
            .ok_or_else(|| BackendError::EngineUnavailable("the instance has no address yet".into()))?;
        Ok(format!("{ip}:22"))
    }

    async fn session(&self, ws: WorkspaceId) -> Result<ssh::Session, BackendError> {
        let id = self.recorded(ws).await?;
        let address = self.ssh_address(&id).await?;
        let trust = match self.store.host_key(&id).await? {
            Some(pinned) => ssh::Trust::Pinned(pinned),
            // Not pinned yet: the keys the instance printed at boot, when its console
            // has them (an unreadable console is no reason to refuse: first use).
            None => match self.console_of(&id).await {
                Ok(bytes) => ssh::console_host_keys(&String::from_utf8_lossy(&bytes)).map_or(ssh::Trust::FirstUse, ssh::Trust::Listed),
                Err(e) => {
                    tracing::info!(instance_id = id, error = %e, "console unreadable; the host key is trusted on first use");
                    ssh::Trust::FirstUse
                }
            },
        };
        let target = ssh::Target { instance_id: &id, address: &address, user: &self.cfg.ssh_user };
        ssh::Session::open(&self.aws.connect, self.store.clone(), &target, trust).await
    }

    async fn console_of(&self, instance_id: &str) -> Result<Vec<u8>, BackendError> {
        let out = match self.aws.ec2.get_console_output().instance_id(instance_id).send().await {
            Ok(out) => out,
            Err(e) => return Err(Fault::of(&e).into_backend("GetConsoleOutput")),
        };
        let encoded = out.output().unwrap_or_default();
        base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| BackendError::EngineUnavailable("GetConsoleOutput: the output is not base64".into()))
    }

    async fn read_with(session: &ssh::Session, path: &str, deadline: Duration) -> Result<Option<Vec<u8>>, BackendError> {
        // The instance's stderr is not kept: unredacted instance text is not for logs.
        let (code, out, _) = session.output(&read_line(path), crate::MAX_FILE_READ, deadline).await?;
        match code {
            Some(0) => Ok(Some(out)),
            Some(ABSENT) => Ok(None),
            other => Err(BackendError::engine(500, &format!("reading {path} failed (exit status {other:?})"))),
        }
    }
}

#[async_trait::async_trait]
impl Backend for Ec2Backend {
    fn name(&self) -> &'static str {
        "ec2"
    }

    fn assigns_instance_ids(&self) -> bool {
        true
    }

    async fn start(&self, spec: &StartSpec) -> Result<Started, BackendError> {
        let ws = spec.workspace_id;
        // One instance per workspace: an earlier attempt's (its id never recorded, or
        // this is a restart) goes before a new one comes.
        let leftovers: Vec<String> = self.live(Some(ws)).await?.into_iter().map(|m| m.name).collect();
        self.terminate(leftovers).await?;
        let script = user_data::render(spec, &self.cfg.config_dir, self.cfg.agent_port, &self.cfg.limits);
        let tags = Self::tags(spec);
        let mut run = self
            .aws
            .ec2
            .run_instances()
            .image_id(&self.cfg.ami)
            .instance_type(self.cfg.instance_type.as_str().into())
            .min_count(1)
            .max_count(1)
            .user_data(base64::engine::general_purpose::STANDARD.encode(script))
            // The SDK's own retry of this very call must not launch a second instance.
            .client_token(uuid::Uuid::new_v4().to_string())
            // IMDSv2 only: a request forged through the agent cannot read the metadata.
            .metadata_options(InstanceMetadataOptionsRequest::builder().http_tokens(HttpTokensState::Required).build())
            .tag_specifications(TagSpecification::builder().resource_type(ResourceType::Instance).set_tags(Some(tags.clone())).build())
            .tag_specifications(TagSpecification::builder().resource_type(ResourceType::Volume).set_tags(Some(tags)).build())
            .set_security_group_ids((!self.cfg.security_group_ids.is_empty()).then(|| self.cfg.security_group_ids.clone()));
        if let Some(subnet) = &self.cfg.subnet_id {
            run = run.subnet_id(subnet);
        }
        let out = run.send().await.map_err(|e| Fault::of(&e).into_backend("RunInstances"))?;
        let instance = out.instances().first().ok_or_else(|| BackendError::engine(502, "RunInstances returned no instance"))?;
        let id = instance.instance_id().ok_or_else(|| BackendError::engine(502, "RunInstances returned no instance id"))?;
        let agent_url = instance.private_ip_address().map(|ip| format!("http://{ip}:{}", self.cfg.agent_port));
        tracing::info!(event = "provision.ec2_started", workspace_id = %ws, org_id = %spec.org_id, instance_id = id);
        Ok(Started { container_name: instance_name(ws), image_digest: None, instance_id: Some(id.to_string()), agent_url })
    }

    async fn stop(&self, ws: WorkspaceId) -> Result<(), BackendError> {
        // The recorded instance, and any other live one tagged for the workspace: a launch
        // whose id was not recorded yet (a delete during provisioning) or a stray.
        let mut ids: Vec<String> = self.store.instance_id(ws).await?.into_iter().collect();
        for m in self.live(Some(ws)).await? {
            if !ids.contains(&m.name) {
                ids.push(m.name);
            }
        }
        self.terminate(ids).await // none: never launched, nothing to stop
    }

    async fn remove_volume(&self, _ws: WorkspaceId) -> Result<(), BackendError> {
        Ok(()) // the root volume is deleted with its instance
    }

    async fn is_running(&self, ws: WorkspaceId) -> (bool, Option<BackendError>) {
        let id = match self.store.instance_id(ws).await {
            Ok(Some(id)) => id,
            Ok(None) => return (false, None),
            Err(e) => return (true, Some(e)),
        };
        match self.aws.ec2.describe_instances().instance_ids(&id).send().await {
            Ok(out) => {
                let state = out
                    .reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .find(|i| i.instance_id() == Some(id.as_str()))
                    .map(|i| i.state().and_then(|s| s.name()).cloned());
                match state {
                    None => (false, None), // not in the answer: gone
                    Some(Some(InstanceStateName::Pending | InstanceStateName::Running)) => (true, None),
                    Some(Some(
                        InstanceStateName::Stopping
                        | InstanceStateName::Stopped
                        | InstanceStateName::ShuttingDown
                        | InstanceStateName::Terminated,
                    )) => (false, None),
                    Some(other) => (true, Some(BackendError::engine(200, &format!("instance state unknown: {other:?}")))),
                }
            }
            Err(e) => match Fault::of(&e) {
                Fault::NotFound => (false, None),
                f => (true, Some(f.into_backend("DescribeInstances"))),
            },
        }
    }

    async fn list_managed(&self) -> Result<Vec<ManagedInstance>, BackendError> {
        self.live(None).await
    }

    async fn reap(&self, _ws: WorkspaceId, listed: &[ManagedInstance]) -> Result<(), BackendError> {
        // By the listed ids: the row (and the id it recorded) may be gone.
        self.terminate(listed.iter().map(|m| m.name.clone()).collect()).await
    }

    fn is_named_for(&self, m: &ManagedInstance, _ws: WorkspaceId, volume: bool) -> bool {
        !volume && m.name.starts_with("i-")
    }

    async fn exec(&self, ws: WorkspaceId, req: &ExecRequest, sink: ChunkSink<'_>) -> Result<ExecOutcome, BackendError> {
        let session = self.session(ws).await?;
        let out = session.exec(&req.argv, req.timeout, req.max_bytes_per_stream, req.stop.clone(), sink).await;
        session.close().await;
        out
    }

    async fn read_file(&self, ws: WorkspaceId, path: &str) -> Result<Option<Vec<u8>>, BackendError> {
        let session = self.session(ws).await?;
        let out = Self::read_with(&session, path, READ_DEADLINE).await;
        session.close().await;
        out
    }

    async fn console_output(&self, ws: WorkspaceId) -> Result<Vec<u8>, BackendError> {
        let id = self.recorded(ws).await?;
        self.console_of(&id).await
    }

    async fn rescue_sections(&self, ws: WorkspaceId) -> Result<Vec<(String, String)>, BackendError> {
        // Inside the capture's 45 s budget (J4), whatever the instance does: what was read
        // by then is kept, the rest says it ran out of time.
        let deadline = tokio::time::Instant::now() + RESCUE_DEADLINE;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        let opened = tokio::time::timeout(SESSION_DEADLINE, self.session(ws))
            .await
            .unwrap_or_else(|_| Err(BackendError::EngineUnavailable("SSH session not open in time".into())));
        let session = match opened {
            Ok(s) => s,
            Err(e) => {
                // A box that fails to boot may never take SSH: what EC2 kept of its
                // console (cloud-init prints there) stands in for the log.
                tracing::warn!(workspace_id = %ws, error = %e, "rescue: the instance could not be reached over SSH");
                let console = match tokio::time::timeout(left(), self.console_output(ws)).await {
                    Ok(Ok(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
                    _ => "(no console output)".into(),
                };
                let unreachable = "(the instance could not be reached over SSH)".to_string();
                return Ok(crate::RESCUE_SECTIONS
                    .iter()
                    .map(|s| (s.to_string(), if *s == "cloud-init-output.log" { console.clone() } else { unreachable.clone() }))
                    .collect());
            }
        };
        let dir = self.cfg.config_dir.trim_end_matches('/');
        let agent = user_data::AGENT_CONTAINER;
        let mut out = Vec::new();
        let out_of_time = "(not read: the capture ran out of time)".to_string();
        for (section, file) in [("config.yaml", "config.yaml"), ("system-prompt.md", "system-prompt.md")] {
            let path = format!("{dir}/{file}");
            let text = match Self::read_with(&session, &path, left().min(COMMAND_DEADLINE)).await {
                Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
                Ok(None) => format!("({path} does not exist)"),
                Err(_) if left().is_zero() => out_of_time.clone(),
                Err(e) => {
                    tracing::warn!(workspace_id = %ws, error = %e, path, "rescue: a file could not be read");
                    format!("({path} could not be read)")
                }
            };
            out.push((section.to_string(), text));
        }
        // Each under the remote `timeout`: a wedged Docker daemon costs a few seconds, not
        // the capture.
        let secs = COMMAND_DEADLINE.as_secs().saturating_sub(2).max(1);
        let log = "/var/log/cloud-init-output.log";
        let commands = [
            ("cloud-init-output.log", format!("[ -e {log} ] || exit {ABSENT}; tail -n 200 {log}")),
            ("docker-ps", format!("timeout {secs} docker ps -a")),
            ("agent-logs", format!("timeout {secs} docker logs --tail 200 {agent} 2>&1")),
            (
                "runtime-env",
                format!("timeout {secs} docker inspect --format '{{{{range .Config.Env}}}}{{{{println .}}}}{{{{end}}}}' {agent}"),
            ),
        ];
        for (section, cmd) in commands {
            if left().is_zero() {
                out.push((section.to_string(), out_of_time.clone()));
                continue;
            }
            let text = match session.output(&as_root(&cmd), crate::MAX_FILE_READ, left().min(COMMAND_DEADLINE)).await {
                Ok((Some(0), stdout, _)) => {
                    let t = String::from_utf8_lossy(&stdout).into_owned();
                    if section == "runtime-env" {
                        t.lines()
                            .filter(|kv| {
                                let key = kv.split('=').next().unwrap_or("");
                                ["MODEL", "PROVIDER", "RUNTIME"].iter().any(|k| key.contains(k))
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    } else {
                        t
                    }
                }
                Ok((Some(ABSENT), _, _)) if section == "cloud-init-output.log" => format!("({log} does not exist)"),
                Ok((code, _, _)) => {
                    // Its stderr stays unread: unredacted instance text is not for logs.
                    tracing::warn!(workspace_id = %ws, section, exit_code = ?code, "rescue: a section's command failed");
                    format!("(could not be read on the instance: exit status {})", code.map(|c| c.to_string()).unwrap_or("unknown".into()))
                }
                Err(_) if left().is_zero() => out_of_time.clone(),
                Err(e) => {
                    tracing::warn!(workspace_id = %ws, section, error = %e, "rescue: a section's command failed");
                    "(could not be read on the instance)".to_string()
                }
            };
            out.push((section.to_string(), text));
        }
        session.close().await;
        Ok(out)
    }
}
