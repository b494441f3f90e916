//! The lease rescuer: a job is held by its worker's row in `apalis.workers`, which the
//! worker's process upserts every heartbeat — through the whole shutdown grace period,
//! until its last job is acked. A job whose worker row is older than the lease (or gone)
//! belongs to a dead process: it is handed back with its lock cleared — to run again, or
//! `dead` when that was its last attempt, or `interrupted` when its kind must not run
//! twice. A live worker's jobs are never touched; a late ack from a worker that was
//! merely slow is refused by its fence (see `store::ack`).
//!
//! Where it looks ([`Scope`]): every third of a lease, the claimed batches of silent
//! workers (`apalis.claims`: a small table, the only record of running jobs by worker —
//! an index on running jobs would make every ack a non-HOT update, migrations/…_claims.sql).
//! Now and then, the whole job table: for jobs that have no batch row (claimed by a
//! version from before the claims table during a rolling upgrade, or by apalis' own
//! fetcher) and for whatever the batch bookkeeping might miss.

use sqlx::PgPool;
use std::time::Duration;

/// Which jobs a rescue looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Those named by the claimed batches of silent or vanished workers; the batches' rows
    /// go in the same statement (one rescuer takes each: the others skip the rows it
    /// holds). Reads `apalis.claims` and the jobs by key.
    ClaimedBatches,
    /// Every running job of the table whose worker is silent or gone: a sequential scan.
    WholeTable,
}

/// `$stale`: a CTE named `stale` (preceded by any it needs), the ids of the jobs to take
/// and the fences of the claims it found them under, as of the statement's snapshot.
/// `locked` then locks them in id order — one order for every rescuer, so two never hold
/// rows the other waits for — `$wait` saying how ("" waits, "SKIP LOCKED" skips). A row
/// updated since the snapshot is re-checked on its newest version as the lock is taken:
/// a job released and claimed again since (by the same worker id, recovered meanwhile:
/// the rescuer's snapshot still has it silent) is a newer attempt, never failed for the
/// older one's lapse. The UPDATE takes only what `locked` holds, so it waits for nothing.
macro_rules! rescue_sql {
    ($stale:literal, $wait:literal) => {
        concat!(
            "WITH ",
            $stale,
            ", locked AS (
    SELECT j.id, s.fence
    FROM apalis.jobs j JOIN stale s ON s.id = j.id
    WHERE j.fence = s.fence AND j.status IN ('Queued', 'Running')
    ORDER BY j.id
    FOR UPDATE OF j ",
            $wait,
            "
), verdict AS (
    SELECT j.id, l.fence,
           CASE WHEN j.job_type = ANY($2) THEN 'interrupted'
                WHEN j.attempts >= j.max_attempts THEN 'dead' END AS outcome
    FROM apalis.jobs j JOIN locked l ON l.id = j.id
)
UPDATE apalis.jobs AS j
SET status  = CASE WHEN v.outcome IS NULL THEN 'Failed' ELSE 'Killed' END,
    outcome = v.outcome,
    done_at = CASE WHEN v.outcome IS NULL THEN NULL ELSE now() END,
    run_at = now(),
    lock_by = NULL,
    -- Claimable again (the claim index holds rows without lock_at) only when it runs again.
    lock_at = CASE WHEN v.outcome IS NULL THEN NULL ELSE COALESCE(j.lock_at, now()) END,
    last_error = CASE WHEN v.outcome = 'interrupted' THEN $4 ELSE $3 END,
    -- Which worker it was is for operators only (it names a host and a pid).
    last_error_detail = 'worker lost: no heartbeat within the lease from ' || COALESCE(j.lock_by, 'an unknown worker'),
    last_result = jsonb_build_object('Err', CASE WHEN v.outcome = 'interrupted' THEN $4 ELSE $3 END),
    attempt_log = j.attempt_log || jsonb_build_array(jsonb_build_object(
        'attempt', j.attempts, 'started_at', j.started_at, 'failed_at', now(),
        'error', CASE WHEN v.outcome = 'interrupted' THEN $4 ELSE $3 END))
FROM verdict v
WHERE j.id = v.id AND j.fence = v.fence AND j.status IN ('Queued', 'Running')
RETURNING j.job_type, v.outcome"
        )
    };
}

