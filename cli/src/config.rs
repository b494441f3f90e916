//! Command line and environment. Every flag has an environment variable of the same
//! meaning (SPEC §8 names); values are validated before anything starts, and a bad one
//! is reported by the variable's name.

use clap::{Args, Parser, Subcommand};
use molecule_jobs::JobKind;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "molecule", version, about = "Molecule workspace server: API, worker pools and scheduler over PostgreSQL.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// API + every worker pool + scheduler in one process (the default).
    Serve(ServeArgs),
    /// The HTTP API only.
    Api(ApiArgs),
    /// Worker pools only.
    Worker(WorkerArgs),
    /// The cron scheduler only (safe on several replicas: each tick fires once).
    Scheduler(SchedulerArgs),
    /// Applies every migration (apalis-postgres' and ours) and exits.
    Migrate,
    /// Organizations and their tokens (for a fresh install and for operators).
    Org {
        #[command(subcommand)]
        command: OrgCommand,
    },
    /// The operator commands (`queues`, `jobs …`, `workspaces …`): HTTP clients of a
    /// running API.
    #[command(flatten)]
    Ops(crate::ops::OpsCommand),
}

#[derive(Subcommand, Debug)]
pub enum OrgCommand {
    /// Creates an organization and prints its id and a first token (shown once).
    Create {
        /// The organization's display name.
        name: String,
        /// Print exactly `{"org_id": "...", "token": "..."}`.
        #[arg(long)]
        json: bool,
    },
    /// Org tokens: `create` prints a new token once; `revoke` ends one.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Adds a token to an organization and prints it (shown once).
    Create {
        /// The organization id.
        org_id: String,
        /// A label to recognise the token by.
        #[arg(long)]
        label: Option<String>,
        /// Print exactly `{"token_id": "...", "token": "..."}`.
        #[arg(long)]
        json: bool,
    },
    /// Revokes a token by its id.
    Revoke {
        /// The organization id.
        org_id: String,
        /// The token id (printed by `create`).
        token_id: String,
    },
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Global options (serve, api, worker, scheduler, migrate, org)")]
pub struct Common {
    /// PostgreSQL URL. Unset: `serve` starts an embedded cluster under MOLECULE_DATA_DIR;
    /// the other commands need it.
    #[arg(long, env = "DATABASE_URL", value_name = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Where the embedded cluster and local state live [default: ./.molecule, or, when
    /// running as root where the `postgres` user cannot reach it (a 0700 directory such as
    /// root's home), a directory under /var/lib/molecule named after it; logged at start].
    #[arg(long, env = "MOLECULE_DATA_DIR", value_name = "MOLECULE_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Most connections this process opens to PostgreSQL.
    #[arg(long, env = "MOLECULE_DB_MAX_CONNECTIONS", value_name = "MOLECULE_DB_MAX_CONNECTIONS", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(2..=1000), global = true)]
    pub db_max_connections: u32,
    /// Log format: json or text [default: text when standard error is a terminal, else
    /// json]. Text written to anything but a terminal carries no colour codes.
    #[arg(long, env = "MOLECULE_LOG_FORMAT", value_name = "MOLECULE_LOG_FORMAT", value_parser = ["json", "text"],
          global = true)]
    pub log_format: Option<String>,
    /// 1 = explicit dev mode: admin routes open without a token (a loud banner says so),
    /// loopback agent URLs accepted.
    #[arg(long, env = "MOLECULE_DEV", value_name = "MOLECULE_DEV", default_value = "0", value_parser = ["0", "1"], global = true)]
    pub dev: String,
    /// 1 = accept agent URLs on loopback (local installs with host networking, tests), at
    /// registration (API) and at delivery (workers). Private, link-local and metadata
    /// addresses are refused regardless (X5).
    #[arg(long, env = "MOLECULE_ALLOW_LOOPBACK_AGENTS", value_name = "MOLECULE_ALLOW_LOOPBACK_AGENTS", default_value = "0",
          value_parser = ["0", "1"], global = true)]
    pub allow_loopback_agents: String,
}

impl Common {
    pub fn dev(&self) -> bool {
        self.dev == "1"
    }

    /// Loopback agent URLs allowed (X5): the flag, or dev mode.
    pub fn allow_loopback_agents(&self) -> bool {
        self.dev() || self.allow_loopback_agents == "1"
    }
}

