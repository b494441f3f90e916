//! Claims: one statement takes up to N due jobs of one shard of a queue, bumps their fence, counts
//! the attempt, and records the batch (worker and job ids) in `apalis.claims`: that row,
//! not an index on running jobs, is how a dead worker's jobs are found (maintenance/
//! lease_rescuer.rs). The runtime deletes it with the ack of the batch's last job.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::cmp::Reverse;
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
    /// Its place in claim order, with `id` (for [`ClaimCursor`]): apalis' column is
    /// nullable; NULL sorts first.
    pub priority: Option<i32>,
    /// When it was due.
    pub run_at: DateTime<Utc>,
    /// The claimed batch's row in `apalis.claims` (the same for every job of a claim).
    pub batch: i64,
    /// Where the claim left the row version (its ctid as text): the ack's way straight to it.
    pub tid: String,
    /// Its columns did not decode (why): not to be run, it ends `dead` ([`decode`]).
    #[sqlx(skip)]
    pub unreadable: Option<String>,
}

#[cfg(test)]
impl Claimed {
    /// A claimed job as the claim order sees it (for tests of the order and the cursor).
    pub(crate) fn for_test(id: &str, priority: Option<i32>, run_at_s: i64) -> Self {
        Claimed {
            id: id.into(),
            job: vec![],
            attempts: 1,
            max_attempts: 1,
            org_id: None,
            workspace_id: None,
            expired: false,
            fence: 1,
            priority,
            run_at: DateTime::from_timestamp(run_at_s, 0).expect("a valid timestamp"),
            batch: 1,
            tid: "(0,1)".into(),
            unreadable: None,
        }
    }
}

/// How many claim shards a queue has. A job's shard is a hash of its id (the claim
/// index's second column: migrations/…_claim_shard_idx.sql), and a pool runs one fetcher
/// per shard (runtime/pool.rs): two claims of one queue in flight, on disjoint index
/// ranges, so neither steps over the rows the other is claiming.
pub const CLAIM_SHARDS: usize = 2;

/// One of a queue's [`CLAIM_SHARDS`] claim shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shard(i32);

/// A job's shard, in SQL over its `id`: the claim index's expression
/// (migrations/…_claim_shard_idx.sql), which every claim repeats to use it; the insert
/// trigger's NOTIFY names shards by it too (migrations/…_notify_names_shards.sql).
macro_rules! shard_of_id {
    () => {
        "(hashtext(id) & 1)"
    };
}

// The mask above and the index's expression make two shards; the constant must agree.
const _: () = assert!(CLAIM_SHARDS == 2, "shard_of_id! and jobs_claim_shard_idx mask with & 1");

impl Shard {
    pub fn all() -> impl Iterator<Item = Shard> {
        (0..CLAIM_SHARDS as i32).map(Shard)
    }

    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The shard of the job `id`.
    pub async fn of(db: &PgPool, id: &str) -> Result<Shard, sqlx::Error> {
        let sql = concat!("SELECT ", shard_of_id!(), " FROM (SELECT $1::text AS id) AS j");
        sqlx::query_scalar(sql).bind(id).fetch_one(db).await.map(Shard)
    }
}

/// Where a claim ended in claim order (priority descending, then run_at, then id): the
/// next claim may start after it ([`claim_after`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimCursor {
    priority: i32,
    run_at: DateTime<Utc>,
    id: String,
}

impl ClaimCursor {
    /// The last of `claimed` in claim order; None when empty or when no job has a
    /// priority (a NULL priority sorts first, so it is last only when all are NULL, and
    /// it cannot be a cursor's equality bound).
    pub fn after(claimed: &[Claimed]) -> Option<Self> {
        let (Reverse(priority), run_at, id) =
            claimed.iter().filter_map(|c| c.priority.map(|p| (Reverse(p), c.run_at, c.id.as_str()))).max()?;
        Some(ClaimCursor { priority, run_at, id: id.to_string() })
    }
}

