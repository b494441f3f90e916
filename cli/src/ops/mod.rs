//! Operator commands: `molecule queues`, `molecule jobs …`, `molecule workspaces …`.
//! They are HTTP clients of a running API (`serve` or `api`): the API validates, writes
//! and enqueues; these commands never open the database.

mod client;
mod jobs;
mod render;
mod workspaces;

use clap::{Args, Subcommand};
use std::process::ExitCode;
use url::Url;

pub use client::Failure;
use client::{Client, parse_api_url};

/// Shown under every operator command's `--help`.
const AFTER_HELP: &str = "\
These commands are HTTP clients of a running API (`molecule serve` or `molecule api`); they never open the database.
Progress (--wait) goes to standard error; results (a table, or the API's JSON with --json) to standard output.

Exit status:
  0  done (with --wait: the workspace is online, or removed and stopped)
  1  the API refused the request (its message is printed), or the workspace or its stop job failed (the reason is printed)
  2  usage: a bad flag or value, or no token
  3  the API could not be reached, or --wait gave up at --timeout";

#[derive(Subcommand, Debug)]
pub enum OpsCommand {
    /// Queue depth, oldest waiting job and live workers per pool (GET /queues; ADMIN_TOKEN:
    /// every org; an org token: its own jobs).
    #[command(after_help = AFTER_HELP)]
    Queues(QueuesArgs),
    /// Jobs of your organization: list, show, retry, cancel (an organization token).
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Workspaces of your organization: list, show, create, delete (an organization token).
    Workspaces {
        #[command(subcommand)]
        command: WorkspacesCommand,
    },
}

/// Where the API is and who is calling: an organization token.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "API")]
pub struct Conn {
    /// The API's base URL.
    #[arg(long, env = "MOLECULE_URL", value_name = "URL", default_value = "http://127.0.0.1:8080", value_parser = parse_api_url)]
    pub url: Url,
    /// An organization token (`molecule org create` prints one).
    #[arg(long, env = "MOLECULE_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the API's JSON instead of a table (with --wait: the workspace as it ended).
    #[arg(long)]
    pub json: bool,
}

impl Conn {
    fn client(&self) -> Result<Client, Failure> {
        let token = self.token.clone().filter(|t| !t.trim().is_empty()).ok_or_else(|| {
            Failure::Usage(
                "no token: pass --token or set MOLECULE_TOKEN to an organization token (`molecule org create` prints one)".into(),
            )
        })?;
        Client::new(self.url.clone(), token.trim().to_string())
    }
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "API")]
pub struct QueuesArgs {
    /// The API's base URL.
    #[arg(long, env = "MOLECULE_URL", value_name = "URL", default_value = "http://127.0.0.1:8080", value_parser = parse_api_url)]
    pub url: Url,
    /// The server's ADMIN_TOKEN (every org), or an org token (its own jobs) [default:
    /// MOLECULE_TOKEN when ADMIN_TOKEN is unset].
    #[arg(long, env = "ADMIN_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the API's JSON (one object per pool) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum JobsCommand {
    /// Jobs, newest first (GET /jobs): one page, filtered.
    #[command(after_help = AFTER_HELP)]
    List(JobsList),
    /// One job with its attempts and result (GET /jobs/{id}).
    #[command(after_help = AFTER_HELP)]
    Show(JobId),
    /// Runs a retrying, failed, dead, cancelled or interrupted job again now (POST /jobs/{id}/retry).
    #[command(after_help = AFTER_HELP)]
    Retry(JobId),
    /// Cancels a pending, scheduled or retrying (awaiting its retry) job (POST /jobs/{id}/cancel).
    #[command(after_help = AFTER_HELP)]
    Cancel(JobId),
}

#[derive(Args, Debug)]
pub struct JobsList {
    /// Only jobs in this status: pending, scheduled, running, retrying, succeeded, failed, dead,
    /// expired, cancelled or interrupted.
    #[arg(long)]
    pub status: Option<String>,
    /// Only jobs of this kind, i.e. in this queue: provision, stop, restart,
    /// rescue_capture, exec, a2a_dispatch, sweep or console.
    #[arg(long, visible_alias = "queue")]
    pub kind: Option<String>,
    /// Only this workspace's jobs.
    #[arg(long, value_name = "WORKSPACE_ID")]
    pub workspace: Option<String>,
    #[command(flatten)]
    pub page: Page,
    #[command(flatten)]
    pub conn: Conn,
}