#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// Address the API listens on.
    #[arg(long = "listen", env = "LISTEN_ADDR", value_name = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Bearer token for admin and operator routes. Unset: those routes are refused
    /// (outside dev mode).
    #[arg(long, env = "ADMIN_TOKEN", value_name = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Pin this process to one organization (a UUID). Set but empty: every tenant route
    /// answers 503 platform_misconfigured (fail closed).
    #[arg(long, env = "MOLECULE_ORG_ID", value_name = "MOLECULE_ORG_ID", value_parser = parse_org_pin)]
    pub org_id: Option<molecule_api::OrgPin>,
    /// Seconds a connection may take to send a whole request head, counted from when it
    /// opened or from its previous response (so it also ends idle keep-alive connections).
    #[arg(long, env = "MOLECULE_HTTP_HEADER_TIMEOUT_SECS", value_name = "MOLECULE_HTTP_HEADER_TIMEOUT_SECS", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub http_header_timeout_secs: u64,
    /// Most HTTP connections served at once; more wait in the kernel's backlog.
    #[arg(long, env = "MOLECULE_HTTP_MAX_CONNECTIONS", value_name = "MOLECULE_HTTP_MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub http_max_connections: u64,
    /// Seconds open requests and streams get after SIGTERM before they are cut.
    #[arg(long, env = "MOLECULE_HTTP_SHUTDOWN_SECS", value_name = "MOLECULE_HTTP_SHUTDOWN_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=600))]
    pub http_shutdown_secs: u64,
    /// Most NDJSON exec streams one organization may follow at once on this API process
    /// (past it: 429 too_many_streams).
    #[arg(long, env = "MOLECULE_STREAMS_PER_ORG", value_name = "MOLECULE_STREAMS_PER_ORG", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub streams_per_org: u64,
}

fn parse_org_pin(s: &str) -> Result<molecule_api::OrgPin, String> {
    molecule_api::OrgPin::from_env_value(Some(s))
}

impl ApiArgs {
    pub fn http_limits(&self) -> molecule_api::HttpLimits {
        molecule_api::HttpLimits {
            header_timeout: Duration::from_secs(self.http_header_timeout_secs),
            max_connections: self.http_max_connections as usize,
            shutdown_timeout: Duration::from_secs(self.http_shutdown_secs),
        }
    }

    pub fn auth(&self, common: &Common) -> molecule_api::AuthConfig {
        molecule_api::AuthConfig {
            admin_token: self.admin_token.clone().filter(|t| !t.is_empty()),
            dev: common.dev(),
            org_pin: self.org_id.clone().unwrap_or(molecule_api::OrgPin::Any),
            allow_loopback_agents: common.allow_loopback_agents(),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// A pool and its concurrency, e.g. `--pool exec=16 --pool provision=4` (repeatable).
    /// None given: every pool at its default concurrency. Pools: provision, stop, restart,
    /// rescue_capture, exec, a2a_dispatch, sweep, console.
    #[arg(long = "pool", env = "MOLECULE_POOLS", value_name = "MOLECULE_POOLS", value_delimiter = ',',
          value_parser = parse_pool)]
    pub pools: Vec<(JobKind, usize)>,
    /// Workspace backend: docker, ec2 or none. Unset: docker when a Docker engine answers, else none.
    #[arg(long, env = "MOLECULE_BACKEND", value_name = "MOLECULE_BACKEND", value_parser = parse_backend)]
    pub backend: Option<String>,
    #[command(flatten)]
    pub ec2: Ec2Args,
    /// Where `molecule worker` serves its own `/metrics` (its pools' job counters and
    /// durations live only in it) and `/healthz`. Unset: not served. Under `serve` the
    /// API's `/metrics` has them.
    #[arg(long = "metrics-listen", env = "MOLECULE_METRICS_ADDR", value_name = "MOLECULE_METRICS_ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// The URL workspaces use to reach the API. Default: http://<LISTEN_ADDR> under
    /// `serve`, http://127.0.0.1:8080 otherwise.
    #[arg(long, env = "PLATFORM_URL", value_name = "PLATFORM_URL")]
    pub platform_url: Option<String>,
    /// Registry prefix of runtime images (J1).
    #[arg(long, env = "MOLECULE_IMAGE_REGISTRY", value_name = "MOLECULE_IMAGE_REGISTRY", default_value = "ghcr.io/molecule-ai")]
    pub image_registry: String,
    /// Platform of pulled images and created containers, e.g. linux/amd64.
    #[arg(long, env = "MOLECULE_IMAGE_PLATFORM", value_name = "MOLECULE_IMAGE_PLATFORM")]
    pub image_platform: Option<String>,
    /// 1 = ignore runtime image digest pins (use the registry image as is).
    #[arg(long, env = "WORKSPACE_IMAGE_LOCAL_OVERRIDE", value_name = "WORKSPACE_IMAGE_LOCAL_OVERRIDE", default_value = "0",
          value_parser = ["0", "1"])]
    pub image_local_override: String,
    /// Where rescue bundle sections are pushed (Loki push API base URL). Unset: not shipped.
    #[arg(long, env = "LOKI_URL", value_name = "LOKI_URL")]
    pub loki_url: Option<String>,
    /// Memory (MiB), CPUs and processes of a workspace's container by tier, overriding the
    /// defaults (1=256/0.25/128 2=512/0.5/256 3=1024/1/512 4=2048/2/1024), e.g. `3=4096/2/2048`.
    #[arg(long, env = "MOLECULE_TIER_LIMITS", value_name = "MOLECULE_TIER_LIMITS", default_value = "",
          value_parser = molecule_backends::isolation::TierLimits::parse)]
    pub tier_limits: molecule_backends::isolation::TierLimits,
    /// 1 = workspace containers get a read-only root filesystem (a small writable /tmp).
    #[arg(long, env = "MOLECULE_WORKSPACE_READ_ONLY", value_name = "MOLECULE_WORKSPACE_READ_ONLY", default_value = "0",
          value_parser = ["0", "1"])]
    pub workspace_read_only: String,
    /// Docker network mode of workspace containers (`host` for local installs and tests).
    #[arg(long, env = "MOLECULE_DOCKER_NETWORK", value_name = "MOLECULE_DOCKER_NETWORK", default_value = "host")]
    pub docker_network: String,
    /// Seconds a worker may go without a heartbeat before its jobs run elsewhere.
    #[arg(long, env = "MOLECULE_JOB_LEASE_SECS", value_name = "MOLECULE_JOB_LEASE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub lease_secs: u64,
    /// Seconds running jobs get to finish after SIGTERM. Then they are interrupted: kinds
    /// that may run again are handed back to another worker; exec ends `interrupted`.
    #[arg(long, env = "MOLECULE_SHUTDOWN_GRACE_SECS", value_name = "MOLECULE_SHUTDOWN_GRACE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub grace_secs: u64,
    /// Fallback polling interval in milliseconds (LISTEN/NOTIFY wakes pools sooner).
    #[arg(long, env = "MOLECULE_POLL_INTERVAL_MS", value_name = "MOLECULE_POLL_INTERVAL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub poll_ms: u64,
    /// Most jobs one claim takes.
    #[arg(long, env = "MOLECULE_CLAIM_BATCH", value_name = "MOLECULE_CLAIM_BATCH", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(1..=5000))]
    pub claim_batch: u64,
}