/// `ctid = ANY(ARRAY(…))` takes exactly the row versions the subquery locked, with no
/// index lookup (by `id`, the primary key's, it cost a descent per job); a join against
/// the CTE let the planner hash-join a sequential scan of the whole table (slower with
/// every row kept). A version the subquery found updated by a transaction that committed
/// after this statement's snapshot is not matched (the update re-checks `ctid` on the
/// newest version): that job is left to the next claim, never taken twice.
/// `lock_at IS NULL` is the claim index's predicate (migrations/…_claims.sql says why not
/// `status`); the status test stays beside it, so a row some path ended without setting
/// lock_at is stepped over, never claimed. The update repeats only the status test: the
/// subquery's locks keep the versions it found as they were, and `lock_at IS NULL` there
/// would let the planner take the rows through a scan of the claim index — which a
/// generic plan made while that index was small does, whatever it holds later
/// (maintenance/stats_refresher.rs: how a plan made on an empty table is remade).
macro_rules! claim_sql {
    ($after:literal) => {
        concat!(
            "WITH taken AS (
UPDATE apalis.jobs AS j
SET status = 'Running', lock_by = $3, lock_at = now(), started_at = now(),
    attempts = j.attempts + 1, fence = j.fence + 1
WHERE j.ctid = ANY(ARRAY(
    SELECT ctid FROM apalis.jobs
    WHERE job_type = $1 AND ",
            shard_of_id!(),
            " = $4 AND lock_at IS NULL AND status IN ('Pending', 'Failed') AND run_at <= now()",
            $after,
            "
    ORDER BY priority DESC, run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)) AND j.status IN ('Pending', 'Failed')
RETURNING j.id, j.job, j.attempts, j.max_attempts, j.org_id, j.workspace_id,
          (j.expires_at IS NOT NULL AND j.expires_at <= now()) AS expired, j.fence,
          j.priority, j.run_at, j.ctid::text AS tid
), batch AS (
    INSERT INTO apalis.claims (worker_id, ids)
    SELECT $3, array_agg(id) FROM taken HAVING count(*) > 0
    RETURNING id
)
SELECT taken.*, (SELECT id FROM batch) AS batch FROM taken"
        )
    };
}

pub(crate) const CLAIM: &str = claim_sql!("");

/// Claimed jobs leave the claim index only when a vacuum reaches it: until then every
/// claim from the head of a queue steps over the entries of all the jobs claimed before
/// (a 1M-job drain: 10 µs per claimed job at the start, 18 at the end, the ack flat).
/// Starting at the cursor skips them (flat 9–10 µs). Same priority only: that is where
/// the index range is contiguous.
const CLAIM_AFTER: &str = claim_sql!("\n      AND priority = $5 AND (run_at, id) > ($6, $7)");

/// Claims up to `limit` due jobs of `queue`'s `shard` for `worker`.
pub async fn claim(db: &PgPool, queue: &str, shard: Shard, limit: i64, worker: &str) -> Result<Vec<Claimed>, sqlx::Error> {
    decode(sqlx::query(CLAIM).bind(queue).bind(limit).bind(worker).bind(shard.0).fetch_all(db).await?)
}

