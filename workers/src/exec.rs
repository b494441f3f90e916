//! J5 exec: argv only (no shell added), each stream capped at 1 MiB with an explicit
//! marker, killed on timeout, exactly one audit row (actor, argv, exit code, duration —
//! never output). Output is redacted (X4) before it is stored in the job's result.

use molecule_backends::{BackendError, ExecRequest, OutputStream};
use molecule_domain::redact::Redactor;
use molecule_domain::WorkspaceId;
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::{JobContext, JobError};
use serde::Deserialize;
use serde_json::json;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use crate::provision::db_err;
use crate::Deps;

pub const MAX_STREAM_BYTES: usize = 1 << 20;
pub const TRUNCATION_MARKER: &str = "\n[molecule: output truncated at 1 MiB]\n";
static REDACTOR: LazyLock<Redactor> = LazyLock::new(Redactor::new);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecArgs {
    pub workspace_id: uuid::Uuid,
    pub argv: Vec<String>,
    pub timeout_s: u64,
    /// Who asked (e.g. `org:<uuid>`), for the audit row.
    pub actor: String,
}

fn text(bytes: &[u8], truncated: bool) -> String {
    // PostgreSQL text cannot hold NUL: show it as U+FFFD, like other undecodable bytes.
    let lossy = String::from_utf8_lossy(bytes).replace('\0', "\u{FFFD}");
    let mut s = REDACTOR.redact(&lossy).into_owned();
    if truncated {
        s.push_str(TRUNCATION_MARKER);
    }
    s
}

pub async fn run(d: &Deps, ctx: &JobContext, a: ExecArgs) -> HandlerResult {
    let ws = WorkspaceId(a.workspace_id);
    if a.argv.is_empty() {
        return Err(JobError::Permanent("empty argv".into()));
    }
    let req = ExecRequest {
        argv: a.argv.clone(),
        timeout: Duration::from_secs(a.timeout_s.clamp(1, 120)),
        max_bytes_per_stream: MAX_STREAM_BYTES,
    };
    let started = Instant::now();
    let outcome = d.backend.exec(ws, &req, &|_s: OutputStream, _b: &[u8]| {}).await;
    let duration_ms = started.elapsed().as_millis() as i64;
    let exit_code = outcome.as_ref().ok().and_then(|o| o.exit_code);
    // Exactly one audit row, whatever happened; never any output.
    sqlx::query(
        "INSERT INTO audit_events (actor, action, workspace_id, org_id, argv, exit_code, duration_ms) \
         VALUES ($1, 'exec', $2, $3, $4, $5, $6)",
    )
    .bind(&a.actor)
    .bind(ws.0)
    .bind(ctx.org_id.map(|o| o.0))
    .bind(&a.argv)
    .bind(exit_code.map(|c| c as i32))
    .bind(duration_ms)
    .execute(&d.db)
    .await
    .map_err(db_err)?;
    let o = outcome.map_err(|e| match e {
        BackendError::NoBackend => JobError::NoBackend,
        other => JobError::Permanent(other.to_string()),
    })?;
    tracing::info!(event = "exec.done", workspace_id = %ws, job_id = %ctx.id, exit_code = ?o.exit_code, timed_out = o.timed_out, duration_ms);
    Ok(json!({
        "outcome": if o.timed_out { "timeout" } else { "exited" },
        "exit_code": o.exit_code,
        "stdout": text(&o.stdout, o.stdout_truncated),
        "stderr": text(&o.stderr, o.stderr_truncated),
        "truncated": { "stdout": o.stdout_truncated, "stderr": o.stderr_truncated },
        "duration_ms": duration_ms,
    }))
}
