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
    /// What tenants read (a code and a canned sentence).
    pub error: Option<String>,
    /// The failure's detail, for operators only (`last_error_detail`).
    pub error_detail: Option<String>,
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
    last_error_detail = CASE WHEN r.error IS NULL THEN j.last_error_detail ELSE r.detail END,
    last_result = CASE WHEN r.status = 'Pending' THEN j.last_result
                       WHEN r.error IS NOT NULL THEN jsonb_build_object('Err', r.error)
                       ELSE jsonb_build_object('Ok', r.result) END,
    attempt_log = CASE WHEN r.error IS NULL OR r.status = 'Pending' THEN j.attempt_log
                       ELSE j.attempt_log || jsonb_build_array(jsonb_build_object(
                            'attempt', j.attempts, 'started_at', j.started_at,
                            'failed_at', now(), 'error', r.error)) END
FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::jsonb[], $8::text[])
     AS r(id, fence, status, outcome, delay_ms, error, result, detail)
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
            .bind(rest.iter().map(|a| a.error_detail.as_deref()).collect::<Vec<_>>())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enqueue::{enqueue, NewJob};
    use crate::maintenance::rescue_expired_leases;
    use crate::store::claim;
    use crate::store::workers::{heartbeat, WorkerRow};
    use molecule_domain::testing::fresh_db;
    use std::time::Duration;

    #[derive(sqlx::FromRow, Debug, PartialEq)]
    struct Row {
        status: String,
        fence: i64,
        attempts: i32,
        lock_by: Option<String>,
        last_result: Option<Value>,
    }

    async fn row(db: &PgPool, id: &str) -> Row {
        sqlx::query_as("SELECT status, fence, attempts, lock_by, last_result FROM apalis.jobs WHERE id = $1")
            .bind(id)
            .fetch_one(db)
            .await
            .unwrap()
    }

    fn done(id: &str, fence: i64, result: Value) -> Ack {
        Ack { id: id.into(), fence, state: JobState::Done, outcome: Some(Outcome::Succeeded), delay_ms: 0, error: None, error_detail: None, result: Some(result) }
    }

    /// The bug this fences off: a worker's heartbeat lapses, the rescuer hands its job
    /// back, the SAME worker claims it again — and the first attempt's late ack must not
    /// finalize the second attempt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_ack_after_a_reclaim_changes_nothing() {
        let (db, _) = fresh_db().await;
        let mut conn = db.acquire().await.unwrap();
        let w = WorkerRow { id: "q@slow".into(), queue: "q".into(), concurrency: 1 };
        heartbeat(&mut conn, std::slice::from_ref(&w)).await.unwrap();
        let id = enqueue(&mut conn, &NewJob::to_queue("q", &serde_json::json!({})).max_attempts(5)).await.unwrap();
        let first = claim(&db, "q", 1, &w.id).await.unwrap().remove(0);
        assert_eq!(first.fence, 1);

        sqlx::query("UPDATE apalis.workers SET last_seen = now() - interval '1 minute'").execute(&db).await.unwrap();
        assert_eq!(rescue_expired_leases(&db, Duration::from_secs(30), &[]).await.unwrap(), 1);
        assert_eq!(row(&db, id.as_str()).await.lock_by, None, "the rescue clears the lock");
        heartbeat(&mut conn, std::slice::from_ref(&w)).await.unwrap();
        let second = claim(&db, "q", 1, &w.id).await.unwrap().remove(0);
        assert_eq!((second.fence, second.attempts), (2, 2));
        let before = row(&db, id.as_str()).await;

        // Attempt 1's ack arrives late, from the same worker: refused.
        let w1 = write_acks(&db, &[done(id.as_str(), first.fence, serde_json::json!("from attempt 1"))]).await.unwrap();
        assert!(w1.applied.is_empty());
        assert_eq!(row(&db, id.as_str()).await, before, "the newer attempt's row is untouched");
        // A stale failure or hand-back is refused the same way.
        let stale_release = Ack { state: JobState::Pending, outcome: None, result: None, ..done(id.as_str(), first.fence, Value::Null) };
        assert!(write_acks(&db, &[stale_release]).await.unwrap().applied.is_empty());
        assert_eq!(row(&db, id.as_str()).await, before);

        // Attempt 2's own ack lands.
        let w2 = write_acks(&db, &[done(id.as_str(), second.fence, serde_json::json!("from attempt 2"))]).await.unwrap();
        assert_eq!(w2.applied, vec![id.as_str().to_string()]);
        let after = row(&db, id.as_str()).await;
        assert_eq!(after.status, "Done");
        assert_eq!(after.last_result, Some(serde_json::json!({ "Ok": "from attempt 2" })));
        // And a repeat of it (a retried batch) changes nothing more.
        assert!(write_acks(&db, &[done(id.as_str(), second.fence, Value::Null)]).await.unwrap().applied.is_empty());
    }
}