/// Which page of a listing.
#[derive(Args, Debug)]
pub struct Page {
    /// Items per page (1–200) [API default: 50].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=200))]
    pub limit: Option<u16>,
    /// The next page: the cursor a previous listing printed.
    #[arg(long)]
    pub cursor: Option<String>,
}

impl Page {
    /// As query parameters of the API's listings.
    pub fn query(self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        if let Some(l) = self.limit {
            q.push(("limit", l.to_string()));
        }
        if let Some(c) = self.cursor {
            q.push(("cursor", c));
        }
        q
    }
}

#[derive(Args, Debug)]
pub struct JobId {
    /// The job's id (a ULID, as `jobs list` shows it).
    pub id: String,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Subcommand, Debug)]
pub enum WorkspacesCommand {
    /// Workspaces that are not removed, newest first (GET /workspaces): one page.
    #[command(after_help = AFTER_HELP)]
    List(WorkspacesList),
    /// One workspace (GET /workspaces/{id}).
    #[command(after_help = AFTER_HELP)]
    Show(WorkspaceId),
    /// Creates a workspace (POST /workspaces); with --wait, shows its progress until it is
    /// online (exit 0) or failed (exit 1, with the reason).
    #[command(after_help = AFTER_HELP)]
    Create(WorkspaceCreate),
    /// Removes a workspace and its descendants (DELETE /workspaces/{id}); with --wait,
    /// until their stop jobs have taken the containers or instances away.
    #[command(after_help = AFTER_HELP)]
    Delete(WorkspaceDelete),
}

#[derive(Args, Debug)]
pub struct WorkspacesList {
    #[command(flatten)]
    pub page: Page,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args, Debug)]
pub struct WorkspaceId {
    /// The workspace's id (a UUID).
    pub id: String,
    #[command(flatten)]
    pub conn: Conn,
}

/// --wait and --timeout.
#[derive(Args, Debug, Clone, Copy)]
pub struct Wait {
    /// Wait, showing progress on standard error, until the work is done or has failed.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds (exit 3; the work goes on).
    #[arg(long, value_name = "SECS", default_value_t = 900, requires = "wait", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: u64,
}

#[derive(Args, Debug)]
pub struct WorkspaceCreate {
    /// Its name: 1–200 characters.
    pub name: String,
    /// Its runtime: echo, claude-code, langgraph, …, or external (an agent that registers
    /// itself: no provisioning, it waits for the agent).
    #[arg(long)]
    pub runtime: String,
    /// Its tier, 1–4 [API default: 2]; tier 3 and up may run commands (exec).
    #[arg(long, value_parser = clap::value_parser!(i16).range(1..=4))]
    pub tier: Option<i16>,
    /// How A2A messages reach its agent [API default: push; poll for external].
    #[arg(long, value_parser = ["push", "poll"])]
    pub delivery_mode: Option<String>,
    /// Its parent: a workspace of the same organization.
    #[arg(long, value_name = "WORKSPACE_ID")]
    pub parent: Option<String>,
    #[command(flatten)]
    pub wait: Wait,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args, Debug)]
pub struct WorkspaceDelete {
    /// The workspace's id (a UUID).
    pub id: String,
    #[command(flatten)]
    pub wait: Wait,
    #[command(flatten)]
    pub conn: Conn,
}

/// Runs one operator command to its exit status: no logs, no database, its own small runtime.
pub fn main(command: OpsCommand) -> ExitCode {
    // Piped into `head` or the like: end quietly when the reader goes, as Unix tools do
    // (Rust ignores SIGPIPE, and `println!` would panic on the closed pipe).
    // SAFETY: resetting a signal's disposition to its default, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("molecule: cannot start the async runtime: {e}");
            return ExitCode::from(client::EXIT_FAILED);
        }
    };
    match rt.block_on(run(command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("molecule: {f}");
            ExitCode::from(f.exit_code())
        }
    }
}

