//! The lease rescuer: a job is held by its worker's row in `apalis.workers`, which the
//! worker's process upserts every heartbeat — through the whole shutdown grace period,
//! until its last job is acked. A job whose worker row is older than the lease (or gone)
//! belongs to a dead process: it is handed back with its lock cleared — to run again, or
//! `dead` when that was its last attempt, or `interrupted` when its kind must not run
//! twice. A live worker's jobs are never touched; a late ack from a worker that was
//! merely slow is refused by its fence (see `store::ack`).

use sqlx::PgPool;
use std::time::Duration;

const RESCUE: &str = r#"
WITH stale AS (
    SELECT j.id
    FROM apalis.jobs j
    LEFT JOIN apalis.workers w ON w.id = j.lock_by
    WHERE j.status IN ('Queued', 'Running')
      AND (w.id IS NULL OR w.last_seen < now() - $1 * interval '1 millisecond')
    FOR UPDATE OF j SKIP LOCKED
), verdict AS (
    SELECT j.id,
           CASE WHEN j.job_type = ANY($2) THEN 'interrupted'
                WHEN j.attempts >= j.max_attempts THEN 'dead' END AS outcome
    FROM apalis.jobs j JOIN stale s ON s.id = j.id
)
UPDATE apalis.jobs AS j
SET status  = CASE WHEN v.outcome IS NULL THEN 'Failed' ELSE 'Killed' END,
    outcome = v.outcome,
    done_at = CASE WHEN v.outcome IS NULL THEN NULL ELSE now() END,
    run_at = now(),
    lock_by = NULL,
    lock_at = NULL,
    last_error = CASE WHEN v.outcome = 'interrupted' THEN $4 ELSE $3 END,
    -- Which worker it was is for operators only (it names a host and a pid).
    last_error_detail = 'worker lost: no heartbeat within the lease from ' || COALESCE(j.lock_by, 'an unknown worker'),
    last_result = jsonb_build_object('Err', CASE WHEN v.outcome = 'interrupted' THEN $4 ELSE $3 END),
    attempt_log = j.attempt_log || jsonb_build_array(jsonb_build_object(
        'attempt', j.attempts, 'started_at', j.started_at, 'failed_at', now(),
        'error', CASE WHEN v.outcome = 'interrupted' THEN $4 ELSE $3 END))
FROM verdict v
WHERE j.id = v.id
RETURNING j.job_type, v.outcome
"#;

/// Hands back the jobs of workers silent for longer than `lease`. `run_once` names the
/// queues whose jobs must not run twice (they end `interrupted`). Safe on many processes
/// at once (SKIP LOCKED). Returns how many jobs it took.
pub async fn rescue_expired_leases(db: &PgPool, lease: Duration, run_once: &[&str]) -> Result<u64, sqlx::Error> {
    let rows: Vec<(String, Option<String>)> =
        sqlx::query_as(RESCUE).bind(lease.as_millis() as i64).bind(run_once).bind(crate::failures::public("worker_lost")).bind(crate::failures::public("interrupted")).fetch_all(db).await?;
    for (queue, outcome) in &rows {
        crate::metrics::rescued(queue, outcome.as_deref());
    }
    let mut again: Vec<&str> = rows.iter().filter(|r| r.1.is_none()).map(|r| r.0.as_str()).collect();
    again.sort_unstable();
    again.dedup();
    if !again.is_empty() {
        // Wake idle pools everywhere: the rescued jobs are due now.
        sqlx::query("SELECT pg_notify($2, json_build_object('job_type', q)::text) FROM unnest($1::text[]) AS q")
            .bind(&again)
            .bind(crate::runtime::INSERT_CHANNEL)
            .execute(db)
            .await?;
    }
    Ok(rows.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enqueue::{enqueue, NewJob};
    use crate::store;
    use crate::store::workers::{heartbeat, WorkerRow};
    use molecule_domain::testing::fresh_db;

    async fn state(db: &PgPool, id: &str) -> (String, Option<String>, Option<String>, i32) {
        sqlx::query_as("SELECT status, outcome, lock_by, attempts FROM apalis.jobs WHERE id = $1")
            .bind(id)
            .fetch_one(db)
            .await
            .unwrap()
    }

    async fn age_worker(db: &PgPool, id: &str, secs: i64) {
        sqlx::query("UPDATE apalis.workers SET last_seen = now() - make_interval(secs => $2) WHERE id = $1")
            .bind(id)
            .bind(secs as f64)
            .execute(db)
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_jobs_of_silent_workers_are_rescued_and_their_lock_is_cleared() {
        let (db, _) = fresh_db().await;
        let mut conn = db.acquire().await.unwrap();
        let alive = WorkerRow { id: "q@alive".into(), queue: "q".into(), concurrency: 1 };
        let silent = WorkerRow { id: "q@silent".into(), queue: "q".into(), concurrency: 1 };
        let once = WorkerRow { id: "once@silent".into(), queue: "once".into(), concurrency: 1 };
        heartbeat(&mut conn, &[alive.clone(), silent.clone(), once.clone()]).await.unwrap();
        for (queue, worker) in [("q", &alive), ("q", &silent), ("once", &once)] {
            enqueue(&mut conn, &NewJob::to_queue(queue, &serde_json::json!({}))).await.unwrap();
            let c = store::claim(&db, queue, 1, &worker.id).await.unwrap();
            assert_eq!(c.len(), 1);
        }
        age_worker(&db, "q@silent", 60).await;
        age_worker(&db, "once@silent", 60).await;

        let n = rescue_expired_leases(&db, Duration::from_secs(30), &["once"]).await.unwrap();
        assert_eq!(n, 2);
        let ids: Vec<(String, Option<String>)> =
            sqlx::query_as("SELECT id, lock_by FROM apalis.jobs ORDER BY id").fetch_all(&db).await.unwrap();
        let by = |w: &str| ids.iter().find(|r| r.1.as_deref() == Some(w)).map(|r| r.0.clone());
        assert!(by("q@alive").is_some(), "the live worker keeps its job");
        assert!(by("q@silent").is_none() && by("once@silent").is_none(), "rescued jobs lose their lock");
        let all: Vec<(String, String, Option<String>)> =
            sqlx::query_as("SELECT job_type, status, outcome FROM apalis.jobs ORDER BY id").fetch_all(&db).await.unwrap();
        assert_eq!(
            all,
            vec![
                ("q".into(), "Running".into(), None),
                ("q".into(), "Failed".into(), None),
                ("once".into(), "Killed".into(), Some("interrupted".into())),
            ]
        );
        // A pruned row of a live worker heals at its next heartbeat before any rescue.
        sqlx::query("DELETE FROM apalis.workers WHERE id = 'q@alive'").execute(&db).await.unwrap();
        heartbeat(&mut conn, &[alive]).await.unwrap();
        assert_eq!(rescue_expired_leases(&db, Duration::from_secs(30), &["once"]).await.unwrap(), 0);
        let (_, _, lock, attempts) = state(&db, &by("q@alive").unwrap()).await;
        assert_eq!((lock.as_deref(), attempts), (Some("q@alive"), 1));
    }
}