/// A sweeper's schedule: a cron expression, or `off`.
#[derive(Clone, Debug)]
pub struct Cron(pub Option<cron::Schedule>);

fn parse_schedule(s: &str) -> Result<Cron, String> {
    molecule_scheduler::parse_cron(s).map(Cron)
}

/// `runtime=seconds,…` (S1's per-runtime timeouts).
fn parse_runtime_secs(s: &str) -> Result<(String, u64), String> {
    let (runtime, secs) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected RUNTIME=SECONDS"))?;
    let secs: u64 = secs.trim().parse().map_err(|_| format!("{s:?}: seconds must be a whole number"))?;
    if runtime.trim().is_empty() || !(1..=86_400).contains(&secs) {
        return Err(format!("{s:?}: a runtime name and 1 to 86400 seconds"));
    }
    Ok((runtime.trim().to_string(), secs))
}

/// Cron schedules (seconds first; 5 fields also accepted; `off` disables) and settings of
/// the sweepers (SPEC §5).
#[derive(Args, Debug, Clone)]
pub struct SchedulerArgs {
    /// S1: workspaces `provisioning` too long → failed + rescue.
    #[arg(long, env = "MOLECULE_SWEEP_PROVISION_TIMEOUT", value_name = "MOLECULE_SWEEP_PROVISION_TIMEOUT",
          default_value = "*/30 * * * * *", value_parser = parse_schedule)]
    pub sweep_provision_timeout: Cron,
    /// S2: containers and volumes of removed workspaces, and managed containers without a row, reaped.
    #[arg(long, env = "MOLECULE_SWEEP_ORPHANS", value_name = "MOLECULE_SWEEP_ORPHANS", default_value = "0 * * * * *",
          value_parser = parse_schedule)]
    pub sweep_orphans: Cron,
    /// S3: stale tokens of workspaces with no running container revoked.
    #[arg(long, env = "MOLECULE_SWEEP_STALE_TOKENS", value_name = "MOLECULE_SWEEP_STALE_TOKENS",
          default_value = "30 */5 * * * *", value_parser = parse_schedule)]
    pub sweep_stale_tokens: Cron,
    /// S4: dead containers of online workspaces restarted; silent external agents → awaiting_agent.
    #[arg(long, env = "MOLECULE_SWEEP_HEALTH", value_name = "MOLECULE_SWEEP_HEALTH", default_value = "*/30 * * * * *",
          value_parser = parse_schedule)]
    pub sweep_health: Cron,
    /// S5: idle workspaces hibernated (only when MOLECULE_HIBERNATE_IDLE_SECS is set).
    #[arg(long, env = "MOLECULE_SWEEP_HIBERNATION", value_name = "MOLECULE_SWEEP_HIBERNATION",
          default_value = "0 */5 * * * *", value_parser = parse_schedule)]
    pub sweep_hibernation: Cron,
    /// S6: queued A2A messages past their TTL → expired.
    #[arg(long, env = "MOLECULE_SWEEP_A2A_TTL", value_name = "MOLECULE_SWEEP_A2A_TTL", default_value = "*/30 * * * * *",
          value_parser = parse_schedule)]
    pub sweep_a2a_ttl: Cron,
    /// S7: old rows pruned, table by table.
    #[arg(long, env = "MOLECULE_SWEEP_RETENTION", value_name = "MOLECULE_SWEEP_RETENTION", default_value = "0 */10 * * * *",
          value_parser = parse_schedule)]
    pub sweep_retention: Cron,
    /// Seconds a workspace may stay `provisioning` (its agent never registered) before it
    /// is marked failed with a rescue capture (S1).
    #[arg(long, env = "MOLECULE_PROVISION_TIMEOUT_SECS", value_name = "MOLECULE_PROVISION_TIMEOUT_SECS",
          default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub provision_timeout_secs: u64,
    /// Per-runtime provision timeouts that replace MOLECULE_PROVISION_TIMEOUT_SECS, e.g.
    /// `echo=60,claude-code=900`.
    #[arg(long, env = "MOLECULE_PROVISION_TIMEOUTS", value_name = "MOLECULE_PROVISION_TIMEOUTS", value_delimiter = ',',
          value_parser = parse_runtime_secs)]
    pub provision_timeouts: Vec<(String, u64)>,
    /// S2: the volume of a container with no workspace row (a wiped database) is kept this
    /// long (SPEC RESCUE_VOLUME_GRACE). A failed workspace's container and volume are never
    /// reaped.
    #[arg(long, env = "MOLECULE_RESCUE_VOLUME_GRACE_SECS", value_name = "MOLECULE_RESCUE_VOLUME_GRACE_SECS", default_value_t = 86_400)]
    pub rescue_volume_grace_secs: u64,
    /// S3: tokens younger than this are never revoked (a restart's fresh token).
    #[arg(long, env = "MOLECULE_TOKEN_STALE_GRACE_SECS", value_name = "MOLECULE_TOKEN_STALE_GRACE_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub token_grace_secs: u64,
    /// S4: an external agent that has not heartbeated for this long → awaiting_agent.
    #[arg(long, env = "MOLECULE_HEARTBEAT_STALE_SECS", value_name = "MOLECULE_HEARTBEAT_STALE_SECS", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub heartbeat_stale_secs: u64,
    /// S5: a workspace idle (no A2A message to or from it, no exec) this long is
    /// hibernated; 0 = never.
    #[arg(long, env = "MOLECULE_HIBERNATE_IDLE_SECS", value_name = "MOLECULE_HIBERNATE_IDLE_SECS", default_value_t = 0)]
    pub hibernate_idle_secs: u64,
    /// S7: finished jobs and their exec output are pruned after this many seconds.
    #[arg(long, env = "MOLECULE_JOB_RETENTION_SECS", value_name = "MOLECULE_JOB_RETENTION_SECS", default_value_t = 604_800,
          value_parser = clap::value_parser!(u64).range(60..))]
    pub job_retention_secs: u64,
    /// S7: activity rows (poll inboxes, delivery records).
    #[arg(long, env = "MOLECULE_ACTIVITY_RETENTION_SECS", value_name = "MOLECULE_ACTIVITY_RETENTION_SECS",
          default_value_t = 2_592_000, value_parser = clap::value_parser!(u64).range(60..))]
    pub activity_retention_secs: u64,
    /// S7: finished A2A queue rows.
    #[arg(long, env = "MOLECULE_A2A_RETENTION_SECS", value_name = "MOLECULE_A2A_RETENTION_SECS", default_value_t = 604_800,
          value_parser = clap::value_parser!(u64).range(60..))]
    pub a2a_retention_secs: u64,
    /// S7: exec audit rows.
    #[arg(long, env = "MOLECULE_AUDIT_RETENTION_SECS", value_name = "MOLECULE_AUDIT_RETENTION_SECS", default_value_t = 7_776_000,
          value_parser = clap::value_parser!(u64).range(60..))]
    pub audit_retention_secs: u64,
    /// S7: workspace lifecycle events.
    #[arg(long, env = "MOLECULE_EVENT_RETENTION_SECS", value_name = "MOLECULE_EVENT_RETENTION_SECS", default_value_t = 2_592_000,
          value_parser = clap::value_parser!(u64).range(60..))]
    pub event_retention_secs: u64,
    /// S7: rescue bundles.
    #[arg(long, env = "MOLECULE_RESCUE_RETENTION_SECS", value_name = "MOLECULE_RESCUE_RETENTION_SECS", default_value_t = 2_592_000,
          value_parser = clap::value_parser!(u64).range(60..))]
    pub rescue_retention_secs: u64,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
}