/// The claimed rows, each decoded on its own: a row with a NULL where none belongs (a
/// column altered by hand) is handed over [`Claimed::unreadable`], with what its ack
/// needs, to end `dead` — not made the whole claim's error, which its batch-mates would
/// share, and which would take it again after every hand-back. Any other decode error
/// is the claim's: a column whose type is not the one this build reads (a migration
/// of a newer version, mid rolling deploy) fails every row alike, and the claim's jobs
/// go back uncounted (the fetcher settles a failed claim) for a process that reads them.
fn decode(rows: Vec<sqlx::postgres::PgRow>) -> Result<Vec<Claimed>, sqlx::Error> {
    use sqlx::{FromRow, Row};
    rows.iter()
        .map(|row| match Claimed::from_row(row) {
            Ok(c) => Ok(c),
            Err(sqlx::Error::ColumnDecode { source, .. }) if source.is::<sqlx::error::UnexpectedNullError>() => Ok(Claimed {
                id: row.try_get("id")?,
                fence: row.try_get("fence")?,
                batch: row.try_get("batch")?,
                tid: row.try_get("tid")?,
                attempts: row.try_get("attempts").unwrap_or(1),
                max_attempts: row.try_get("max_attempts").unwrap_or(1),
                run_at: row.try_get("run_at").unwrap_or_default(),
                // No priority: never the claim cursor (ClaimCursor::after skips NULL).
                priority: None,
                job: Vec::new(),
                org_id: None,
                workspace_id: None,
                expired: false,
                unreadable: Some(format!("a NULL where this build reads a value: {source}")),
            }),
            Err(e) => Err(e),
        })
        .collect()
}

/// [`claim`], of the jobs after `cursor` in claim order (of its priority) only. The others
/// are left to a [`claim`] from the head: runtime/claim_start.rs says when one follows.
pub async fn claim_after(
    db: &PgPool,
    queue: &str,
    shard: Shard,
    limit: i64,
    worker: &str,
    cursor: &ClaimCursor,
) -> Result<Vec<Claimed>, sqlx::Error> {
    decode(
        sqlx::query(CLAIM_AFTER)
            .bind(queue)
            .bind(limit)
            .bind(worker)
            .bind(shard.0)
            .bind(cursor.priority)
            .bind(cursor.run_at)
            .bind(&cursor.id)
            .fetch_all(db)
            .await?,
    )
}

/// Claims up to `limit` due jobs of `queue` for `worker`, from each shard in turn until
/// `limit` are taken (one batch per shard): in claim order within a shard, in none across
/// them. For tools and tests that act as a worker without a pool.
pub async fn claim_each_shard(db: &PgPool, queue: &str, limit: i64, worker: &str) -> Result<Vec<Claimed>, sqlx::Error> {
    let mut claimed = Vec::new();
    for shard in Shard::all() {
        let left = limit - claimed.len() as i64;
        if left <= 0 {
            break;
        }
        claimed.extend(claim(db, queue, shard, left, worker).await?);
    }
    Ok(claimed)
}

/// The batches of `worker`'s claims in `shard` whose rows exist but which the worker does
/// not know (not among `known`): a claim that committed but whose answer never came (a
/// connection cut after the commit). Their jobs are handed back (the attempt not counted:
/// none of them started, and an exec, which has one attempt, must not end for it) and
/// their rows removed: the worker's heartbeat keeps them from every rescuer, so nobody
/// else ever would. A row that does not decode does not fail its claim ([`claim`] hands it
/// over as [`Claimed::unreadable`]), so it cannot bring its batch back here again and
/// again. Only the shard's own fetcher, between its claims, may call this: the other
/// shard's claims are never touched.
const RELEASE_UNKNOWN: &str = concat!(
    "WITH orphan AS (
    DELETE FROM apalis.claims c
    WHERE c.worker_id = $1 AND c.id <> ALL($3::int8[])
      AND (SELECT ",
    shard_of_id!(),
    " FROM (SELECT c.ids[1] AS id) AS first) = $2
    RETURNING c.ids
)
UPDATE apalis.jobs AS j
SET status = 'Pending', run_at = now(), attempts = greatest(j.attempts - 1, 0),
    lock_by = NULL, lock_at = NULL, started_at = NULL
FROM (SELECT DISTINCT u.id FROM orphan CROSS JOIN LATERAL unnest(orphan.ids) AS u(id)) AS o
WHERE j.id = o.id AND j.lock_by = $1 AND j.status = 'Running'
  -- Claimed again since by a batch the worker knows (its attempt runs): not this claim's.
  AND NOT EXISTS (SELECT 1 FROM apalis.claims k WHERE k.worker_id = $1 AND k.id = ANY($3::int8[]) AND j.id = ANY(k.ids))
RETURNING j.id"
);