/// Batch rows another rescuer holds are skipped (it takes their jobs; two rescuers waiting
/// for each other's rows would deadlock). The jobs are waited for, not skipped: their
/// batch rows go with this statement, so a job skipped here would be left to the
/// whole-table scan. A job row it waits for (a late ack's, a new claim's) is re-checked
/// once it has it. Other rescuers lock in the same order or skip; an ack batch of the
/// recovering worker locks in its own, and a deadlock with it aborts one of the two
/// statements, each retried (the rescue with its batch rows, a third of a lease later).
/// `stale` locks nothing: a locking read returns the newest version of a row, whose fence
/// would be the new claim's.
const RESCUE_CLAIMED: &str = rescue_sql!(
    "ended AS (
    DELETE FROM apalis.claims c
    WHERE c.id = ANY(ARRAY(
        SELECT b.id FROM apalis.claims b
        WHERE NOT EXISTS (SELECT 1 FROM apalis.workers w
                          WHERE w.id = b.worker_id AND w.last_seen >= now() - $1 * interval '1 millisecond')
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING c.worker_id, c.ids
), stale AS (
    SELECT j.id, j.fence
    FROM ended e CROSS JOIN LATERAL unnest(e.ids) AS u(id)
    JOIN apalis.jobs j ON j.id = u.id AND j.lock_by = e.worker_id
    WHERE j.status IN ('Queued', 'Running')
)",
    ""
);

/// A locked job row (a late ack's, a claim's, another rescue's) is skipped, left to the
/// next scan: every process runs this scan, and waiting in scan order for rows a batch
/// rescue, an ack batch or another scan holds could deadlock, aborting the whole rescue.
const RESCUE_WHOLE_TABLE: &str = rescue_sql!(
    "stale AS (
    SELECT j.id, j.fence
    FROM apalis.jobs j
    LEFT JOIN apalis.workers w ON w.id = j.lock_by
    WHERE j.status IN ('Queued', 'Running')
      AND (w.id IS NULL OR w.last_seen < now() - $1 * interval '1 millisecond')
)",
    "SKIP LOCKED"
);

