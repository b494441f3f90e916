//! Acks: outcomes of attempts, written back in batches. Each ack presents the fence of
//! the claim it answers; only a row still Running under that very fence is changed, so an
//! ack from an earlier claim (its lease lapsed and the job was handed out again, perhaps
//! to the same worker) is refused instead of finalizing the newer attempt.

use serde_json::Value;
use sqlx::PgPool;

use crate::state::{JobState, Outcome};

/// One attempt's outcome.
#[derive(Debug, Clone)]
pub struct Ack {
    pub id: String,
    /// The fence of the claim this answers.
    pub fence: i64,
    /// Done, Failed (retry at now + delay), Killed (with an outcome), or Pending (handed
    /// back: the attempt does not count).
    pub state: JobState,
    pub outcome: Option<Outcome>,
    pub delay_ms: i64,
    pub error: Option<String>,
    pub result: Option<Value>,
}

impl Ack {
    /// A success without a result value: written by the cheaper statement.
    fn is_plain_success(&self) -> bool {
        self.state == JobState::Done && matches!(self.result, None | Some(Value::Null))
    }
}

/// What a batch write did: the ids whose rows it changed. The others were stale.
#[derive(Debug, Default)]
pub struct AckWrite {
    pub applied: Vec<String>,
}

/// Acks find rows by primary key only. The `(…) IS TRUE` conditions are deliberately
/// not indexable: with plain `status = 'Running'` the planner, trusting stats taken while
/// few jobs ran, walks the partial running-jobs index instead — which still holds an
/// entry for every job claimed since the last vacuum, so each ack got slower as a drain
/// went on (measured: 29k → 8k jobs/s by the third 20k drain).
const ACK_DONE: &str = r#"
UPDATE apalis.jobs AS j
SET status = 'Done', outcome = 'succeeded', done_at = now(), last_result = '{"Ok": null}'
FROM unnest($1::text[], $2::int8[]) AS r(id, fence)
WHERE j.id = ANY($1) AND j.id = r.id AND (j.fence = r.fence) IS TRUE AND (j.status = 'Running') IS TRUE
RETURNING j.id
"#;

const ACK: &str = r#"
UPDATE apalis.jobs AS j
SET status = r.status,
    outcome = r.outcome,
    done_at = CASE WHEN r.status IN ('Done', 'Killed') THEN now() END,
    run_at = CASE WHEN r.status IN ('Failed', 'Pending')
                  THEN now() + r.delay_ms * interval '1 millisecond' ELSE j.run_at END,
    attempts = CASE WHEN r.status = 'Pending' THEN greatest(j.attempts - 1, 0) ELSE j.attempts END,
    lock_by = CASE WHEN r.status IN ('Pending', 'Failed') THEN NULL ELSE j.lock_by END,
    lock_at = CASE WHEN r.status IN ('Pending', 'Failed') THEN NULL ELSE j.lock_at END,
    started_at = CASE WHEN r.status = 'Pending' THEN NULL ELSE j.started_at END,
    last_error = COALESCE(r.error, j.last_error),
    last_result = CASE WHEN r.status = 'Pending' THEN j.last_result
                       WHEN r.error IS NOT NULL THEN jsonb_build_object('Err', r.error)
                       ELSE jsonb_build_object('Ok', r.result) END,
    attempt_log = CASE WHEN r.error IS NULL OR r.status = 'Pending' THEN j.attempt_log
                       ELSE j.attempt_log || jsonb_build_array(jsonb_build_object(
                            'attempt', j.attempts, 'started_at', j.started_at,
                            'failed_at', now(), 'error', r.error)) END
FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::jsonb[])
     AS r(id, fence, status, outcome, delay_ms, error, result)
WHERE j.id = ANY($1) AND j.id = r.id AND (j.fence = r.fence) IS TRUE AND (j.status = 'Running') IS TRUE
RETURNING j.id
"#;

/// Writes a batch of acks (two statements at most): the ids it applied.
pub async fn write_acks(db: &PgPool, acks: &[Ack]) -> Result<AckWrite, sqlx::Error> {
    let (done, rest): (Vec<&Ack>, Vec<&Ack>) = acks.iter().partition(|a| a.is_plain_success());
    let mut out = AckWrite::default();
    if !done.is_empty() {
        let ids: Vec<String> = sqlx::query_scalar(ACK_DONE)
            .bind(done.iter().map(|a| a.id.as_str()).collect::<Vec<_>>())
            .bind(done.iter().map(|a| a.fence).collect::<Vec<_>>())
            .fetch_all(db)
            .await?;
        out.applied.extend(ids);
    }
    if !rest.is_empty() {
        let ids: Vec<String> = sqlx::query_scalar(ACK)
            .bind(rest.iter().map(|a| a.id.as_str()).collect::<Vec<_>>())
            .bind(rest.iter().map(|a| a.fence).collect::<Vec<_>>())
            .bind(rest.iter().map(|a| a.state.as_str()).collect::<Vec<_>>())
            .bind(rest.iter().map(|a| a.outcome.map(Outcome::as_str)).collect::<Vec<_>>())
            .bind(rest.iter().map(|a| a.delay_ms).collect::<Vec<_>>())
            .bind(rest.iter().map(|a| a.error.as_deref()).collect::<Vec<_>>())
            .bind(rest.iter().map(|a| a.result.clone().unwrap_or(Value::Null)).collect::<Vec<_>>())
            .fetch_all(db)
            .await?;
        out.applied.extend(ids);
    }
    Ok(out)
}

/// Tells followers (NDJSON exec streams) that these jobs reached their outcome. Sent after
/// the acks committed, so a follower woken by it reads the final row.
pub async fn notify_finished(db: &PgPool, ids: &[String]) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($2, id) FROM unnest($1::text[]) AS id")
        .bind(ids)
        .bind(crate::output::FINISHED_CHANNEL)
        .execute(db)
        .await?;
    Ok(())
}