/// Hands back the jobs of `worker`'s batches in `shard` other than `known` ([`RELEASE_UNKNOWN`]);
/// how many.
pub async fn release_unknown_batches(db: &PgPool, worker: &str, shard: Shard, known: &[i64]) -> Result<u64, sqlx::Error> {
    let ids: Vec<String> = sqlx::query_scalar(RELEASE_UNKNOWN).bind(worker).bind(shard.0).bind(known).fetch_all(db).await?;
    Ok(ids.len() as u64)
}

/// Milliseconds until the queue's shard's next job is due (negative: due now), NULL when empty.
const NEXT_DUE: &str = concat!(
    "SELECT (EXTRACT(EPOCH FROM (min(run_at) - now())) * 1000)::float8
FROM apalis.jobs
WHERE job_type = $1 AND ",
    shard_of_id!(),
    " = $2 AND lock_at IS NULL AND status IN ('Pending', 'Failed')"
);

pub async fn next_due_ms(db: &PgPool, queue: &str, shard: Shard) -> Result<Option<f64>, sqlx::Error> {
    sqlx::query_scalar(NEXT_DUE).bind(queue).bind(shard.0).fetch_one(db).await
}

/// [`NEXT_DUE`] of the jobs after `cursor` in claim order (of its priority).
const NEXT_DUE_AFTER: &str = concat!(
    "SELECT (EXTRACT(EPOCH FROM (min(run_at) - now())) * 1000)::float8
FROM apalis.jobs
WHERE job_type = $1 AND ",
    shard_of_id!(),
    " = $5 AND lock_at IS NULL AND status IN ('Pending', 'Failed') AND priority = $2 AND (run_at, id) > ($3, $4)"
);

