//! Claims: one statement takes up to N due jobs of a queue, bumps their fence and counts
//! the attempt.

use sqlx::PgPool;
use uuid::Uuid;

/// A job as a claim hands it to its worker.
#[derive(Debug, sqlx::FromRow)]
pub struct Claimed {
    pub id: String,
    pub job: Vec<u8>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub org_id: Option<Uuid>,
    pub workspace_id: Option<Uuid>,
    /// Past its `expires_at`: not to be run.
    pub expired: bool,
    /// This claim's fencing token: every write about this attempt must present it.
    pub fence: i64,
}

/// `id = ANY(ARRAY(…))` keeps the update on the primary key; a join against the CTE let
/// the planner hash-join a sequential scan of the whole table (slower with every row kept).
const CLAIM: &str = r#"
UPDATE apalis.jobs AS j
SET status = 'Running', lock_by = $3, lock_at = now(), started_at = now(),
    attempts = j.attempts + 1, fence = j.fence + 1
WHERE j.id = ANY(ARRAY(
    SELECT id FROM apalis.jobs
    WHERE job_type = $1 AND status IN ('Pending', 'Failed') AND run_at <= now()
    ORDER BY priority DESC, run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
))
RETURNING j.id, j.job, j.attempts, j.max_attempts, j.org_id, j.workspace_id,
          (j.expires_at IS NOT NULL AND j.expires_at <= now()) AS expired, j.fence
"#;

/// Claims up to `limit` due jobs of `queue` for `worker`.
pub async fn claim(db: &PgPool, queue: &str, limit: i64, worker: &str) -> Result<Vec<Claimed>, sqlx::Error> {
    sqlx::query_as(CLAIM).bind(queue).bind(limit).bind(worker).fetch_all(db).await
}

/// Milliseconds until the queue's next job is due (negative: due now), NULL when empty.
const NEXT_DUE: &str = r#"
SELECT (EXTRACT(EPOCH FROM (min(run_at) - now())) * 1000)::float8
FROM apalis.jobs
WHERE job_type = $1 AND status IN ('Pending', 'Failed')
"#;

pub async fn next_due_ms(db: &PgPool, queue: &str) -> Result<Option<f64>, sqlx::Error> {
    sqlx::query_scalar(NEXT_DUE).bind(queue).fetch_one(db).await
}
