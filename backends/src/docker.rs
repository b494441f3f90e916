//! The Docker backend (bollard). One container `ws-<id prefix>` per workspace, one volume
//! `ws-<id prefix>-configs` mounted at `/configs`, both labelled managed + workspace id.

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, HostConfig, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, DownloadFromContainerOptionsBuilder, ListContainersOptionsBuilder,
    ListVolumesOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder, RemoveVolumeOptionsBuilder, StopContainerOptionsBuilder,
    UploadToContainerOptionsBuilder,
};
use futures_util::StreamExt;
use molecule_domain::WorkspaceId;
use std::collections::HashMap;

use crate::{
    AgentEndpoint, Backend, BackendError, ChunkSink, ExecOutcome, ExecRequest, ManagedInstance, OutputStream, StartSpec, Started, image,
};

pub const MANAGED_LABEL: &str = "molecule.platform.managed";
pub const WORKSPACE_LABEL: &str = "molecule.workspace.id";

#[derive(Clone, Debug)]
pub struct DockerConfig {
    /// `host` for local installs and tests (loopback only); a network name otherwise.
    pub network_mode: String,
    /// MOLECULE_IMAGE_PLATFORM, e.g. `linux/amd64`.
    pub platform: Option<String>,
    /// Write config files straight into a volume's mountpoint when it is a directory on
    /// this host (a local engine); false: always through the engine's archive API.
    pub direct_volume_writes: bool,
    /// Memory, CPU and process limits by tier.
    pub limits: crate::isolation::TierLimits,
    /// A read-only root filesystem (with a small writable /tmp).
    pub read_only_root: bool,
}

impl DockerConfig {
    /// Host networking, the engine's platform, direct volume writes where possible,
    /// default limits, a writable root filesystem.
    pub fn local() -> Self {
        DockerConfig {
            network_mode: "host".into(),
            platform: None,
            direct_volume_writes: true,
            limits: Default::default(),
            read_only_root: false,
        }
    }
}

pub struct DockerBackend {
    docker: Docker,
    cfg: DockerConfig,
}

/// `ws-` and the first 12 hex digits of the workspace id.
pub fn container_name(ws: WorkspaceId) -> String {
    format!("ws-{}", &ws.0.simple().to_string()[..12])
}

pub fn volume_name(ws: WorkspaceId) -> String {
    format!("{}-configs", container_name(ws))
}

fn classify(e: DockerError) -> BackendError {
    match e {
        DockerError::DockerResponseServerError { status_code, message } => BackendError::engine(status_code, &message),
        other => BackendError::EngineUnavailable(other.to_string()),
    }
}

fn status_of(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn message_of(e: &DockerError) -> &str {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message,
        _ => "",
    }
}

impl DockerBackend {
    /// Connects to the local engine (unix socket or DOCKER_HOST) and checks that it answers.
    pub async fn connect(cfg: DockerConfig) -> Result<Self, BackendError> {
        let docker = Docker::connect_with_local_defaults().map_err(|e| BackendError::EngineUnavailable(e.to_string()))?;
        let docker = docker.negotiate_version().await.map_err(|e| BackendError::EngineUnavailable(e.to_string()))?;
        docker.ping().await.map_err(|e| BackendError::EngineUnavailable(e.to_string()))?;
        Ok(DockerBackend { docker, cfg })
    }

    fn labels(ws: WorkspaceId) -> HashMap<String, String> {
        HashMap::from([(MANAGED_LABEL.to_string(), "true".to_string()), (WORKSPACE_LABEL.to_string(), ws.to_string())])
    }

