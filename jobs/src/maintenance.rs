//! Orphan recovery (leases) and retention pruning.

use sqlx::PgPool;
use std::time::Duration;

/// Jobs held by a worker whose heartbeat is older than the lease (or whose row is gone)
/// are handed back: run
/// again at once, or dead when that attempt was the last one. Safe on many processes
/// at once (SKIP LOCKED).
const RECOVER_ORPHANS: &str = r#"
WITH stale AS (
    SELECT j.id
    FROM apalis.jobs j
    LEFT JOIN apalis.workers w ON w.id = j.lock_by
    WHERE j.status IN ('Queued', 'Running')
      AND (w.id IS NULL OR w.last_seen < now() - $1 * interval '1 millisecond')
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE apalis.jobs AS j
SET status  = CASE WHEN j.attempts >= j.max_attempts THEN 'Killed' ELSE 'Failed' END,
    outcome = CASE WHEN j.attempts >= j.max_attempts THEN 'dead' END,
    done_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END,
    run_at = now(),
    last_error = 'worker lost: no heartbeat within the lease',
    last_result = jsonb_build_object('Err', 'worker lost: no heartbeat within the lease'),
    attempt_log = j.attempt_log || jsonb_build_array(jsonb_build_object(
        'attempt', j.attempts, 'started_at', j.started_at, 'failed_at', now(),
        'error', 'worker lost: no heartbeat within the lease', 'worker', j.lock_by))
FROM stale
WHERE j.id = stale.id
"#;

pub async fn recover_orphans(db: &PgPool, lease: Duration) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(RECOVER_ORPHANS).bind(lease.as_millis() as i64).execute(db).await?;
    if r.rows_affected() > 0 {
        // Wake idle pools everywhere: the recovered jobs are due now.
        let _ = sqlx::query("SELECT pg_notify('apalis::job::insert', json_build_object('job_type', q)::text) FROM (SELECT DISTINCT job_type AS q FROM apalis.jobs WHERE status = 'Failed' AND run_at <= now()) s")
            .execute(db)
            .await;
    }
    Ok(r.rows_affected())
}

const PRUNE_FINISHED: &str = r#"
DELETE FROM apalis.jobs
WHERE id IN (
    SELECT id FROM apalis.jobs
    WHERE status IN ('Done', 'Killed') AND done_at < now() - $1 * interval '1 second'
    ORDER BY done_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
"#;

/// Worker rows silent for a day that hold no running job.
const PRUNE_WORKERS: &str = r#"
DELETE FROM apalis.workers w
WHERE w.last_seen < now() - interval '1 day'
  AND NOT EXISTS (SELECT 1 FROM apalis.jobs j WHERE j.lock_by = w.id AND j.status IN ('Queued', 'Running'))
"#;

/// Deletes finished jobs (succeeded, dead, expired, cancelled) older than `retention`,
/// `batch` rows per statement so no statement holds many locks or runs long.
pub async fn prune_finished(db: &PgPool, retention: Duration, batch: i64) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let n = sqlx::query(PRUNE_FINISHED)
            .bind(retention.as_secs() as i64)
            .bind(batch)
            .execute(db)
            .await?
            .rows_affected();
        total += n;
        if (n as i64) < batch {
            break;
        }
    }
    sqlx::query(PRUNE_WORKERS).execute(db).await?;
    Ok(total)
}