fn parse_pool(s: &str) -> Result<(JobKind, usize), String> {
    let (name, n) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected POOL=CONCURRENCY"))?;
    let kind = JobKind::from_queue(name.trim()).ok_or_else(|| {
        format!("unknown pool {name:?} (pools: provision, stop, restart, rescue_capture, exec, a2a_dispatch, sweep, console)")
    })?;
    let n: usize = n.trim().parse().map_err(|_| format!("{s:?}: concurrency must be a whole number"))?;
    if !(1..=10_000).contains(&n) {
        return Err(format!("{s:?}: concurrency must be between 1 and 10000"));
    }
    Ok((kind, n))
}

fn parse_backend(s: &str) -> Result<String, String> {
    match s {
        "none" | "docker" | "ec2" => Ok(s.to_string()),
        _ => Err(format!("{s:?}: expected docker, ec2 or none")),
    }
}

/// The EC2 backend's settings (SPEC §6); checked together at start when
/// MOLECULE_BACKEND=ec2. Credentials come from the AWS SDK's default chain
/// (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, web identity, instance role).
#[derive(Args, Debug, Clone)]
pub struct Ec2Args {
    /// EC2: the AWS region (required with MOLECULE_BACKEND=ec2).
    #[arg(long = "aws-region", env = "AWS_REGION", value_name = "AWS_REGION")]
    pub region: Option<String>,
    /// EC2: the AWS API endpoint instead of AWS's own (a local AWS API mock, e.g. moto).
    #[arg(long = "aws-endpoint-url", env = "AWS_ENDPOINT_URL", value_name = "AWS_ENDPOINT_URL", value_parser = parse_http_url)]
    pub endpoint_url: Option<String>,
    /// EC2: the AMI workspaces boot (`ami-…`; required): one with cloud-init, Docker
    /// (enabled at boot), curl, coreutils and EC2 Instance Connect — stock Amazon Linux
    /// 2023 has all but Docker, so bake it in.
    #[arg(long = "ec2-ami", env = "MOLECULE_EC2_AMI", value_name = "MOLECULE_EC2_AMI")]
    pub ami: Option<String>,
    /// EC2: the instance type of workspaces.
    #[arg(
        long = "ec2-instance-type",
        env = "MOLECULE_EC2_INSTANCE_TYPE",
        value_name = "MOLECULE_EC2_INSTANCE_TYPE",
        default_value = "t3.small"
    )]
    pub instance_type: String,
    /// EC2: the subnet workspaces launch in (`subnet-…`; unset: the default VPC's).
    #[arg(long = "ec2-subnet-id", env = "MOLECULE_EC2_SUBNET_ID", value_name = "MOLECULE_EC2_SUBNET_ID")]
    pub subnet_id: Option<String>,
    /// EC2: security groups of workspaces, comma-separated (`sg-…`). They must let the
    /// platform reach SSH (22) and the agent's port.
    #[arg(
        long = "ec2-security-group-ids",
        env = "MOLECULE_EC2_SECURITY_GROUP_IDS",
        value_name = "MOLECULE_EC2_SECURITY_GROUP_IDS",
        value_delimiter = ','
    )]
    pub security_group_ids: Vec<String>,
    /// EC2: the OS user EC2 Instance Connect and SSH log in as.
    #[arg(long = "ec2-ssh-user", env = "MOLECULE_EC2_SSH_USER", value_name = "MOLECULE_EC2_SSH_USER", default_value = "ec2-user")]
    pub ssh_user: String,
    /// EC2: `host:port` to SSH to for every instance instead of its private address
    /// (tests map instances to a local sshd). Unset in production.
    #[arg(long = "ec2-ssh-address", env = "MOLECULE_EC2_SSH_ADDRESS", value_name = "MOLECULE_EC2_SSH_ADDRESS", value_parser = parse_host_port)]
    pub ssh_address: Option<String>,
    /// EC2: where an instance keeps its agent's config and secrets (user-data writes
    /// them; rescue reads config.yaml and system-prompt.md there).
    #[arg(long = "ec2-config-dir", env = "MOLECULE_EC2_CONFIG_DIR", value_name = "MOLECULE_EC2_CONFIG_DIR", default_value = "/configs")]
    pub config_dir: String,
    /// EC2: the port the agent listens on, on the instance's private address.
    #[arg(long = "ec2-agent-port", env = "MOLECULE_EC2_AGENT_PORT", value_name = "MOLECULE_EC2_AGENT_PORT", default_value_t = 8000,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub agent_port: u16,
}