    /// Present and not a moving tag: use it. Missing, or moving: pull (a failed re-pull of
    /// a moving tag that is present locally keeps the local copy).
    async fn ensure_image(&self, reference: &str) -> Result<Option<String>, BackendError> {
        let present = match self.docker.inspect_image(reference).await {
            Ok(info) => Some(info.id),
            Err(e) if status_of(&e) == Some(404) => None,
            Err(e) => return Err(classify(e)),
        };
        if present.is_some() && !image::is_moving(reference) {
            return Ok(present.flatten());
        }
        let mut opts = CreateImageOptionsBuilder::default().from_image(reference);
        if let Some(p) = &self.cfg.platform {
            opts = opts.platform(p);
        }
        let mut pull = self.docker.create_image(Some(opts.build()), None, None);
        let mut failure = None;
        while let Some(step) = pull.next().await {
            if let Err(e) = step {
                failure = Some(e);
                break;
            }
        }
        match (failure, present) {
            (None, _) => Ok(self.docker.inspect_image(reference).await.ok().and_then(|i| i.id)),
            (Some(e), Some(local)) => {
                tracing::warn!(image = reference, error = %e, "re-pull of a moving tag failed; using the local image");
                Ok(local)
            }
            (Some(e), None) => {
                tracing::warn!(image = reference, error = %e, "image pull failed");
                Err(BackendError::ImageNotFound(reference.to_string()))
            }
        }
    }