async fn run(command: OpsCommand) -> Result<(), Failure> {
    match command {
        OpsCommand::Queues(a) => jobs::queues(a).await,
        OpsCommand::Jobs { command } => match command {
            JobsCommand::List(a) => jobs::list(a).await,
            JobsCommand::Show(a) => jobs::show(a).await,
            JobsCommand::Retry(a) => jobs::transition(a, jobs::Transition::Retry).await,
            JobsCommand::Cancel(a) => jobs::transition(a, jobs::Transition::Cancel).await,
        },
        OpsCommand::Workspaces { command } => match command {
            WorkspacesCommand::List(a) => workspaces::list(a).await,
            WorkspacesCommand::Show(a) => workspaces::show(a).await,
            WorkspacesCommand::Create(a) => workspaces::create(a).await,
            WorkspacesCommand::Delete(a) => workspaces::delete(a).await,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Command};
    use clap::{CommandFactory, Parser};

    fn parse(args: &[&str]) -> Result<OpsCommand, String> {
        let mut argv = vec!["molecule"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).map_err(|e| e.to_string())?.command {
            Some(Command::Ops(op)) => Ok(op),
            other => panic!("not an operator command: {other:?}"),
        }
    }

    #[test]
    fn create_takes_the_api_fields_and_wait_flags() {
        let op = parse(&[
            "workspaces",
            "create",
            "alpha",
            "--runtime",
            "echo",
            "--tier",
            "3",
            "--delivery-mode",
            "poll",
            "--wait",
            "--timeout",
            "30",
            "--url",
            "http://10.0.0.1:9000/",
            "--token",
            "t",
            "--json",
        ])
        .unwrap();
        let OpsCommand::Workspaces { command: WorkspacesCommand::Create(c) } = op else { panic!("create") };
        assert_eq!((c.name.as_str(), c.runtime.as_str(), c.tier, c.delivery_mode.as_deref()), ("alpha", "echo", Some(3), Some("poll")));
        assert_eq!((c.wait.wait, c.wait.timeout, c.conn.json, c.conn.token.as_deref()), (true, 30, true, Some("t")));
        assert_eq!(c.conn.url.as_str(), "http://10.0.0.1:9000/");
        let OpsCommand::Workspaces { command: WorkspacesCommand::Delete(d) } = parse(&["workspaces", "delete", "x"]).unwrap() else {
            panic!()
        };
        assert_eq!((d.wait.wait, d.wait.timeout), (false, 900), "the default timeout needs no --wait");
        for bad in [
            &["workspaces", "create", "a", "--runtime", "echo", "--timeout", "5"][..],
            &["workspaces", "create", "a", "--runtime", "echo", "--tier", "5"],
            &["workspaces", "create", "a"],
            &["workspaces", "list", "--url", "localhost:8080"],
            &["jobs", "list", "--limit", "0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        let OpsCommand::Jobs { command: JobsCommand::List(l) } = parse(&["jobs", "list", "--queue", "exec", "--status", "dead"]).unwrap()
        else {
            panic!("jobs list")
        };
        assert_eq!((l.kind.as_deref(), l.status.as_deref()), (Some("exec"), Some("dead")), "--queue is --kind");
    }

    #[test]
    fn every_operator_command_documents_its_exit_status_and_connection() {
        let mut cli = Cli::command();
        for path in [
            &["queues"][..],
            &["jobs", "list"],
            &["jobs", "show"],
            &["jobs", "retry"],
            &["jobs", "cancel"],
            &["workspaces", "list"],
            &["workspaces", "show"],
            &["workspaces", "create"],
            &["workspaces", "delete"],
        ] {
            let mut cmd = &mut cli;
            for name in path {
                cmd = cmd.find_subcommand_mut(name).unwrap_or_else(|| panic!("{path:?}"));
            }
            let help = cmd.render_help().to_string();
            for want in ["Exit status:", "3  the API could not be reached", "MOLECULE_URL", "--json", "--token"] {
                assert!(help.contains(want), "{path:?} --help lacks {want:?}:\n{help}");
            }
        }
    }
}