/// Hands back the jobs of workers silent for longer than `lease`, among those `scope`
/// names. `run_once` names the queues whose jobs must not run twice (they end
/// `interrupted`). Safe on many processes at once. Returns how many jobs it took.
pub async fn rescue_expired_leases(db: &PgPool, lease: Duration, run_once: &[&str], scope: Scope) -> Result<u64, sqlx::Error> {
    let sql = match scope {
        Scope::ClaimedBatches => RESCUE_CLAIMED,
        Scope::WholeTable => RESCUE_WHOLE_TABLE,
    };
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(sql)
        .bind(lease.as_millis() as i64)
        .bind(run_once)
        .bind(crate::failures::public("worker_lost"))
        .bind(crate::failures::public("interrupted"))
        .fetch_all(db)
        .await?;
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

/// The claim of a version from before the batch rows (jobs/src/store/claim.rs at
/// f66f40c): `id` Running under `worker`, no batch row names it.
#[cfg(test)]
pub(crate) async fn claim_without_batch_row(db: &PgPool, id: &str, worker: &str) {
    sqlx::query(
        "UPDATE apalis.jobs SET status = 'Running', lock_by = $2, lock_at = now(), started_at = now(), \
         attempts = attempts + 1, fence = fence + 1 WHERE id = $1",
    )
    .bind(id)
    .bind(worker)
    .execute(db)
    .await
    .unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enqueue::{NewJob, enqueue};
    use crate::store;
    use crate::store::workers::{WorkerRow, heartbeat};
    use molecule_domain::testing::fresh_db;

    async fn state(db: &PgPool, id: &str) -> (String, Option<String>, Option<String>, i32) {
        sqlx::query_as("SELECT status, outcome, lock_by, attempts FROM apalis.jobs WHERE id = $1").bind(id).fetch_one(db).await.unwrap()
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
            let c = store::claim_each_shard(&db, queue, 1, &worker.id).await.unwrap();
            assert_eq!(c.len(), 1);
        }
        age_worker(&db, "q@silent", 60).await;
        age_worker(&db, "once@silent", 60).await;

        let n = rescue_expired_leases(&db, Duration::from_secs(30), &["once"], Scope::ClaimedBatches).await.unwrap();
        assert_eq!(n, 2);
        let batches: Vec<String> = sqlx::query_scalar("SELECT worker_id FROM apalis.claims").fetch_all(&db).await.unwrap();
        assert_eq!(batches, vec!["q@alive".to_string()], "the silent workers' batch rows went with the rescue");
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
        assert_eq!(rescue_expired_leases(&db, Duration::from_secs(30), &["once"], Scope::ClaimedBatches).await.unwrap(), 0);
        let (_, _, lock, attempts) = state(&db, &by("q@alive").unwrap()).await;
        assert_eq!((lock.as_deref(), attempts), (Some("q@alive"), 1));
    }

    /// The silent worker recovers while a rescue runs: it released the job and claimed it
    /// again under the same worker id (a new fence, a new batch row), committing after the
    /// rescue's snapshot. The rescue, waiting for the row, must leave the newer attempt
    /// alone (it failed it: the job ran twice at once, here and after its retry elsewhere).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rescue_waiting_for_a_job_claimed_again_leaves_the_newer_attempt_alone() {
        let (db, _) = fresh_db().await;
        let mut conn = db.acquire().await.unwrap();
        let w = WorkerRow { id: "q@recovering".into(), queue: "q".into(), concurrency: 1 };
        heartbeat(&mut conn, std::slice::from_ref(&w)).await.unwrap();
        let id = enqueue(&mut conn, &NewJob::to_queue("q", &serde_json::json!({})).max_attempts(3)).await.unwrap();
        let first = store::claim_each_shard(&db, "q", 1, &w.id).await.unwrap().remove(0);
        age_worker(&db, &w.id, 60).await;
        // The hand-back and the new claim, in one transaction left open: the row is locked.
        let mut again = db.begin().await.unwrap();
        sqlx::query("UPDATE apalis.jobs SET fence = fence + 1, lock_at = now(), started_at = now() WHERE id = $1")
            .bind(id.as_str())
            .execute(&mut *again)
            .await
            .unwrap();
        sqlx::query("INSERT INTO apalis.claims (worker_id, ids) VALUES ($1, ARRAY[$2])")
            .bind(&w.id)
            .bind(id.as_str())
            .execute(&mut *again)
            .await
            .unwrap();
        let db2 = db.clone();
        let rescue = tokio::spawn(async move { rescue_expired_leases(&db2, Duration::from_secs(30), &[], Scope::ClaimedBatches).await });
        molecule_domain::testing::until_a_statement_waits_on_a_lock(&db, "%DELETE FROM apalis.claims c%").await;
        again.commit().await.unwrap();
        assert_eq!(rescue.await.unwrap().unwrap(), 0, "the claim it found is over; the newer one is not its to take");
        let (status, fence): (String, i64) =
            sqlx::query_as("SELECT status, fence FROM apalis.jobs WHERE id = $1").bind(id.as_str()).fetch_one(&db).await.unwrap();
        assert_eq!((status.as_str(), fence), ("Running", first.fence + 1));
        let (_, _, lock, attempts) = state(&db, id.as_str()).await;
        assert_eq!((lock.as_deref(), attempts), (Some(w.id.as_str()), 1));
    }

    /// Every process runs the whole-table scan: one waiting for a row another statement
    /// holds (a batch rescue, an ack batch, another scan locking in another order) could
    /// deadlock and lose the whole rescue. A held row is skipped, taken by a later scan.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_whole_table_scan_skips_a_job_another_statement_holds() {
        let (db, _) = fresh_db().await;
        let mut conn = db.acquire().await.unwrap();
        let old = WorkerRow { id: "q@gone".into(), queue: "q".into(), concurrency: 2 };
        heartbeat(&mut conn, std::slice::from_ref(&old)).await.unwrap();
        let mut ids = Vec::new();
        for _ in 0..2 {
            let id = enqueue(&mut conn, &NewJob::to_queue("q", &serde_json::json!({})).max_attempts(3)).await.unwrap();
            claim_without_batch_row(&db, id.as_str(), &old.id).await;
            ids.push(id);
        }
        age_worker(&db, &old.id, 60).await;
        let mut holder = db.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM apalis.jobs WHERE id = $1 FOR UPDATE").bind(ids[0].as_str()).execute(&mut *holder).await.unwrap();
        let lease = Duration::from_secs(30);
        let scan = rescue_expired_leases(&db, lease, &[], Scope::WholeTable);
        let n = tokio::time::timeout(Duration::from_secs(10), scan).await.expect("the scan waited for the held row").unwrap();
        assert_eq!(n, 1, "the free job only");
        assert_eq!(state(&db, ids[0].as_str()).await.0, "Running");
        assert_eq!(state(&db, ids[1].as_str()).await.0, "Failed");
        holder.commit().await.unwrap();
        assert_eq!(rescue_expired_leases(&db, lease, &[], Scope::WholeTable).await.unwrap(), 1, "the next scan takes it");
        assert_eq!(state(&db, ids[0].as_str()).await.0, "Failed");
    }

    /// A job running with no batch row (claimed by a version from before apalis.claims, or
    /// by apalis' own fetcher, which sets `Queued`) is invisible to the batch scope; the
    /// whole-table scope takes it once its worker is silent, and only then.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_claimed_without_a_batch_row_is_rescued_by_the_whole_table_scan() {
        let (db, _) = fresh_db().await;
        let mut conn = db.acquire().await.unwrap();
        let old = WorkerRow { id: "q@old-version".into(), queue: "q".into(), concurrency: 1 };
        heartbeat(&mut conn, std::slice::from_ref(&old)).await.unwrap();
        let id = enqueue(&mut conn, &NewJob::to_queue("q", &serde_json::json!({})).max_attempts(3)).await.unwrap();
        claim_without_batch_row(&db, id.as_str(), &old.id).await;
        // The same worker's other job, claimed with a batch row.
        let batched = enqueue(&mut conn, &NewJob::to_queue("q", &serde_json::json!({}))).await.unwrap();
        assert_eq!(store::claim_each_shard(&db, "q", 1, &old.id).await.unwrap()[0].id, batched.as_str());
        let lease = Duration::from_secs(30);
        assert_eq!(rescue_expired_leases(&db, lease, &[], Scope::WholeTable).await.unwrap(), 0, "its worker is alive");
        age_worker(&db, &old.id, 60).await;
        assert_eq!(rescue_expired_leases(&db, lease, &[], Scope::ClaimedBatches).await.unwrap(), 1, "the batched job only");
        assert_eq!(state(&db, batched.as_str()).await.0, "Failed");
        assert_eq!(state(&db, id.as_str()).await.0, "Running", "no batch names it");
        assert_eq!(rescue_expired_leases(&db, lease, &[], Scope::WholeTable).await.unwrap(), 1);
        let (status, outcome, lock, _) = state(&db, id.as_str()).await;
        assert_eq!((status.as_str(), outcome, lock), ("Failed", None, None));
        // Claimable again: back in the claim index (lock_at cleared), taken by the next claims.
        let mut again: Vec<String> = store::claim_each_shard(&db, "q", 5, "q@new").await.unwrap().into_iter().map(|c| c.id).collect();
        again.sort();
        let mut want = vec![id.as_str().to_string(), batched.as_str().to_string()];
        want.sort();
        assert_eq!(again, want);
    }
}
