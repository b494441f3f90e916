//! J5 exec: argv only (no shell added), each stream capped at 1 MiB with an explicit
//! marker, killed on timeout, exactly one audit row (actor, argv, exit code, duration —
//! never output). Output is redacted (X4) before it is stored in the job's result.

use molecule_backends::{BackendError, ExecRequest, OutputStream};
use molecule_domain::WorkspaceId;
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::{JobContext, JobError};
use serde::Deserialize;
use serde_json::json;
use std::time::{Duration, Instant};

use crate::provision::db_err;
use crate::Deps;

pub const MAX_STREAM_BYTES: usize = 1 << 20;
pub const TRUNCATION_MARKER: &str = "\n[molecule: output truncated at 1 MiB]\n";

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
    let mut s = molecule_domain::redact::global().redact(&lossy).into_owned();
    if truncated {
        s.push_str(TRUNCATION_MARKER);
    }
    s
}

/// Persists output chunks for streaming readers. Text is flushed by whole lines (so a
/// secret is never split across two redactions), or when 8 KiB have piled up.
async fn write_chunks(
    db: sqlx::PgPool,
    job_id: String,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(OutputStream, Vec<u8>)>,
) {
    let mut seq = 0i32;
    let mut pending: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut open = true;
    while open {
        // Gather what is there (waiting at most 50 ms after the first chunk).
        match tokio::time::timeout(Duration::from_millis(50), rx.recv()).await {
            Ok(Some((s, b))) => pending[s as usize].extend_from_slice(&b),
            Ok(None) => open = false,
            Err(_) => {}
        }
        while let Ok((s, b)) = rx.try_recv() {
            pending[s as usize].extend_from_slice(&b);
        }
        let mut rows: Vec<(i32, &'static str, String)> = Vec::new();
        for (i, name) in [(0usize, "stdout"), (1usize, "stderr")] {
            let buf = &mut pending[i];
            let cut = if !open { buf.len() } else {
                match buf.iter().rposition(|b| *b == b'\n') {
                    Some(p) => p + 1,
                    None if buf.len() >= 8192 => buf.len(),
                    None => 0,
                }
            };
            if cut > 0 {
                let chunk: Vec<u8> = buf.drain(..cut).collect();
                seq += 1;
                rows.push((seq, name, text(&chunk, false)));
            }
        }
        if rows.is_empty() {
            continue;
        }
        let res = sqlx::query(
            "WITH ins AS (INSERT INTO exec_output (job_id, seq, stream, data) \
             SELECT $1, s, st, d FROM unnest($2::int[], $3::text[], $4::text[]) AS t(s, st, d) RETURNING 1) \
             SELECT pg_notify('molecule_exec_output', $1) FROM (SELECT count(*) FROM ins) c",
        )
        .bind(&job_id)
        .bind(rows.iter().map(|r| r.0).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.1).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.2.clone()).collect::<Vec<_>>())
        .execute(&db)
        .await;
        if let Err(e) = res {
            // Streaming is best effort; the job's result still carries the whole output.
            tracing::warn!(job_id, error = %e, "could not persist exec output chunk");
        }
    }
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
    // Chunks go to a writer task that persists them in order and NOTIFYs followers.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(OutputStream, Vec<u8>)>();
    let writer = tokio::spawn(write_chunks(d.db.clone(), ctx.id.as_str().to_string(), rx));
    let sink = move |s: OutputStream, b: &[u8]| {
        let _ = tx.send((s, b.to_vec()));
    };
    let outcome = d.backend.exec(ws, &req, &sink).await;
    drop(sink);
    let _ = writer.await;
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
