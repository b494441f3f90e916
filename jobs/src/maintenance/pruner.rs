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

/// One window of the walk over jobs created before the retention cutoff: the next `$2` ids
/// after `$3` (exclusive) below `$4`, the cutoff's ULID, in primary key order; of them,
/// those finished before the cutoff are deleted. A job is created before it finishes, so
/// every job finished before the cutoff has an id below it. No index on done_at: every ack
/// would add an entry to it (migrations/…_prune_by_id.sql). Windows, not a LIMIT on the
/// finished ones: the window is an index range scan whatever the statistics say of done_at
/// (a filtered LIMIT let the planner sequentially scan and sort the table when it believed
/// few jobs were old), and each starts where the last ended, so no statement steps over the
/// entries of the jobs deleted before it. Returns (window size, deleted, the window's last id).
const PRUNE_FINISHED: &str = r#"
WITH win AS MATERIALIZED (
    SELECT id FROM apalis.jobs WHERE id > $3 AND id < $4 ORDER BY id LIMIT $2
), gone AS (
    DELETE FROM apalis.jobs AS j
    WHERE j.id = ANY(ARRAY(SELECT id FROM win))
      AND j.status IN ('Done', 'Killed') AND j.done_at < now() - $1 * interval '1 second'
    RETURNING j.id
)
SELECT (SELECT count(*) FROM win), (SELECT count(*) FROM gone), (SELECT max(id) FROM win)
"#;

/// Worker rows silent for a day with no claimed batch left (the lease rescuer deletes a
/// silent worker's batches as it takes their jobs back).
const PRUNE_WORKERS: &str = r#"
DELETE FROM apalis.workers w
WHERE w.last_seen < now() - interval '1 day'
  AND NOT EXISTS (SELECT 1 FROM apalis.claims c WHERE c.worker_id = w.id)
"#;

pub async fn prune_finished(db: &PgPool, retention: Duration, batch: i64) -> Result<Pruned, sqlx::Error> {
    let mut pruned = Pruned::default();
    let upper = id_at(std::time::SystemTime::now().checked_sub(retention).unwrap_or(std::time::UNIX_EPOCH));
    let mut after = String::new();
    loop {
        let (window, deleted, last): (i64, i64, Option<String>) =
            sqlx::query_as(PRUNE_FINISHED).bind(retention.as_secs() as i64).bind(batch).bind(&after).bind(&upper).fetch_one(db).await?;
        pruned.jobs += deleted as u64;
        match last {
            Some(last) if window >= batch => after = last,
            _ => break,
        }
    }
    pruned.output_chunks = crate::output::prune(db, retention, batch).await?;
    pruned.workers = sqlx::query(PRUNE_WORKERS).execute(db).await?.rows_affected();
    Ok(pruned)
}