    fn config_archive(files: &[(&str, &[u8])], owner: Option<(u32, u32)>) -> Result<Vec<u8>, BackendError> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            if let Some((uid, gid)) = owner {
                h.set_uid(uid as u64);
                h.set_gid(gid as u64);
            }
            h.set_cksum();
            b.append_data(&mut h, name, *data).map_err(|e| BackendError::EngineUnavailable(e.to_string()))?;
        }
        b.into_inner().map_err(|e| BackendError::EngineUnavailable(e.to_string()))
    }

    /// Writes the workspace's secrets into its config volume. With the engine on this host
    /// (the volume's mountpoint is a directory here) they are written there directly: the
    /// engine's archive upload into a created container costs about a second of the
    /// first-start time. Otherwise (a remote engine, Docker Desktop's VM) through the
    /// archive API.
    async fn write_secrets(&self, container: &str, volume: &str, spec: &StartSpec) -> Result<(), BackendError> {
        let files =
            [(".auth_token", spec.secrets().token().as_bytes()), (".platform_inbound_secret", spec.secrets().inbound_secret().as_bytes())];
        // Owned by the user the instance runs as (root when it runs as the image's user).
        let owner = crate::isolation::profile(&spec.runtime).user;
        let mountpoint = self.docker.inspect_volume(volume).await.map_err(classify)?.mountpoint;
        let dir = std::path::Path::new(&mountpoint);
        if self.cfg.direct_volume_writes && !mountpoint.is_empty() && dir.is_dir() {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            for (name, data) in files {
                let path = dir.join(name);
                // The volume outlives restarts and its owner runs tenants' commands: the
                // name may now be a symlink to any host file. Remove whatever is there (a
                // link goes, not its target), then create afresh without following links
                // (O_EXCL fails on a link planted in between) and hand over the open file.
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(BackendError::EngineUnavailable(format!("cannot replace a config file: {e}"))),
                }
                let written = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&path)
                    .and_then(|mut f| {
                        f.write_all(data)?;
                        match owner {
                            Some((uid, gid)) => std::os::unix::fs::fchown(&f, Some(uid), Some(gid)),
                            None => Ok(()),
                        }
                    });
                written.map_err(|e| BackendError::EngineUnavailable(format!("cannot write the workspace's config volume: {e}")))?;
            }
            // The agent keeps its own state beside its secrets (a poll cursor). lchown: the
            // mountpoint itself, never what a link might point at.
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::lchown(dir, Some(uid), Some(gid))
                    .map_err(|e| BackendError::EngineUnavailable(format!("cannot hand the config volume to the workspace's user: {e}")))?;
            }
            return Ok(());
        }
        let archive = Self::config_archive(&files, owner)?;
        let upload = UploadToContainerOptionsBuilder::default().path("/configs").build();
        self.docker.upload_to_container(container, Some(upload), bollard::body_full(archive.into())).await.map_err(classify)
    }

    /// Kills a timed-out (or interrupted) exec: every process it started (J5), not only
    /// the first — a shell's children would outlive it. The engine has no kill for an exec,
    /// so the processes (host pids, as the engine reports them) are killed directly: this
    /// needs the engine on this host, which is how the Docker backend is deployed (local
    /// installs and tests).
    ///
    /// The engine starts an exec's process as a session leader, so everything it starts
    /// carries its pid as session id, even once orphaned to the container's init; a pid
    /// cannot be reused while a process still carries it as session id. Only processes in
    /// the container's pid namespace are touched. When the exec itself has ended (a
    /// background child kept the output open), its pid may already belong to another
    /// process: it is never killed then, only what is left of its session.
    async fn kill_exec(&self, container: &str, exec_id: &str) {
        let info = match self.docker.inspect_exec(exec_id).await {
            Ok(info) => info,
            Err(e) => return tracing::warn!(error = %e, "cannot inspect the timed-out exec"),
        };
        let Some(leader) = info.pid.filter(|p| *p > 1).map(|p| p as i32) else {
            return tracing::warn!("timed-out exec has no pid to kill");
        };
        // Unknown counts as ended: never kill a pid that may have been reused.
        let running = info.running == Some(true);
        let init = match self.docker.inspect_container(container, None).await {
            Ok(c) => c.state.and_then(|s| s.pid).filter(|p| *p > 0).map(|p| p as i32),
            // The container is gone, and its processes with it.
            Err(e) if status_of(&e) == Some(404) => return,
            Err(e) => return tracing::warn!(error = %e, "cannot inspect the container of a timed-out exec"),
        };
        let Some(init) = init else { return };
        let killed = tokio::task::spawn_blocking(move || proc_tree::kill_session(init, leader, running)).await;
        match killed {
            Ok(Ok(n)) => tracing::info!(event = "exec.killed", processes = n, leader_running = running),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not kill the timed-out exec's processes"),
            Err(e) => tracing::warn!(error = %e, "killing the timed-out exec's processes panicked"),
        }
    }

    /// A file of a container (running or not), via the archive API. None when absent.
    async fn read_container_file(&self, name: &str, path: &str) -> Result<Option<Vec<u8>>, BackendError> {
        let opts = DownloadFromContainerOptionsBuilder::default().path(path).build();
        let mut stream = self.docker.download_from_container(name, Some(opts));
        let mut archive = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(b) => {
                    archive.extend_from_slice(&b);
                    if archive.len() > crate::MAX_FILE_READ + 1024 {
                        break; // the header and as much as is kept
                    }
                }
                Err(e) if status_of(&e) == Some(404) => return Ok(None),
                Err(e) => return Err(classify(e)),
            }
        }
        let mut ar = tar::Archive::new(&archive[..]);
        let entries = ar.entries().map_err(|e| BackendError::engine(500, &e.to_string()))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| BackendError::engine(500, &e.to_string()))?;
            let mut data = Vec::new();
            use std::io::Read;
            let _ = (&mut entry).take(crate::MAX_FILE_READ as u64).read_to_end(&mut data);
            return Ok(Some(data));
        }
        Ok(None)
    }

    async fn remove_container(&self, name: &str) -> Result<(), BackendError> {
        let opts = RemoveContainerOptionsBuilder::default().force(true).build();
        match self.docker.remove_container(name, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            // Someone else is already removing it: the outcome we want.
            Err(e) if status_of(&e) == Some(409) && message_of(&e).contains("already in progress") => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }
}

#[async_trait::async_trait]
impl Backend for DockerBackend {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn assign_agent_endpoint(&self, _ws: WorkspaceId) -> Result<Option<AgentEndpoint>, BackendError> {
        if self.cfg.network_mode != "host" {
            return Ok(None);
        }
        // Host networking shares one port space: each agent gets its own loopback port.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| BackendError::EngineUnavailable(format!("no free port for the agent: {e}")))?;
        Ok(Some(AgentEndpoint { url: format!("http://127.0.0.1:{port}"), port }))
    }

