//! `molecule`: one binary, one role per subcommand (SPEC §1).

mod config;
mod ops;

use clap::Parser;
use config::{ApiArgs, Cli, Command, Common, OrgCommand, SchedulerArgs, TokenCommand, WorkerArgs};
use molecule_domain::db;
use molecule_domain::embedded_pg::EmbeddedPostgres;
use sqlx::PgPool;
use std::process::ExitCode;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("DATABASE_URL is not set: `{0}` needs it (only `serve` and the `org` commands use the embedded PostgreSQL)")]
    NoDatabaseUrl(&'static str),
    #[error("embedded PostgreSQL: {0}")]
    Embedded(#[from] molecule_domain::embedded_pg::EmbeddedPgError),
    #[error("{0}")]
    Db(#[from] db::DbError),
    #[error("LISTEN_ADDR {addr}: cannot listen: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("API server failed: {0}")]
    Serve(std::io::Error),
    #[error("{0}")]
    Org(OrgError),
    #[error("data directory {0}: {1}")]
    DataDir(&'static str, std::io::Error),
    #[error("MOLECULE_BACKEND={0}: {1}")]
    Backend(&'static str, molecule_backends::BackendError),
    #[error("MOLECULE_BACKEND=ec2: {0}")]
    Ec2Config(String),
    #[error("{0}")]
    AgentClient(String),
}

fn main() -> ExitCode {
    // No subcommand means `serve`, with its flags and environment applied as for `serve`.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut as_serve = args.clone();
    as_serve.insert(1.min(as_serve.len()), "serve".into());
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) if cli.command.is_some() => cli,
        Ok(_) => Cli::parse_from(as_serve),
        Err(e) => match Cli::try_parse_from(&as_serve) {
            Ok(cli) if !matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion) => cli,
            _ => e.exit(),
        },
    };
    // The operator commands are HTTP clients of a running API: no logs, no database.
    let cli = match cli.command {
        Some(Command::Ops(op)) => return ops::main(op),
        command => Cli { command, ..cli },
    };
    init_tracing(&cli.common);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "molecule stopped with an error");
            eprintln!("molecule: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Human-readable text for a person at a terminal, JSON for everything else (log
/// collectors); MOLECULE_LOG_FORMAT overrides. Colour only where a terminal shows it.
fn init_tracing(common: &Common) {
    use std::io::IsTerminal;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let terminal = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(terminal);
    let json = match common.log_format.as_deref() {
        Some(f) => f == "json",
        None => !terminal,
    };
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// The embedded cluster's directory: MOLECULE_DATA_DIR as given, else the default (see
/// `embedded_pg::default_data_dir`), logged with its path either way.
fn embedded_data_dir(common: &Common) -> Result<std::path::PathBuf, StartError> {
    if let Some(dir) = &common.data_dir {
        tracing::info!(data_dir = %dir.display(), "data directory (MOLECULE_DATA_DIR)");
        return Ok(dir.clone());
    }
    let chosen = molecule_domain::embedded_pg::default_data_dir(std::path::Path::new(DEFAULT_DATA_DIR))
        .map_err(|e| StartError::DataDir(DEFAULT_DATA_DIR, e))?;
    match &chosen.relocated_from {
        Some((from, blocked)) => tracing::info!(
            data_dir = %chosen.path.display(),
            "data directory: {} is not reachable by the postgres user ({} does not let it in), so the embedded \
             PostgreSQL lives in {} (set MOLECULE_DATA_DIR to choose)",
            from.display(), blocked.display(), chosen.path.display()
        ),
        None => tracing::info!(data_dir = %chosen.path.display(), "data directory"),
    }
    Ok(chosen.path)
}

const DEFAULT_DATA_DIR: &str = "./.molecule";

async fn run(cli: Cli) -> Result<(), StartError> {
    // Before anything else: a SIGTERM that arrives during start-up (say, from an
    // orchestrator) must lead to the same graceful stop, not the default instant death
    // that would leave the embedded PostgreSQL running.
    let serving = !matches!(cli.command, Some(Command::Migrate) | Some(Command::Org { .. }));
    let stop = serving.then(Stop::install);
    if serving {
        // Before any pool starts: pools take their metric handles once (jobs::metrics).
        molecule_api::metrics::install();
    }
    let common = cli.common;
    match cli.command.expect("defaulted to serve above") {
        Command::Org { command } => org_command(&common, command).await,
        Command::Ops(_) => unreachable!("the operator commands return from main before this"),
        Command::Migrate => {
            let db = connect(&common, "migrate").await?;
            db::migrate(&db).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Serve(args) => {
            // The embedded cluster lives until this function returns (Drop stops it).
            let mut embedded = None;
            let url = match &common.database_url {
                Some(u) => u.clone(),
                None => {
                    let dir = embedded_data_dir(&common)?;
                    let pg = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&dir))
                        .await
                        .map_err(|e| StartError::Serve(std::io::Error::other(e)))??;
                    let url = pg.database_url();
                    embedded = Some(pg);
                    url
                }
            };
            // One pool per role (see README, "Connections"): the API's requests, the
            // handlers' work and the scheduler never wait for each other's connections.
            let api_db = connect_url(&url, common.db_max_connections).await?;
            db::migrate(&api_db).await?;
            let jobs_db = connect_url(&url, common.db_max_connections).await?;
            let sched_db = connect_url(&url, SCHEDULER_CONNECTIONS).await?;
            let mut worker = args.worker;
            if worker.platform_url.is_none() {
                worker.platform_url = Some(format!("http://{}", args.api.listen));
            }
            let roles = Roles {
                api: Some((api_db.clone(), args.api)),
                worker: Some((jobs_db.clone(), worker)),
                scheduler: Some((sched_db.clone(), args.scheduler)),
            };
            let res = serve_roles(stop.unwrap_or_else(Stop::install), roles, &common).await;
            for db in [api_db, jobs_db, sched_db] {
                db.close().await;
            }
            if let Some(mut pg) = embedded {
                tokio::task::spawn_blocking(move || pg.stop()).await.ok();
            }
            res
        }
        Command::Api(args) => {
            let db = connect(&common, "api").await?;
            serve_roles(stop.unwrap_or_else(Stop::install), Roles { api: Some((db, args)), ..Roles::default() }, &common).await
        }
        Command::Worker(args) => {
            let db = connect(&common, "worker").await?;
            serve_roles(stop.unwrap_or_else(Stop::install), Roles { worker: Some((db, args)), ..Roles::default() }, &common).await
        }
        Command::Scheduler(args) => {
            let url = common.database_url.as_deref().ok_or(StartError::NoDatabaseUrl("scheduler"))?;
            let db = connect_url(url, SCHEDULER_CONNECTIONS).await?;
            serve_roles(stop.unwrap_or_else(Stop::install), Roles { scheduler: Some((db, args)), ..Roles::default() }, &common).await
        }
    }
}

/// The scheduler enqueues a handful of jobs a minute.
const SCHEDULER_CONNECTIONS: u32 = 2;

/// The roles one process runs, each with its own connection pool.
#[derive(Default)]
struct Roles {
    api: Option<(PgPool, ApiArgs)>,
    worker: Option<(PgPool, WorkerArgs)>,
    scheduler: Option<(PgPool, SchedulerArgs)>,
}

#[derive(Debug, thiserror::Error)]
enum OrgError {
    #[error("{0} is not an id (a UUID)")]
    BadId(&'static str),
    #[error("no live token {0} in that organization")]
    NoSuchToken(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

async fn org_command(common: &Common, command: OrgCommand) -> Result<(), StartError> {
    // Without DATABASE_URL, use the embedded cluster of MOLECULE_DATA_DIR (the one `serve`
    // runs): started for this command if need be, and stopped after unless another process
    // of ours (`serve`) still uses it (embedded_pg.rs: users.lock).
    let mut embedded = None;
    let db = match &common.database_url {
        Some(u) => connect_url(u, 2).await?,
        None => {
            let dir = embedded_data_dir(common)?;
            let pg = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&dir))
                .await
                .map_err(|e| StartError::Serve(std::io::Error::other(e)))??;
            let db = connect_url(&pg.database_url(), 2).await?;
            embedded = Some(pg);
            db
        }
    };
    let res = org_command_on(&db, command).await;
    db.close().await;
    if let Some(pg) = embedded {
        tokio::task::spawn_blocking(move || drop(pg)).await.ok();
    }
    res
}

async fn org_command_on(db: &PgPool, command: OrgCommand) -> Result<(), StartError> {
    db::migrate(db).await?;
    let mut conn = db.acquire().await.map_err(|e| StartError::Org(e.into()))?;
    let res = async {
        match command {
            OrgCommand::Create { name, json } => {
                let name = name.trim().to_string();
                let (org, token) = molecule_domain::tokens::create_org(&mut conn, &name).await?;
                if json {
                    println!("{}", serde_json::json!({ "org_id": org.to_string(), "token": token }));
                } else {
                    println!("org_id: {org}\ntoken:  {token}\n(the token is shown once; store it now)");
                }
            }
            OrgCommand::Token { command: TokenCommand::Create { org_id, label, json } } => {
                let org = org_id.parse().map_err(|_| OrgError::BadId("org_id"))?;
                let (id, token) = molecule_domain::tokens::create_org_token(&mut conn, org, label.as_deref()).await?;
                if json {
                    println!("{}", serde_json::json!({ "token_id": id.to_string(), "token": token }));
                } else {
                    println!("token_id: {id}\ntoken:    {token}\n(the token is shown once; store it now)");
                }
            }
            OrgCommand::Token { command: TokenCommand::Revoke { org_id, token_id } } => {
                let org = org_id.parse().map_err(|_| OrgError::BadId("org_id"))?;
                let id = token_id.parse().map_err(|_| OrgError::BadId("token_id"))?;
                if !molecule_domain::tokens::revoke_org_token(&mut conn, org, id).await? {
                    return Err(OrgError::NoSuchToken(token_id));
                }
                println!("revoked {id}");
            }
        }
        Ok::<(), OrgError>(())
    }
    .await;
    res.map_err(StartError::Org)
}

async fn connect(common: &Common, role: &'static str) -> Result<PgPool, StartError> {
    let url = common.database_url.as_deref().ok_or(StartError::NoDatabaseUrl(role))?;
    connect_url(url, common.db_max_connections).await
}

/// Connects, waiting up to 30 s for a database that is still starting.
async fn connect_url(url: &str, max: u32) -> Result<PgPool, StartError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match db::connect(url, max).await {
            Ok(p) => return Ok(p),
            Err(db::DbError::Connect(e)) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "PostgreSQL not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Runs the given roles until SIGTERM or Ctrl-C, then stops them together: the API stops
/// taking requests (streams get their final frame), the scheduler stops firing, the pools
/// stop claiming and finish, interrupt or hand back their jobs.
async fn serve_roles(mut stop: Stop, roles: Roles, common: &Common) -> Result<(), StartError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    // Kept here so that, in a process that also runs pools, it can wake them directly.
    let mut announcer = None;

    let api_task = match roles.api {
        Some((db, a)) => {
            let listener = tokio::net::TcpListener::bind(a.listen).await.map_err(|source| StartError::Listen { addr: a.listen, source })?;
            tracing::info!(addr = %a.listen, "API listening");
            let mut rx = stop_rx.clone();
            let auth = a.auth(common);
            if auth.dev {
                tracing::warn!("DEV MODE (MOLECULE_DEV=1): admin routes are open without a token; never run this way in production");
            }
            if auth.admin_token.is_none() && !auth.dev {
                tracing::info!("ADMIN_TOKEN not set: admin routes are refused");
            }
            if auth.org_pin == molecule_api::OrgPin::Misconfigured {
                tracing::error!("MOLECULE_ORG_ID is set but empty: every tenant route answers 503 platform_misconfigured");
            }
            let state = molecule_api::AppState::with_streams_per_org(db, auth, a.streams_per_org as usize);
            announcer = Some(state.announcer.clone());
            Some(tokio::spawn(molecule_api::serve_with(
                listener,
                state,
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                },
                a.http_limits(),
            )))
        }
        None => None,
    };

    let api_serves_metrics = api_task.is_some();
    let mut metrics_task = None;
    let runtime = match roles.worker {
        Some((db, w)) => {
            if let (Some(addr), false) = (w.metrics_listen, api_serves_metrics) {
                let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| StartError::Listen { addr, source })?;
                tracing::info!(addr = %addr, "worker metrics listening (/metrics, /healthz)");
                let mut rx = stop_rx.clone();
                metrics_task = Some(tokio::spawn(molecule_api::metrics::serve_alone(listener, db.clone(), async move {
                    let _ = rx.wait_for(|s| *s).await;
                })));
            }
            let backend = select_backend(&w, &db).await?;
            tracing::info!(backend = backend.name(), "workspace backend");
            if backend.name() == "none" {
                tracing::warn!("no workspace backend: provision, stop and restart jobs fail with `no backend configured`");
            }
            if backend.name() == "docker" && w.docker_network == "host" && !common.dev() {
                tracing::warn!(
                    "WORKSPACE CONTAINERS USE HOST NETWORKING (MOLECULE_DOCKER_NETWORK=host): every workspace shares this host's \
                     network stack, loopback included. Fine for a local install; in production set MOLECULE_DOCKER_NETWORK to a \
                     bridge network of its own and PLATFORM_URL to an address workspaces reach on it."
                );
            }
            let deps = molecule_workers::Deps {
                db: db.clone(),
                backend,
                platform_url: w.platform_url.clone().unwrap_or_else(|| "http://127.0.0.1:8080".into()),
                registry: molecule_backends::image::registry_prefix(Some(&w.image_registry)),
                image_local_override: w.image_local_override == "1",
                redactor: Some(std::sync::Arc::new(molecule_domain::redact::shared().clone())),
                loki_url: w.loki_url.clone().filter(|u| !u.is_empty()),
                agents: molecule_workers::a2a::AgentClient::new(common.allow_loopback_agents()).map_err(StartError::AgentClient)?,
            };
            let specs = molecule_workers::handlers::pool_specs(&deps, &w.concurrency());
            let runtime = molecule_jobs::Runtime::start(db, w.runtime_config(), specs);
            if let Some(a) = &announcer {
                a.wake_locally(runtime.local_wakers());
            }
            Some(runtime)
        }
        None => None,
    };

    let sched_task = roles.scheduler.map(|(db, s)| tokio::spawn(molecule_scheduler::run(db, s.config(), stop_rx.clone())));

    let mut api_task = api_task;
    let mut result = Ok(());
    // Run until a signal, or until the API server dies on its own (then stop the rest too).
    let api_ended = match api_task.as_mut() {
        Some(t) => tokio::select! {
            _ = stop.wait() => None,
            r = t => Some(r),
        },
        None => {
            stop.wait().await;
            None
        }
    };
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    // All at once: the pools stop claiming the moment the signal arrives, not after the
    // API's shutdown timeout, and the total is the longest of the three, not their sum.
    let api = async {
        match (api_ended, api_task) {
            (Some(r), _) => Some(r),
            (None, Some(t)) => Some(t.await),
            (None, None) => None,
        }
    };
    let scheduler = async {
        if let Some(t) = sched_task {
            let _ = t.await;
        }
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
    };
    let pools = async {
        if let Some(rt) = runtime {
            let report = rt.shutdown().await;
            tracing::info!(
                released = report.released,
                interrupted = report.interrupted,
                stale_acks = report.stale_acks,
                "worker pools stopped"
            );
        }
    };
    let (api_outcome, (), ()) = tokio::join!(api, scheduler, pools);
    if let Some(Ok(Err(e))) = api_outcome {
        result = Err(StartError::Serve(e));
    }
    result
}

/// MOLECULE_BACKEND: docker (must answer), ec2 (configured, and its API answers), none,
/// or unset (docker when an engine answers).
async fn select_backend(w: &WorkerArgs, db: &sqlx::PgPool) -> Result<std::sync::Arc<dyn molecule_backends::Backend>, StartError> {
    use molecule_backends::docker::{DockerBackend, DockerConfig};
    let cfg = DockerConfig {
        network_mode: w.docker_network.clone(),
        platform: w.image_platform.clone(),
        direct_volume_writes: true,
        limits: w.tier_limits.clone(),
        read_only_root: w.workspace_read_only == "1",
    };
    match w.backend.as_deref() {
        Some("none") => Ok(std::sync::Arc::new(molecule_backends::NoBackend)),
        Some("ec2") => {
            let cfg = w.ec2.config(w.tier_limits.clone()).map_err(StartError::Ec2Config)?;
            let store = std::sync::Arc::new(molecule_workers::instances::DbInstances::new(db.clone()));
            let backend = molecule_backends::ec2::Ec2Backend::connect(cfg, store).await.map_err(|e| StartError::Backend("ec2", e))?;
            Ok(std::sync::Arc::new(backend))
        }
        Some(_) => Ok(std::sync::Arc::new(DockerBackend::connect(cfg).await.map_err(|e| StartError::Backend("docker", e))?)),
        None => match DockerBackend::connect(cfg).await {
            Ok(d) => Ok(std::sync::Arc::new(d)),
            Err(e) => {
                tracing::info!(error = %e, "no Docker engine answers; running without a workspace backend");
                Ok(std::sync::Arc::new(molecule_backends::NoBackend))
            }
        },
    }
}

/// SIGTERM and SIGINT, caught from the first moment of the process.
struct Stop {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Stop {
    fn install() -> Stop {
        use tokio::signal::unix::{SignalKind, signal};
        let take = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, signal = name, "cannot install a signal handler");
                None
            }
        };
        Stop { term: take(SignalKind::terminate(), "SIGTERM"), int: take(SignalKind::interrupt(), "SIGINT") }
    }

    /// Resolves on SIGTERM or SIGINT (also one that arrived before this was awaited).
    async fn wait(&mut self) {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.term) => tracing::info!("SIGTERM received"),
            _ = recv(&mut self.int) => tracing::info!("SIGINT received"),
        }
    }
}