pub async fn next_due_after_ms(db: &PgPool, queue: &str, shard: Shard, cursor: &ClaimCursor) -> Result<Option<f64>, sqlx::Error> {
    sqlx::query_scalar(NEXT_DUE_AFTER)
        .bind(queue)
        .bind(cursor.priority)
        .bind(cursor.run_at)
        .bind(&cursor.id)
        .bind(shard.0)
        .fetch_one(db)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enqueue::{NewJob, enqueue, enqueue_many};
    use crate::store::table_reads;
    use molecule_domain::testing::fresh_db;
    use serde_json::{Value, json};

    fn job(id: &str, priority: Option<i32>, run_at_s: i64) -> Claimed {
        Claimed::for_test(id, priority, run_at_s)
    }

    #[test]
    fn the_cursor_is_the_last_job_in_claim_order() {
        // Priority descending, then run_at, then id: the last is the lowest priority's latest.
        let claimed = [job("a", Some(5), 30), job("c", Some(0), 10), job("b", Some(0), 20), job("d", Some(0), 20)];
        assert_eq!(ClaimCursor::after(&claimed), Some(ClaimCursor { priority: 0, run_at: claimed[3].run_at, id: "d".into() }));
        assert_eq!(ClaimCursor::after(&[]), None);
        // NULL sorts first (priority DESC): the last is the last job with a priority.
        let mixed = [job("a", Some(0), 1), job("b", None, 2)];
        assert_eq!(ClaimCursor::after(&mixed), Some(ClaimCursor { priority: 0, run_at: mixed[0].run_at, id: "a".into() }));
        assert_eq!(ClaimCursor::after(&[job("b", None, 2)]), None, "no cursor on a NULL priority");
    }

    async fn push(db: &PgPool, job: NewJob) -> String {
        let mut conn = db.acquire().await.unwrap();
        enqueue(&mut conn, &job).await.unwrap().as_str().to_string()
    }

    /// Enqueues `job` until a copy of it lands in `shard` (a job's shard is a hash of its
    /// id); the copies that did not are deleted.
    async fn push_to(db: &PgPool, shard: Shard, job: NewJob) -> String {
        loop {
            let id = push(db, job.clone()).await;
            if Shard::of(db, &id).await.unwrap() == shard {
                return id;
            }
            sqlx::query("DELETE FROM apalis.jobs WHERE id = $1").bind(&id).execute(db).await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_shard_is_claimed_on_its_own_and_every_job_is_in_one() {
        let (db, _) = fresh_db().await;
        let mut conn = db.acquire().await.unwrap();
        let backlog: Vec<NewJob> = (0..200).map(|_| NewJob::to_queue("q", &json!({}))).collect();
        enqueue_many(&mut conn, &backlog).await.unwrap();
        let mut taken = Vec::new();
        for shard in Shard::all() {
            let claimed = claim(&db, "q", shard, 1000, "w").await.unwrap();
            // Both shards get a share (200 random ids: one empty has odds of 2^-199).
            assert!(!claimed.is_empty(), "{shard:?} is empty");
            for c in &claimed {
                assert_eq!(Shard::of(&db, &c.id).await.unwrap(), shard, "{} claimed from another shard", c.id);
            }
            assert!(claim(&db, "q", shard, 1000, "w").await.unwrap().is_empty(), "{shard:?} drained");
            taken.extend(claimed.into_iter().map(|c| c.id));
        }
        taken.sort();
        taken.dedup();
        assert_eq!(taken.len(), 200, "every job is in exactly one shard");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_from_a_cursor_leaves_the_jobs_before_it_to_a_claim_from_the_head() {
        let (db, _) = fresh_db().await;
        let s = Shard::all().next().unwrap();
        for _ in 0..6 {
            push_to(&db, s, NewJob::to_queue("q", &json!({}))).await;
        }
        let first = claim(&db, "q", s, 2, "w").await.unwrap();
        let cursor = ClaimCursor::after(&first).unwrap();
        // Two jobs that sort before the cursor: a higher priority, and an earlier run_at.
        let urgent = push_to(&db, s, NewJob::to_queue("q", &json!({})).priority(5)).await;
        let overdue = push_to(&db, s, NewJob::to_queue("q", &json!({})).run_at(Utc::now() - chrono::Duration::hours(1))).await;

        let mut after: Vec<String> = claim_after(&db, "q", s, 10, "w", &cursor).await.unwrap().into_iter().map(|c| c.id).collect();
        after.sort();
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM apalis.jobs WHERE status = 'Pending' AND id <> ALL($1) ORDER BY id")
            .bind([urgent.as_str(), overdue.as_str()])
            .fetch_all(&db)
            .await
            .unwrap();
        assert!(ids.is_empty(), "the claim from the cursor took the rest of the backlog");
        assert_eq!(after.len(), 4, "the four jobs after the cursor: {after:?}");
        assert!(!after.contains(&urgent) && !after.contains(&overdue));
        // From the head, in claim order (one at a time: RETURNING's order is not the claim's).
        assert_eq!(claim(&db, "q", s, 1, "w").await.unwrap()[0].id, urgent);
        assert_eq!(claim(&db, "q", s, 1, "w").await.unwrap()[0].id, overdue);
        assert!(claim_each_shard(&db, "q", 1, "w").await.unwrap().is_empty());
    }

    /// The scan of the claim index in a plan: its Index Cond and the shared buffers it touched.
    fn claim_index_scan(plan: &Value) -> Option<(String, u64)> {
        if plan.get("Index Name").and_then(Value::as_str) == Some("jobs_claim_shard_idx") {
            let cond = plan.get("Index Cond").and_then(Value::as_str).unwrap_or_default().to_string();
            let buffers = ["Shared Hit Blocks", "Shared Read Blocks"].iter().filter_map(|k| plan.get(*k).and_then(Value::as_u64)).sum();
            return Some((cond, buffers));
        }
        plan.get("Plans").and_then(Value::as_array).into_iter().flatten().find_map(claim_index_scan)
    }

    /// What the cursor is for: the entries of jobs claimed before stay in the claim index
    /// until a vacuum, and a claim from the head steps over every one of them; from the
    /// cursor the index scan starts after them (the row comparison is in its Index Cond,
    /// in the custom and in the generic plan a prepared statement ends up with).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn from_the_cursor_a_claim_steps_over_none_of_the_jobs_claimed_before() {
        let (db, _) = fresh_db().await;
        // A vacuum now would remove the entries this test is about.
        sqlx::query("ALTER TABLE apalis.jobs SET (autovacuum_enabled = off)").execute(&db).await.unwrap();
        let mut conn = db.acquire().await.unwrap();
        let jobs: Vec<NewJob> = (0..20_000).map(|_| NewJob::to_queue("q", &json!({}))).collect();
        enqueue_many(&mut conn, &jobs).await.unwrap();
        sqlx::query("VACUUM ANALYZE apalis.jobs").execute(&db).await.unwrap();
        // 9,000 of the shard's 10,000 or so.
        let (s, mut cursor) = (Shard::all().next().unwrap(), None);
        for _ in 0..18 {
            cursor = ClaimCursor::after(&claim(&db, "q", s, 500, "w").await.unwrap());
        }
        let c = cursor.unwrap();
        let mut touched = Vec::new();
        for (sql, types, args) in [
            (CLAIM, "text, int8, text, int4", format!("'q', 50, 'w', {}", s.0)),
            (
                CLAIM_AFTER,
                "text, int8, text, int4, int4, timestamptz, text",
                format!("'q', 50, 'w', {}, {}, '{}', '{}'", s.0, c.priority, c.run_at.to_rfc3339(), c.id),
            ),
        ] {
            for mode in ["force_custom_plan", "force_generic_plan"] {
                let mut tx = db.begin().await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL plan_cache_mode = {mode}"))).execute(&mut *tx).await.unwrap();
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PREPARE claim_plan ({types}) AS {sql}"))).execute(&mut *tx).await.unwrap();
                let explain = sqlx::AssertSqlSafe(format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE claim_plan ({args})"));
                let plan: Value = sqlx::query_scalar(explain).fetch_one(&mut *tx).await.unwrap();
                sqlx::raw_sql("DEALLOCATE claim_plan").execute(&mut *tx).await.unwrap();
                tx.rollback().await.unwrap();
                assert_eq!(plan[0]["Plan"]["Actual Rows"].as_u64(), Some(50), "{mode}: both claim 50: {plan:#}");
                let (cond, buffers) =
                    claim_index_scan(&plan[0]["Plan"]).unwrap_or_else(|| panic!("{mode}: no scan of the claim index: {plan:#}"));
                // The update takes the versions the scan locked by ctid: no primary key lookup.
                let mut reads = table_reads(&plan[0]["Plan"]);
                reads.sort();
                assert_eq!(reads, ["Index Scan jobs_claim_shard_idx", "Tid Scan -"], "{mode}: {plan:#}");
                // The shard bounds the index range (no filter over the other shard's entries).
                assert!(cond.contains("hashtext(id) & 1"), "{mode}: the shard is not in the Index Cond: {cond}");
                if sql == CLAIM_AFTER {
                    assert!(cond.contains("ROW(run_at, id) >"), "{mode}: the scan does not start at the cursor: {cond}");
                }
                touched.push(buffers);
            }
        }
        // Custom plans: from the head, then from the cursor.
        let (head, after) = (touched[0], touched[2]);
        assert!(after > 0 && head >= 3 * after, "claim index buffers: from the head {head}, from the cursor {after}");
    }
}
