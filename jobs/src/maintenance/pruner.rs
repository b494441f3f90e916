//! The pruner (S7 retention): finished jobs (succeeded, dead, expired, cancelled,
//! interrupted) older than the retention, their output chunks, and worker rows silent for
//! a day that hold nothing — each in batches, so no statement holds many locks or runs long.

use serde::Serialize;
use sqlx::PgPool;
use std::time::Duration;

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Pruned {
    pub jobs: u64,
    pub output_chunks: u64,
    pub workers: u64,
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

pub async fn prune_finished(db: &PgPool, retention: Duration, batch: i64) -> Result<Pruned, sqlx::Error> {
    let mut pruned = Pruned::default();
    loop {
        let n = sqlx::query(PRUNE_FINISHED)
            .bind(retention.as_secs() as i64)
            .bind(batch)
            .execute(db)
            .await?
            .rows_affected();
        pruned.jobs += n;
        if (n as i64) < batch {
            break;
        }
    }
    pruned.output_chunks = crate::output::prune(db, retention, batch).await?;
    pruned.workers = sqlx::query(PRUNE_WORKERS).execute(db).await?.rows_affected();
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enqueue::{enqueue_many, NewJob};
    use crate::output::{self, Chunk};
    use molecule_domain::testing::fresh_db;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn old_finished_jobs_and_output_go_in_batches_and_the_rest_stays() {
        let (db, _) = fresh_db().await;
        let mut conn = db.acquire().await.unwrap();
        let jobs: Vec<NewJob> = (0..25).map(|i| NewJob::to_queue("q", &serde_json::json!({ "i": i }))).collect();
        let ids = enqueue_many(&mut conn, &jobs).await.unwrap();
        // 10 finished long ago, 5 finished just now, 5 failed long ago (will retry), 5 pending.
        let set = |range: std::ops::Range<usize>, sql: &'static str| {
            let ids: Vec<String> = ids[range].iter().map(|i| i.as_str().to_string()).collect();
            let db = db.clone();
            async move { sqlx::query(sql).bind(ids).execute(&db).await.unwrap() }
        };
        set(0..6, "UPDATE apalis.jobs SET status = 'Done', done_at = now() - interval '8 days' WHERE id = ANY($1)").await;
        set(6..10, "UPDATE apalis.jobs SET status = 'Killed', outcome = 'interrupted', done_at = now() - interval '8 days' WHERE id = ANY($1)").await;
        set(10..15, "UPDATE apalis.jobs SET status = 'Done', done_at = now() WHERE id = ANY($1)").await;
        set(15..20, "UPDATE apalis.jobs SET status = 'Failed', run_at = now() - interval '8 days' WHERE id = ANY($1)").await;
        for (k, id) in ids[..2].iter().enumerate() {
            let chunk = Chunk { seq: 1, stream: "stdout".into(), data: format!("old {k}") };
            output::append(&db, id.as_str(), &[chunk]).await.unwrap();
        }
        sqlx::query("UPDATE exec_output SET created_at = now() - interval '8 days'").execute(&db).await.unwrap();
        output::append(&db, ids[12].as_str(), &[Chunk { seq: 1, stream: "stdout".into(), data: "new".into() }]).await.unwrap();

        let pruned = prune_finished(&db, Duration::from_secs(7 * 24 * 3600), 3).await.unwrap();
        assert_eq!(pruned.jobs, 10);
        assert_eq!(pruned.output_chunks, 2);
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs").fetch_one(&db).await.unwrap();
        assert_eq!(left, 15);
        let kept = output::read_after(&db, ids[12].as_str(), 0).await.unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(prune_finished(&db, Duration::from_secs(7 * 24 * 3600), 3).await.unwrap(), Pruned::default());
    }
}
