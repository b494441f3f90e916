//! J5 exec: argv only (no shell added), each stream capped at 1 MiB with an explicit
//! marker, killed on timeout, exactly one audit row per run (actor, argv, exit code,
//! duration, outcome — never output), written before the command starts. Output is
//! redacted (X4) before it is stored in the job's result. An exec runs once: when its
//! worker's shutdown grace runs out the command is killed and the job ends `interrupted`.

use molecule_backends::{BackendError, ExecRequest, OutputStream};
use molecule_domain::WorkspaceId;
use molecule_domain::redact::StreamRedactor;
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::output::{self, Chunk};
use molecule_jobs::{JobContext, JobError};
use serde::Deserialize;
use serde_json::json;
use std::time::{Duration, Instant};

use crate::Deps;
use crate::provision::db_err;

pub const MAX_STREAM_BYTES: usize = 1 << 20;
pub const TRUNCATION_MARKER: &str = "\n[molecule: output truncated at 1 MiB]\n";
/// Read past the cap so that redaction sees a secret the cap would cut in two: the
/// output is redacted first, then cut.
pub const REDACTION_WINDOW: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecArgs {
    pub workspace_id: uuid::Uuid,
    pub argv: Vec<String>,
    pub timeout_s: u64,
    /// Who asked (e.g. `org:<uuid>`), for the audit row.
    pub actor: String,
}

/// A stream's output as stored: redacted whole, then cut at the cap, with the marker when
/// anything was cut (by the backend, or here); and whether it was.
fn text(bytes: &[u8], cut_by_backend: bool) -> (String, bool) {
    // PostgreSQL text cannot hold NUL: show it as U+FFFD, like other undecodable bytes.
    let lossy = String::from_utf8_lossy(bytes).replace('\0', "\u{FFFD}");
    let redacted = molecule_domain::redact::global().redact(&lossy);
    let cut = cut_by_backend || redacted.len() > MAX_STREAM_BYTES;
    let mut s = molecule_domain::text::head(&redacted, MAX_STREAM_BYTES).to_string();
    if cut {
        s.push_str(TRUNCATION_MARKER);
    }
    (s, cut)
}

/// Persists output chunks for streaming readers, each stream through its own
/// [`StreamRedactor`]: text leaves by whole lines, and a private key printed line by line
/// is held until it ends, so no secret leaves in pieces. A stream ends at the cap like the
/// stored result: what comes after is dropped — the line the cap cut through included
/// (its beginning is held back, never released) — and the marker says so.
async fn write_chunks(
    db: sqlx::PgPool,
    job_id: String,
    mut seq: i32,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(OutputStream, Vec<u8>)>,
) {
    let redactor = molecule_domain::redact::global();
    let mut streams = [StreamRedactor::new(redactor), StreamRedactor::new(redactor)];
    let mut pending: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut taken = [0usize; 2];
    let mut capped = [false; 2];
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
        let mut chunks: Vec<Chunk> = Vec::new();
        for (i, name) in [(0usize, "stdout"), (1usize, "stderr")] {
            let mut input = std::mem::take(&mut pending[i]);
            let room = MAX_STREAM_BYTES.saturating_sub(taken[i]);
            if input.len() > room {
                input.truncate(room);
                capped[i] = true;
            }
            taken[i] += input.len();
            let mut data = streams[i].push(&input);
            if !open {
                let done = std::mem::replace(&mut streams[i], StreamRedactor::new(redactor));
                if capped[i] {
                    drop(done); // the cut line: never released
                    data.push_str(TRUNCATION_MARKER);
                } else {
                    data.push_str(&done.finish());
                }
            }
            if !data.is_empty() {
                seq += 1;
                chunks.push(Chunk { seq, stream: name.to_string(), data });
            }
        }
        if chunks.is_empty() {
            continue;
        }
        if let Err(e) = output::append(&db, &job_id, &chunks).await {
            // Streaming is best effort; the job's result still carries the whole output.
            tracing::warn!(job_id, error = %e, "could not persist exec output chunk");
        }
    }
}

/// The exec's audit row (X3): written before the command starts — so a command whose
/// worker dies mid-run still has its row — and completed after it. One row per run
/// (job, attempt); never any output.
pub mod audit {
    use super::*;

    /// S7: audit rows older than `older_than`, in batches.
    pub async fn prune(db: &sqlx::PgPool, older_than: Duration, batch: i64) -> Result<u64, sqlx::Error> {
        molecule_domain::db::delete_in_batches(
            db,
            "DELETE FROM audit_events WHERE id IN \
             (SELECT id FROM audit_events WHERE created_at < now() - make_interval(secs => $1) ORDER BY created_at LIMIT $2)",
            older_than,
            batch,
        )
        .await
    }