/// The smallest ULID of the millisecond `t`: every id generated before `t` sorts below it.
fn id_at(t: std::time::SystemTime) -> String {
    let ms = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    ulid::Ulid::from_parts(ms, 0).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enqueue::{NewJob, enqueue_many};
    use crate::output::{self, Chunk};
    use molecule_domain::testing::fresh_db;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn old_finished_jobs_and_output_go_in_batches_and_the_rest_stays() {
        let (db, _) = fresh_db().await;
        let mut conn = db.acquire().await.unwrap();
        let jobs: Vec<NewJob> = (0..25).map(|i| NewJob::to_queue("q", &serde_json::json!({ "i": i }))).collect();
        let mut ids: Vec<String> = enqueue_many(&mut conn, &jobs).await.unwrap().iter().map(|i| i.as_str().to_string()).collect();
        // The first 20 were created 8 days ago (ids are what the pruner's walk reads), a
        // millisecond apart in this order: 10..20 (which stay) first, so the first windows
        // delete nothing and the walk must go on past them.
        let week_ago = std::time::SystemTime::now() - Duration::from_secs(8 * 24 * 3600);
        for (i, id) in ids[..20].iter_mut().enumerate() {
            let ms = Duration::from_millis(((i + 10) % 20) as u64);
            let old = ulid::Ulid::from_datetime(week_ago + ms).to_string();
            sqlx::query("UPDATE apalis.jobs SET id = $2 WHERE id = $1").bind(&*id).bind(&old).execute(&db).await.unwrap();
            *id = old;
        }
        // 10 finished long ago, 5 created long ago but finished just now, 5 failed long ago
        // (will retry), 1 created now (its done_at faked: the walk stops at the cutoff's id),
        // 4 pending.
        let set = |range: std::ops::Range<usize>, sql: &'static str| {
            let ids: Vec<String> = ids[range].to_vec();
            let db = db.clone();
            async move { sqlx::query(sql).bind(ids).execute(&db).await.unwrap() }
        };
        set(0..6, "UPDATE apalis.jobs SET status = 'Done', done_at = now() - interval '8 days' WHERE id = ANY($1)").await;
        set(
            6..10,
            "UPDATE apalis.jobs SET status = 'Killed', outcome = 'interrupted', done_at = now() - interval '8 days' WHERE id = ANY($1)",
        )
        .await;
        set(10..15, "UPDATE apalis.jobs SET status = 'Done', done_at = now() WHERE id = ANY($1)").await;
        set(15..20, "UPDATE apalis.jobs SET status = 'Failed', run_at = now() - interval '8 days' WHERE id = ANY($1)").await;
        set(20..21, "UPDATE apalis.jobs SET status = 'Done', done_at = now() - interval '8 days' WHERE id = ANY($1)").await;
        for (k, id) in ids[..2].iter().enumerate() {
            let chunk = Chunk { seq: 1, stream: "stdout".into(), data: format!("old {k}") };
            output::append(&db, id, &[chunk]).await.unwrap();
        }
        sqlx::query("UPDATE exec_output SET created_at = now() - interval '8 days'").execute(&db).await.unwrap();
        output::append(&db, &ids[12], &[Chunk { seq: 1, stream: "stdout".into(), data: "new".into() }]).await.unwrap();

        let pruned = prune_finished(&db, Duration::from_secs(7 * 24 * 3600), 3).await.unwrap();
        assert_eq!(pruned.jobs, 10);
        assert_eq!(pruned.output_chunks, 2);
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs").fetch_one(&db).await.unwrap();
        assert_eq!(left, 15);
        let kept = output::read_after(&db, &ids[12], 0).await.unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(prune_finished(&db, Duration::from_secs(7 * 24 * 3600), 3).await.unwrap(), Pruned::default());
    }

    /// The walk is a range scan of the primary key from its cursor, in the custom and the
    /// generic plan, even when statistics say no job is old (a sequential scan would read
    /// the whole table once per window).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_walk_reads_the_primary_key_from_its_cursor() {
        let (db, _) = fresh_db().await;
        let mut conn = db.acquire().await.unwrap();
        let jobs: Vec<NewJob> = (0..2000).map(|i| NewJob::to_queue("q", &serde_json::json!({ "i": i }))).collect();
        enqueue_many(&mut conn, &jobs).await.unwrap();
        sqlx::query("UPDATE apalis.jobs SET status = 'Done', done_at = now()").execute(&mut *conn).await.unwrap();
        sqlx::query("ANALYZE apalis.jobs").execute(&mut *conn).await.unwrap();
        // PREPARE + EXPLAIN EXECUTE (no ANALYZE: nothing is deleted): the plan a prepared
        // statement really runs on.
        let prepare = format!("PREPARE walk(int8, int8, text, text) AS {PRUNE_FINISHED}");
        sqlx::raw_sql(sqlx::AssertSqlSafe(prepare)).execute(&mut *conn).await.unwrap();
        for mode in ["force_custom_plan", "force_generic_plan"] {
            sqlx::query(sqlx::AssertSqlSafe(format!("SET plan_cache_mode = {mode}"))).execute(&mut *conn).await.unwrap();
            let plan: Vec<String> = sqlx::query_scalar("EXPLAIN EXECUTE walk(604800, 1000, '', '7ZZZZZZZZZZZZZZZZZZZZZZZZZ')")
                .fetch_all(&mut *conn)
                .await
                .unwrap();
            let plan = plan.join("\n");
            assert!(plan.contains("Scan using jobs_pkey on jobs  ") && plan.contains("Index Cond: ((id > "), "{mode}: {plan}");
            assert!(!plan.contains("Seq Scan"), "{mode}: {plan}");
        }
    }
}