fn parse_http_url(s: &str) -> Result<String, String> {
    let u = url::Url::parse(s).map_err(|e| format!("{s:?}: not a URL ({e})"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(format!("{s:?}: expected an http(s) URL with a host"));
    }
    Ok(s.to_string())
}

fn parse_host_port(s: &str) -> Result<String, String> {
    let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("{s:?}: expected HOST:PORT"))?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!("{s:?}: expected HOST:PORT with a port from 1 to 65535"));
    }
    Ok(s.to_string())
}

/// `prefix-` followed by hex digits: the shape of an AWS resource id.
fn aws_id(value: &str, prefix: &str) -> bool {
    value.strip_prefix(prefix).is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl Ec2Args {
    /// The backend's configuration, or the first setting that is missing or malformed
    /// (named by its variable).
    pub fn config(&self, limits: molecule_backends::isolation::TierLimits) -> Result<molecule_backends::ec2::Ec2Config, String> {
        let region = self.region.clone().filter(|r| !r.trim().is_empty()).ok_or("AWS_REGION is required with MOLECULE_BACKEND=ec2")?;
        if !region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return Err(format!("AWS_REGION={region:?}: expected a region name such as us-east-1"));
        }
        let ami = self.ami.clone().ok_or("MOLECULE_EC2_AMI is required with MOLECULE_BACKEND=ec2")?;
        if !aws_id(&ami, "ami-") {
            return Err(format!("MOLECULE_EC2_AMI={ami:?}: expected an AMI id (ami-…)"));
        }
        if self.instance_type.is_empty() || !self.instance_type.contains('.') {
            return Err(format!("MOLECULE_EC2_INSTANCE_TYPE={:?}: expected an instance type such as t3.small", self.instance_type));
        }
        if let Some(subnet) = &self.subnet_id {
            if !aws_id(subnet, "subnet-") {
                return Err(format!("MOLECULE_EC2_SUBNET_ID={subnet:?}: expected a subnet id (subnet-…)"));
            }
        }
        let groups: Vec<String> = self.security_group_ids.iter().map(|g| g.trim().to_string()).filter(|g| !g.is_empty()).collect();
        if let Some(bad) = groups.iter().find(|g| !aws_id(g, "sg-")) {
            return Err(format!("MOLECULE_EC2_SECURITY_GROUP_IDS: {bad:?} is not a security group id (sg-…)"));
        }
        if self.ssh_user.is_empty() || !self.ssh_user.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            return Err(format!("MOLECULE_EC2_SSH_USER={:?}: expected a user name", self.ssh_user));
        }
        // It is chmod 0700'd and bind-mounted (`-v DIR:/configs`): never `/`, no `:` or `,`.
        let dir = self.config_dir.trim_end_matches('/');
        const SYSTEM: [&str; 18] = [
            "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys",
            "/tmp", "/usr", "/var",
        ];
        if !self.config_dir.starts_with('/')
            || dir.is_empty()
            || SYSTEM.contains(&dir)
            || dir.split('/').any(|part| part == "..")
            || dir.chars().any(|c| c == ':' || c == ',' || c.is_control())
        {
            return Err(format!(
                "MOLECULE_EC2_CONFIG_DIR={:?}: expected an absolute directory of its own, not / or a system directory (no `..`, `:` or `,`)",
                self.config_dir
            ));
        }
        Ok(molecule_backends::ec2::Ec2Config {
            region,
            endpoint_url: self.endpoint_url.clone(),
            ami,
            instance_type: self.instance_type.clone(),
            subnet_id: self.subnet_id.clone(),
            security_group_ids: groups,
            ssh_user: self.ssh_user.clone(),
            ssh_address: self.ssh_address.clone(),
            config_dir: dir.to_string(),
            agent_port: self.agent_port,
            limits,
        })
    }
}