    pub async fn started(d: &Deps, ctx: &JobContext, a: &ExecArgs) -> Result<(), JobError> {
        sqlx::query(
            "INSERT INTO audit_events (actor, action, workspace_id, org_id, argv, job_id, attempt, outcome) \
             VALUES ($1, 'exec', $2, $3, $4, $5, $6, 'started') \
             ON CONFLICT (job_id, attempt) WHERE job_id IS NOT NULL DO NOTHING",
        )
        .bind(&a.actor)
        .bind(a.workspace_id)
        .bind(ctx.org_id.map(|o| o.0))
        .bind(&a.argv)
        .bind(ctx.id.as_str())
        .bind(ctx.attempt)
        .execute(&d.db)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    pub async fn finished(d: &Deps, ctx: &JobContext, outcome: &str, exit_code: Option<i64>, duration_ms: i64) -> Result<(), JobError> {
        sqlx::query(
            "UPDATE audit_events SET outcome = $3, exit_code = $4, duration_ms = $5, finished_at = now() \
             WHERE job_id = $1 AND attempt = $2",
        )
        .bind(ctx.id.as_str())
        .bind(ctx.attempt)
        .bind(outcome)
        .bind(exit_code.map(|c| c as i32))
        .bind(duration_ms)
        .execute(&d.db)
        .await
        .map_err(db_err)?;
        Ok(())
    }
}

pub async fn run(d: &Deps, ctx: &JobContext, a: ExecArgs) -> HandlerResult {
    let ws = WorkspaceId(a.workspace_id);
    if a.argv.is_empty() {
        return Err(JobError::permanent("invalid_input", "empty argv"));
    }
    let req = ExecRequest {
        argv: a.argv.clone(),
        timeout: Duration::from_secs(a.timeout_s.clamp(1, 120)),
        max_bytes_per_stream: MAX_STREAM_BYTES + REDACTION_WINDOW,
        stop: Some(ctx.interrupt.receiver()),
    };
    // A retried job's chunks follow its earlier attempts' (they share the job id).
    let first_seq = output::last_seq(&d.db, ctx.id.as_str()).await.map_err(db_err)?;
    audit::started(d, ctx, &a).await?;
    let started = Instant::now();
    // Chunks go to a writer task that persists them in order and NOTIFYs followers.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(OutputStream, Vec<u8>)>();
    let writer = tokio::spawn(write_chunks(d.db.clone(), ctx.id.as_str().to_string(), first_seq, rx));
    let sink = move |s: OutputStream, b: &[u8]| {
        let _ = tx.send((s, b.to_vec()));
    };
    let outcome = d.backend.exec(ws, &req, &sink).await;
    drop(sink);
    let _ = writer.await;
    let duration_ms = started.elapsed().as_millis() as i64;
    let label = match &outcome {
        Ok(o) if o.interrupted => "interrupted",
        Ok(o) if o.timed_out => "timeout",
        Ok(_) => "exited",
        Err(_) => "error",
    };
    // The command has run: a failed audit update must not throw its result away (the row
    // exists since `started`; it stays `started`, which the log line below explains).
    if let Err(e) = audit::finished(d, ctx, label, outcome.as_ref().ok().and_then(|o| o.exit_code), duration_ms).await {
        tracing::warn!(job_id = %ctx.id, error = %e, "could not complete the exec's audit row");
    }
    let o = outcome.map_err(|e| match e {
        BackendError::NoBackend => JobError::NoBackend,
        other => JobError::permanent("exec_failed", other.to_string()),
    })?;
    tracing::info!(event = "exec.done", workspace_id = %ws, job_id = %ctx.id, exit_code = ?o.exit_code, outcome = label, duration_ms);
    if o.interrupted {
        return Err(JobError::Interrupted);
    }
    let (stdout, stdout_cut) = text(&o.stdout, o.stdout_truncated);
    let (stderr, stderr_cut) = text(&o.stderr, o.stderr_truncated);
    Ok(json!({
        "outcome": if o.timed_out { "timeout" } else { "exited" },
        "exit_code": o.exit_code,
        "stdout": stdout,
        "stderr": stderr,
        "truncated": { "stdout": stdout_cut, "stderr": stderr_cut },
        "duration_ms": duration_ms,
    }))
}