    async fn start(&self, spec: &StartSpec) -> Result<Started, BackendError> {
        let ws = spec.workspace_id;
        let name = container_name(ws);
        let digest = self.ensure_image(&spec.image).await?;
        // A leftover container from an earlier attempt is replaced.
        self.remove_container(&name).await?;
        let volume = volume_name(ws);
        self.docker
            .create_volume(VolumeCreateRequest { name: Some(volume.clone()), labels: Some(Self::labels(ws)), ..Default::default() })
            .await
            .map_err(classify)?;
        let env: Vec<String> = spec.env().into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        let profile = crate::isolation::profile(&spec.runtime);
        let limits = self.cfg.limits.of(spec.tier);
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            env: Some(env),
            labels: Some(Self::labels(ws)),
            user: profile.user.map(|(u, g)| format!("{u}:{g}")),
            host_config: Some(HostConfig {
                binds: Some(vec![format!("{volume}:/configs")]),
                network_mode: Some(self.cfg.network_mode.clone()),
                // Issue 12: a tenant's workspace is a hostile neighbour.
                cap_drop: Some(vec!["ALL".into()]),
                cap_add: Some(profile.cap_add.iter().map(|c| c.to_string()).collect()),
                security_opt: Some(vec!["no-new-privileges:true".into()]),
                privileged: Some(false),
                memory: Some((limits.memory_mb * 1024 * 1024) as i64),
                // No swap beyond the memory limit.
                memory_swap: Some((limits.memory_mb * 1024 * 1024) as i64),
                nano_cpus: Some((limits.cpus * 1e9) as i64),
                pids_limit: Some(limits.pids),
                readonly_rootfs: Some(self.cfg.read_only_root),
                tmpfs: self.cfg.read_only_root.then(|| HashMap::from([("/tmp".to_string(), "rw,nosuid,nodev,size=64m".to_string())])),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut opts = CreateContainerOptionsBuilder::default().name(&name);
        if let Some(p) = &self.cfg.platform {
            opts = opts.platform(p);
        }
        self.docker.create_container(Some(opts.build()), body).await.map_err(classify)?;
        // The secrets land in /configs before the agent can start.
        self.write_secrets(&name, &volume, spec).await?;
        self.docker.start_container(&name, None).await.map_err(classify)?;
        tracing::info!(event = "provision.container_started", workspace_id = %ws, org_id = %spec.org_id, container = name);
        Ok(Started { container_name: name, image_digest: digest, instance_id: None, agent_url: None })
    }

    async fn stop(&self, ws: WorkspaceId) -> Result<(), BackendError> {
        let name = container_name(ws);
        let docker = self.docker.clone();
        // Detached from the caller: a cancelled job must not leave a half-stopped container.
        let stop = tokio::spawn(async move {
            let opts = StopContainerOptionsBuilder::default().t(10).build();
            match docker.stop_container(&name, Some(opts)).await {
                Ok(()) => Ok(()),
                Err(e) if matches!(status_of(&e), Some(404) | Some(304)) => Ok(()),
                Err(e) => Err(classify(e)),
            }
        });
        stop.await.map_err(|e| BackendError::EngineUnavailable(e.to_string()))??;
        self.remove_container(&container_name(ws)).await
    }

    async fn remove_volume(&self, ws: WorkspaceId) -> Result<(), BackendError> {
        let opts = RemoveVolumeOptionsBuilder::default().force(true).build();
        match self.docker.remove_volume(&volume_name(ws), Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }

    async fn is_running(&self, ws: WorkspaceId) -> (bool, Option<BackendError>) {
        match self.docker.inspect_container(&container_name(ws), None).await {
            Ok(info) => match info.state.and_then(|s| s.running) {
                Some(r) => (r, None),
                None => (true, Some(BackendError::engine(200, "container state missing from the engine's answer"))),
            },
            Err(e) if status_of(&e) == Some(404) => (false, None),
            Err(e) => (true, Some(classify(e))),
        }
    }

    async fn exec(&self, ws: WorkspaceId, req: &ExecRequest, sink: ChunkSink<'_>) -> Result<ExecOutcome, BackendError> {
        use bollard::container::LogOutput;
        use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
        let name = container_name(ws);
        let created = self
            .docker
            .create_exec(
                &name,
                CreateExecOptions::<String> {
                    cmd: Some(req.argv.clone()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .map_err(classify)?;
        let started = self
            .docker
            .start_exec(&created.id, Some(StartExecOptions { detach: false, tty: false, output_capacity: Some(64 * 1024) }))
            .await
            .map_err(classify)?;
        let StartExecResults::Attached { mut output, .. } = started else {
            return Err(BackendError::engine(500, "exec started detached"));
        };
        let mut out = ExecOutcome::default();
        let cap = req.max_bytes_per_stream;
        let read = async {
            while let Some(item) = output.next().await {
                let (stream, bytes) = match item.map_err(classify)? {
                    LogOutput::StdOut { message } => (OutputStream::Stdout, message),
                    LogOutput::StdErr { message } => (OutputStream::Stderr, message),
                    _ => continue,
                };
                out.take(stream, &bytes, cap, sink);
            }
            Ok::<(), BackendError>(())
        };
        let stopped = crate::stopped(req.stop.clone());
        enum End {
            Read(Result<(), BackendError>),
            TimedOut,
            Stopped,
        }
        let end = tokio::select! {
            r = tokio::time::timeout(req.timeout, read) => match r {
                Ok(r) => End::Read(r),
                Err(_) => End::TimedOut,
            },
            _ = stopped => End::Stopped,
        };
        match end {
            End::Read(r) => r?,
            End::TimedOut | End::Stopped => {
                out.timed_out = matches!(end, End::TimedOut);
                out.interrupted = matches!(end, End::Stopped);
                self.kill_exec(&name, &created.id).await;
                return Ok(out);
            }
        }
        let info = self.docker.inspect_exec(&created.id).await.map_err(classify)?;
        out.exit_code = info.exit_code;
        Ok(out)
    }

    async fn read_file(&self, ws: WorkspaceId, path: &str) -> Result<Option<Vec<u8>>, BackendError> {
        self.read_container_file(&container_name(ws), path).await
    }

    async fn rescue_sections(&self, ws: WorkspaceId) -> Result<Vec<(String, String)>, BackendError> {
        let name = container_name(ws);
        let info = match self.docker.inspect_container(&name, None).await {
            Ok(i) => Some(i),
            Err(e) if status_of(&e) == Some(404) => None,
            Err(e) => return Err(classify(e)),
        };
        let mut out = Vec::new();
        for (section, path) in [("config.yaml", "/configs/config.yaml"), ("system-prompt.md", "/configs/system-prompt.md")] {
            let text = match &info {
                None => "(no container)".to_string(),
                Some(_) => match self.read_container_file(&name, path).await {
                    Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
                    Ok(None) => format!("({path} does not exist)"),
                    // The engine's words stay in the server log: the bundle is a tenant's to read.
                    Err(e) => {
                        tracing::warn!(error = %e, path, "rescue: a file could not be read");
                        format!("({path} could not be read)")
                    }
                },
            };
            out.push((section.to_string(), text));
        }
        out.push(("cloud-init-output.log".into(), "(not applicable: Docker workspaces do not boot with cloud-init)".into()));
        // `docker ps -a` of the managed containers.
        // Only this workspace's containers: a bundle never names another tenant's workspaces.
        let ps = match self.list_managed().await {
            Ok(list) => {
                let mut t = String::from("NAME	WORKSPACE	RUNNING\n");
                let own = ws.to_string();
                for c in list.into_iter().filter(|c| c.workspace_id.as_deref() == Some(own.as_str())) {
                    t.push_str(&format!("{}	{}	{}\n", c.name, c.workspace_id.unwrap_or_default(), c.running));
                }
                t
            }
            Err(e) => {
                tracing::warn!(error = %e, "rescue: containers could not be listed");
                "(could not list containers)".to_string()
            }
        };
        out.push(("docker-ps".into(), ps));
        let logs = match &info {
            None => "(no container)".to_string(),
            Some(_) => {
                let opts = LogsOptionsBuilder::default().stdout(true).stderr(true).tail("200").build();
                let mut stream = self.docker.logs(&name, Some(opts));
                let mut t = String::new();
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(chunk) => t.push_str(&chunk.to_string()),
                        Err(e) => {
                            tracing::warn!(error = %e, "rescue: the agent's log could not be read to its end");
                            t.push_str("\n(log read failed)");
                            break;
                        }
                    }
                }
                t
            }
        };
        out.push(("agent-logs".into(), logs));
        let env = info
            .as_ref()
            .and_then(|i| i.config.as_ref())
            .and_then(|c| c.env.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|kv| {
                let key = kv.split('=').next().unwrap_or("");
                ["MODEL", "PROVIDER", "RUNTIME"].iter().any(|k| key.contains(k))
            })
            .collect::<Vec<_>>()
            .join("\n");
        out.push(("runtime-env".into(), env));
        Ok(out)
    }

    async fn list_managed(&self) -> Result<Vec<ManagedInstance>, BackendError> {
        let filters = HashMap::from([("label".to_string(), vec![format!("{MANAGED_LABEL}=true")])]);
        let opts = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
        let list = self.docker.list_containers(Some(opts)).await.map_err(classify)?;
        Ok(list
            .into_iter()
            .map(|c| ManagedInstance {
                name: c.names.and_then(|n| n.first().cloned()).unwrap_or_default().trim_start_matches('/').to_string(),
                workspace_id: c.labels.and_then(|l| l.get(WORKSPACE_LABEL).cloned()),
                running: c.state.map(|s| format!("{s:?}").to_lowercase().contains("running")).unwrap_or(false),
                created_at: c.created.and_then(|t| chrono::DateTime::from_timestamp(t, 0)),
            })
            .collect())
    }

    fn is_named_for(&self, m: &ManagedInstance, ws: WorkspaceId, volume: bool) -> bool {
        m.name == if volume { volume_name(ws) } else { container_name(ws) }
    }

    async fn list_managed_volumes(&self) -> Result<Vec<ManagedInstance>, BackendError> {
        let filters = HashMap::from([("label".to_string(), vec![format!("{MANAGED_LABEL}=true")])]);
        let opts = ListVolumesOptionsBuilder::default().filters(&filters).build();
        let list = self.docker.list_volumes(Some(opts)).await.map_err(classify)?;
        Ok(list
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| ManagedInstance {
                workspace_id: v.labels.get(WORKSPACE_LABEL).cloned(),
                created_at: v.created_at.as_deref().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()).map(|t| t.to_utc()),
                name: v.name,
                running: false,
            })
            .collect())
    }
}

/// The processes of a timed-out exec, found through this host's /proc (see
/// [`DockerBackend::kill_exec`]).
mod proc_tree {
    use std::collections::{HashMap, HashSet};
    use std::path::Path;

    /// (ppid, session id) of a live process, from /proc/<pid>/stat (the command name, in
    /// parentheses, may itself contain spaces and parentheses: fields are read after the
    /// last one). None for a zombie: already dead, waiting for a parent that may never reap it.
    fn stat(pid: i32) -> Option<(i32, i32)> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &text[text.rfind(')')? + 1..];
        let mut f = rest.split_whitespace();
        if matches!(f.next()?, "Z" | "X" | "x") {
            return None;
        }
        let ppid = f.next()?.parse().ok()?;
        let sid = f.nth(1)?.parse().ok()?;
        Some((ppid, sid))
    }

    fn pid_ns(pid: i32) -> Option<std::path::PathBuf> {
        std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
    }

    /// The processes to kill: in `init`'s pid namespace (the container's), not `init`
    /// itself, members of `leader`'s session (the leader only while it runs) and their
    /// descendants (one may have started a session of its own).
    fn targets(init: i32, leader: i32, leader_running: bool) -> std::io::Result<Vec<i32>> {
        let ns = pid_ns(init).ok_or_else(|| std::io::Error::other("the container's pid namespace is not readable on this host"))?;
        let mut procs: HashMap<i32, (i32, i32)> = HashMap::new();
        for entry in std::fs::read_dir(Path::new("/proc"))? {
            let Some(pid) = entry?.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            if let Some(st) = stat(pid) {
                procs.insert(pid, st);
            }
        }
        let mut set: HashSet<i32> =
            procs.iter().filter(|(pid, (_, sid))| *sid == leader && (leader_running || **pid != leader)).map(|(pid, _)| *pid).collect();
        loop {
            let more: Vec<i32> =
                procs.iter().filter(|(pid, (ppid, _))| set.contains(ppid) && !set.contains(pid)).map(|(pid, _)| *pid).collect();
            if more.is_empty() {
                break;
            }
            set.extend(more);
        }
        set.remove(&init);
        Ok(set.into_iter().filter(|pid| pid_ns(*pid).as_ref() == Some(&ns)).collect())
    }

    /// SIGKILLs the targets until none is left (one may fork meanwhile; its child keeps
    /// the session); answers how many were killed.
    pub(super) fn kill_session(init: i32, leader: i32, leader_running: bool) -> std::io::Result<usize> {
        let mut killed = HashSet::new();
        for _ in 0..20 {
            let now = targets(init, leader, leader_running)?;
            if now.is_empty() {
                return Ok(killed.len());
            }
            // Stopped first, all of them: a shell whose child dies before it would go on
            // with its script (`sleep 200; echo done`) and start the next command.
            for &pid in &now {
                // SAFETY: kill(2) on a pid; no memory is shared.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
            }
            for pid in now {
                // SAFETY: as above.
                if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                    killed.insert(pid);
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Err(std::io::Error::other("processes of the exec were still being started after 20 rounds of kills"))
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::os::unix::process::CommandExt;
        use std::process::{Command, Stdio};
        use std::time::{Duration, Instant};

        /// A shell in a session of its own, as the engine starts an exec.
        fn session(script: &str) -> std::process::Child {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", script]).stdout(Stdio::piped());
            // SAFETY: setsid(2) only, between fork and exec.
            unsafe {
                cmd.pre_exec(|| if libc::setsid() < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
            }
            cmd.spawn().unwrap()
        }

        fn gone(pid: i32, within: Duration) -> bool {
            let t0 = Instant::now();
            while t0.elapsed() < within {
                if stat(pid).is_none() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        }

        fn first_line(child: &mut std::process::Child) -> i32 {
            use std::io::BufRead;
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
            line.trim().parse().unwrap()
        }

        #[test]
        fn the_stat_of_a_process_is_read_after_its_name() {
            let me = std::process::id() as i32;
            // SAFETY: plain getters.
            let (ppid, sid) = unsafe { (libc::getppid(), libc::getsid(0)) };
            assert_eq!(stat(me), Some((ppid, sid)));
        }

        /// A running leader: it and everything it started go, children of children too.
        #[test]
        fn a_running_session_is_killed_whole() {
            let mut sh = session("sleep 300 & echo $!; sh -c 'sleep 301'");
            let leader = sh.id() as i32;
            let background = first_line(&mut sh);
            std::thread::sleep(Duration::from_millis(200));
            // This process stands for the container's init: same namespace, never killed.
            let init = std::process::id() as i32;
            assert!(kill_session(init, leader, true).unwrap() >= 3);
            let status = sh.wait().unwrap();
            assert!(status.code().is_none(), "the leader was killed: {status:?}");
            assert!(gone(background, Duration::from_secs(5)), "its background child was killed");
        }

        /// An ended leader: its pid is left alone, what is left of its session is killed.
        #[test]
        fn an_ended_leader_is_not_killed_but_its_session_is() {
            let mut sh = session("sleep 302 & echo $!; exit 0");
            let leader = sh.id() as i32;
            let background = first_line(&mut sh);
            assert_eq!(sh.wait().unwrap().code(), Some(0));
            let init = std::process::id() as i32;
            assert_eq!(targets(init, leader, false).unwrap(), vec![background]);
            assert_eq!(kill_session(init, leader, false).unwrap(), 1);
            assert!(gone(background, Duration::from_secs(5)));
        }
    }
}