impl WorkerArgs {
    pub fn concurrency(&self) -> HashMap<JobKind, usize> {
        self.pools.iter().copied().collect()
    }

    pub fn runtime_config(&self) -> molecule_jobs::RuntimeConfig {
        let lease = Duration::from_secs(self.lease_secs);
        molecule_jobs::RuntimeConfig {
            lease,
            heartbeat: (lease / 6).max(Duration::from_millis(300)),
            poll_interval: Duration::from_millis(self.poll_ms),
            grace: Duration::from_secs(self.grace_secs),
            batch: self.claim_batch as usize,
            ..Default::default()
        }
    }
}

impl SchedulerArgs {
    pub fn config(&self) -> molecule_scheduler::SchedulerConfig {
        use molecule_jobs::sweeper::{Retention, SweepArgs, Sweeper};
        let settings = |s: Sweeper| {
            let mut a = SweepArgs::new(s);
            match s {
                Sweeper::ProvisionTimeout => {
                    a.timeout_s = Some(self.provision_timeout_secs);
                    a.runtime_timeout_s = self.provision_timeouts.iter().cloned().collect();
                }
                Sweeper::Orphans => a.volume_grace_s = Some(self.rescue_volume_grace_secs),
                Sweeper::StaleTokens => a.grace_s = Some(self.token_grace_secs),
                Sweeper::Health => a.heartbeat_stale_s = Some(self.heartbeat_stale_secs),
                Sweeper::Hibernation => a.idle_s = Some(self.hibernate_idle_secs),
                Sweeper::Retention => {
                    a.retention = Some(Retention {
                        jobs_s: self.job_retention_secs,
                        activity_s: self.activity_retention_secs,
                        a2a_s: self.a2a_retention_secs,
                        audit_s: self.audit_retention_secs,
                        events_s: self.event_retention_secs,
                        rescue_s: self.rescue_retention_secs,
                    })
                }
                Sweeper::A2aTtl => {}
            }
            a
        };
        let schedules = [
            (Sweeper::ProvisionTimeout, &self.sweep_provision_timeout),
            (Sweeper::Orphans, &self.sweep_orphans),
            (Sweeper::StaleTokens, &self.sweep_stale_tokens),
            (Sweeper::Health, &self.sweep_health),
            (Sweeper::Hibernation, &self.sweep_hibernation),
            (Sweeper::A2aTtl, &self.sweep_a2a_ttl),
            (Sweeper::Retention, &self.sweep_retention),
        ]
        .into_iter()
        .filter_map(|(s, c)| c.0.clone().map(|cron| molecule_scheduler::Schedule { cron, args: settings(s) }))
        .collect();
        // Fired ticks outlive every job (twice the job retention, at least 30 days).
        let tick_retention = Duration::from_secs((2 * self.job_retention_secs).max(30 * 24 * 3600));
        molecule_scheduler::SchedulerConfig { schedules, tick_retention }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweepers_can_be_switched_off_one_by_one() {
        // Flags win over the environment (tests/run.sh sets MOLECULE_SWEEP_ORPHANS=off).
        let cli = Cli::try_parse_from([
            "molecule",
            "scheduler",
            "--sweep-hibernation",
            "off",
            "--sweep-health",
            "*/2 * * * * *",
            "--sweep-orphans",
            "0 * * * * *",
            "--provision-timeouts",
            "echo=60,claude-code=900",
        ])
        .unwrap();
        let Some(Command::Scheduler(args)) = cli.command else { panic!("scheduler") };
        let cfg = args.config();
        assert_eq!(cfg.schedules.len(), 6);
        assert!(cfg.schedules.iter().all(|s| s.args.sweeper != molecule_jobs::sweeper::Sweeper::Hibernation));
        let s1 = cfg.schedules.iter().find(|s| s.args.sweeper == molecule_jobs::sweeper::Sweeper::ProvisionTimeout).unwrap();
        assert_eq!(s1.args.runtime_timeout_s.get("claude-code"), Some(&900));
    }

    #[test]
    fn pools_parse_and_bad_ones_are_named() {
        assert_eq!(parse_pool("exec=16").unwrap(), (JobKind::Exec, 16));
        assert!(parse_pool("exec").unwrap_err().contains("POOL=CONCURRENCY"));
        assert!(parse_pool("nope=1").unwrap_err().contains("unknown pool"));
        assert!(parse_pool("exec=0").is_err());
    }

    #[test]
    fn bad_env_value_error_names_the_variable() {
        let err = Cli::try_parse_from(["molecule", "serve", "--listen", "not-an-addr"]).unwrap_err().to_string();
        assert!(err.contains("LISTEN_ADDR"), "{err}");
        let err = Cli::try_parse_from(["molecule", "worker", "--pool", "bogus=2"]).unwrap_err().to_string();
        assert!(err.contains("MOLECULE_POOLS"), "{err}");
        let err = Cli::try_parse_from(["molecule", "scheduler", "--sweep-orphans", "every minute"]).unwrap_err().to_string();
        assert!(err.contains("MOLECULE_SWEEP_ORPHANS"), "{err}");
        let err = Cli::try_parse_from(["molecule", "scheduler", "--provision-timeouts", "echo"]).unwrap_err().to_string();
        assert!(err.contains("MOLECULE_PROVISION_TIMEOUTS"), "{err}");
    }

    fn ec2(args: &[&str]) -> Result<molecule_backends::ec2::Ec2Config, String> {
        let mut argv = vec!["molecule", "worker", "--backend", "ec2"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Some(Command::Worker(w)) = cli.command else { panic!("worker") };
        w.ec2.config(Default::default())
    }

    #[test]
    fn ec2_settings_are_checked_together_and_named() {
        let ok = ec2(&[
            "--aws-region",
            "eu-west-1",
            "--ec2-ami",
            "ami-0abc12",
            "--ec2-security-group-ids",
            "sg-01,sg-02",
            "--ec2-subnet-id",
            "subnet-0f",
            "--ec2-ssh-address",
            "127.0.0.1:2222",
            "--aws-endpoint-url",
            "http://127.0.0.1:5000",
        ])
        .unwrap();
        assert_eq!((ok.region.as_str(), ok.ami.as_str(), ok.instance_type.as_str()), ("eu-west-1", "ami-0abc12", "t3.small"));
        assert_eq!(ok.security_group_ids, vec!["sg-01", "sg-02"]);
        assert_eq!((ok.ssh_user.as_str(), ok.config_dir.as_str(), ok.agent_port), ("ec2-user", "/configs", 8000));
        for (args, names) in [
            (vec!["--ec2-ami", "ami-0abc"], "AWS_REGION"),
            (vec!["--aws-region", "eu-west-1"], "MOLECULE_EC2_AMI"),
            (vec!["--aws-region", "eu-west-1", "--ec2-ami", "image-1"], "MOLECULE_EC2_AMI"),
            (vec!["--aws-region", "eu-west-1", "--ec2-ami", "ami-0a", "--ec2-subnet-id", "vpc-1"], "MOLECULE_EC2_SUBNET_ID"),
            (
                vec!["--aws-region", "eu-west-1", "--ec2-ami", "ami-0a", "--ec2-security-group-ids", "sg-1,default"],
                "MOLECULE_EC2_SECURITY_GROUP_IDS",
            ),
            (vec!["--aws-region", "eu-west-1", "--ec2-ami", "ami-0a", "--ec2-ssh-user", "root; rm"], "MOLECULE_EC2_SSH_USER"),
            (vec!["--aws-region", "eu-west-1", "--ec2-ami", "ami-0a", "--ec2-config-dir", "configs"], "MOLECULE_EC2_CONFIG_DIR"),
            (vec!["--aws-region", "eu-west-1", "--ec2-ami", "ami-0a", "--ec2-config-dir", "/"], "MOLECULE_EC2_CONFIG_DIR"),
            (vec!["--aws-region", "eu-west-1", "--ec2-ami", "ami-0a", "--ec2-config-dir", "/etc/"], "MOLECULE_EC2_CONFIG_DIR"),
            (vec!["--aws-region", "eu-west-1", "--ec2-ami", "ami-0a", "--ec2-config-dir", "/srv/a:b"], "MOLECULE_EC2_CONFIG_DIR"),
            (vec!["--aws-region", "eu-west-1", "--ec2-ami", "ami-0a", "--ec2-config-dir", "/srv/../etc"], "MOLECULE_EC2_CONFIG_DIR"),
            (vec!["--aws-region", "eu-west-1", "--ec2-ami", "ami-0a", "--ec2-ssh-address", "127.0.0.1"], "MOLECULE_EC2_SSH_ADDRESS"),
            (vec!["--aws-region", "eu-west-1", "--ec2-ami", "ami-0a", "--aws-endpoint-url", "ftp://x"], "AWS_ENDPOINT_URL"),
        ] {
            let err = ec2(&args).unwrap_err();
            assert!(err.contains(names), "{args:?}: {err}");
        }
    }

    #[test]
    fn help_documents_every_ec2_variable() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let help = cmd.find_subcommand_mut("serve").unwrap().render_long_help().to_string();
        for var in [
            "MOLECULE_BACKEND",
            "AWS_REGION",
            "AWS_ENDPOINT_URL",
            "MOLECULE_EC2_AMI",
            "MOLECULE_EC2_INSTANCE_TYPE",
            "MOLECULE_EC2_SUBNET_ID",
            "MOLECULE_EC2_SECURITY_GROUP_IDS",
            "MOLECULE_EC2_SSH_USER",
            "MOLECULE_EC2_SSH_ADDRESS",
            "MOLECULE_EC2_CONFIG_DIR",
            "MOLECULE_EC2_AGENT_PORT",
        ] {
            assert!(help.contains(var), "{var} missing from serve --help");
        }
    }
}
