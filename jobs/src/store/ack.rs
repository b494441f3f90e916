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
    /// The claimed batch it belongs to (`apalis.claims`; [`write_acks`] deletes the rows
    /// it is told every job of has been acked).
    pub batch: i64,
    /// Where the claim left the job's row version (its ctid, as text): a plain success is
    /// written straight there, no index lookup. None, or a version no longer there, is
    /// looked up by id.
    pub tid: Option<String>,
}

impl Ack {
    /// A success without a result value: written by the cheaper statement.
    fn is_plain_success(&self) -> bool {
        self.state == JobState::Done && matches!(self.result, None | Some(Value::Null))
    }
}

/// What a batch write did: the acks (id, fence) it did not apply, because they were
/// stale (their job was claimed again since, or ended). The fence tells apart two acks of
/// one job in one batch. Only these come back: nearly always none, where returning the
/// applied ones cost a row a job to send and decode.
#[derive(Debug, Default)]
pub struct AckWrite {
    pub stale: Vec<(String, i64)>,
}

/// The end of both ack statements: of the acks sent (`$1` ids, `$2` fences), those the
/// `applied` update did not change — looked for only when it changed fewer rows than
/// acks were sent (a one-time filter), so a batch without a stale ack sends nothing back.
/// `IN (…) IS TRUE`: a hashed subplan, as in [`ACK_DONE`].
macro_rules! stale_of {
    () => {
        "SELECT s.id, s.fence FROM unnest($1::text[], $2::int8[]) AS s(id, fence)
WHERE (SELECT count(*) FROM applied) < cardinality($1::text[])
  AND NOT (((s.id, s.fence) IN (SELECT id, fence FROM applied)) IS TRUE)"
    };
}

/// Acks are driven by the list of acks, never by the table. `hit` finds each ack's row
/// version, LATERAL (one lookup per ack, whatever the planner believes of the table: a
/// plain join of the table against `unnest(…)` let it — trusting statistics taken while
/// no job was Running — put the table on the outside of a nested loop over the acks,
/// 5,000² row comparisons per batch; or hash a sequential scan of it): first where the
/// claim left it (its ctid, no index lookup), else by primary key (an ack without a
/// ctid, or a version since updated — a stale ack — or moved by VACUUM FULL), keeping it
/// only if it is still Running under the ack's fence. The update takes exactly those
/// versions (`ctid = ANY`: a TID scan) and checks id, fence and status again: if another
/// transaction updated the row meanwhile (a rescue, a newer claim), PostgreSQL re-checks
/// these on the newest version (the ctid test itself is not re-checked by every release),
/// so a newer attempt is never finalized. `IN (SELECT …) IS TRUE` keeps that check a
/// hashed subplan, one lookup per row: joined to `hit` instead, the generic plan a
/// prepared statement ends up with kept `ctid = ANY(…)` as a filter on a TID scan driven
/// by the join, one pass over the array per row (quadratic in the batch: 32 µs a job
/// at 1 400 acks a statement in a 300k-job drain).
///
/// It changes no indexed column (migrations/…_claims.sql): a HOT update where the page has
/// room. `$4`: claimed batches whose last ack this write carries; their rows go first
/// (`hit` waits for `ended`), the order the lease rescuer locks in too (batch row, then
/// jobs), so the two never deadlock over a lapsed worker's batch.
const ACK_DONE: &str = concat!(
    r#"
WITH ended AS (
    DELETE FROM apalis.claims WHERE id = ANY($4::int8[]) RETURNING id
), hit AS MATERIALIZED (
    SELECT cur.tid, r.id, r.fence
    FROM unnest($1::text[], $2::int8[], $3::text[]::tid[]) AS r(id, fence, tid)
    CROSS JOIN LATERAL (
        (SELECT s.ctid AS tid FROM apalis.jobs s
         WHERE s.ctid = r.tid AND s.id = r.id AND s.fence = r.fence AND s.status = 'Running')
        UNION ALL
        (SELECT s.ctid FROM apalis.jobs s
         WHERE s.id = r.id AND s.fence = r.fence AND s.status = 'Running')
        LIMIT 1
    ) AS cur
    WHERE (SELECT count(*) FROM ended) >= 0
), applied AS (
UPDATE apalis.jobs AS j
SET status = 'Done', outcome = 'succeeded', done_at = now(), last_result = '{"Ok": null}'
WHERE j.ctid = ANY(ARRAY(SELECT tid FROM hit))
  AND ((j.id, j.fence) IN (SELECT id, fence FROM hit)) IS TRUE AND (j.status = 'Running') IS TRUE
RETURNING j.id, j.fence
)
"#,
    stale_of!()
);

/// Every other outcome, by primary key (results and failures are the rarer acks), with
/// the batch rows first as in [`ACK_DONE`]. A retry or a hand-back clears lock_at (the
/// job is claimable again: back in the claim index); an end keeps it.
const ACK: &str = concat!(
    r#"
WITH ended AS (
    DELETE FROM apalis.claims WHERE id = ANY($9::int8[]) RETURNING id
), r AS MATERIALIZED (
    SELECT a.*
    FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::jsonb[], $8::text[])
         AS a(id, fence, status, outcome, delay_ms, error, result, detail)
    CROSS JOIN LATERAL (SELECT s.fence, s.status FROM apalis.jobs s WHERE s.id = a.id OFFSET 0) AS cur
    WHERE cur.fence = a.fence AND cur.status = 'Running' AND (SELECT count(*) FROM ended) >= 0
), applied AS (
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
FROM r
WHERE j.id = r.id AND (j.fence = r.fence) IS TRUE AND (j.status = 'Running') IS TRUE
RETURNING j.id, j.fence
)
"#,
    stale_of!()
);

/// Writes a batch of acks (two statements at most): the ones it refused as stale. The rows of
/// `ended_batches` (claimed batches every job of which is acked by now or by this write)
/// go with the write's last statement, so only once its acks are written.
pub async fn write_acks(db: &PgPool, acks: &[Ack], ended_batches: &[i64]) -> Result<AckWrite, sqlx::Error> {
    let (done, rest): (Vec<&Ack>, Vec<&Ack>) = acks.iter().partition(|a| a.is_plain_success());
    let mut out = AckWrite::default();
    let none: &[i64] = &[];
    if !rest.is_empty() {
        let ids: Vec<(String, i64)> = sqlx::query_as(ACK)
            .bind(rest.iter().map(|a| a.id.as_str()).collect::<Vec<_>>())
            .bind(rest.iter().map(|a| a.fence).collect::<Vec<_>>())
            .bind(rest.iter().map(|a| a.state.as_str()).collect::<Vec<_>>())
            .bind(rest.iter().map(|a| a.outcome.map(Outcome::as_str)).collect::<Vec<_>>())
            .bind(rest.iter().map(|a| a.delay_ms).collect::<Vec<_>>())
            .bind(rest.iter().map(|a| a.error.as_deref()).collect::<Vec<_>>())
            .bind(rest.iter().map(|a| a.result.clone().unwrap_or(Value::Null)).collect::<Vec<_>>())
            .bind(rest.iter().map(|a| a.error_detail.as_deref()).collect::<Vec<_>>())
            .bind(if done.is_empty() { ended_batches } else { none })
            .fetch_all(db)
            .await?;
        out.stale.extend(ids);
    }
    if !done.is_empty() {
        let ids: Vec<(String, i64)> = sqlx::query_as(ACK_DONE)
            .bind(done.iter().map(|a| a.id.as_str()).collect::<Vec<_>>())
            .bind(done.iter().map(|a| a.fence).collect::<Vec<_>>())
            .bind(done.iter().map(|a| a.tid.as_deref()).collect::<Vec<_>>())
            .bind(ended_batches)
            .fetch_all(db)
            .await?;
        out.stale.extend(ids);
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
    use crate::enqueue::{NewJob, enqueue};
    use crate::maintenance::{Scope, rescue_expired_leases};
    use crate::store::workers::{WorkerRow, heartbeat};
    use crate::store::{Claimed, Shard, claim, claim_each_shard};
    use crate::store::{executed_reads, table_reads};
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

    /// A worker of queue "q" with its heartbeat written (a claim needs one).
    async fn live_worker(conn: &mut sqlx::PgConnection, id: &str, concurrency: usize) -> WorkerRow {
        let w = WorkerRow { id: id.into(), queue: "q".into(), concurrency };
        heartbeat(conn, std::slice::from_ref(&w)).await.unwrap();
        w
    }

    fn done(id: &str, fence: i64, result: Value) -> Ack {
        Ack {
            id: id.into(),
            fence,
            state: JobState::Done,
            outcome: Some(Outcome::Succeeded),
            delay_ms: 0,
            error: None,
            error_detail: None,
            result: Some(result),
            batch: 0,
            tid: None,
        }
    }

    /// The bug this fences off: a worker's heartbeat lapses, the rescuer hands its job
    /// back, the SAME worker claims it again — and the first attempt's late ack must not
    /// finalize the second attempt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_ack_after_a_reclaim_changes_nothing() {
        let (db, _) = fresh_db().await;
        let mut conn = db.acquire().await.unwrap();
        let w = live_worker(&mut conn, "q@slow", 1).await;
        let id = enqueue(&mut conn, &NewJob::to_queue("q", &serde_json::json!({})).max_attempts(5)).await.unwrap();
        let first = claim_each_shard(&db, "q", 1, &w.id).await.unwrap().remove(0);
        assert_eq!(first.fence, 1);

        sqlx::query("UPDATE apalis.workers SET last_seen = now() - interval '1 minute'").execute(&db).await.unwrap();
        assert_eq!(rescue_expired_leases(&db, Duration::from_secs(30), &[], Scope::ClaimedBatches).await.unwrap(), 1);
        assert_eq!(row(&db, id.as_str()).await.lock_by, None, "the rescue clears the lock");
        heartbeat(&mut conn, std::slice::from_ref(&w)).await.unwrap();
        let second = claim_each_shard(&db, "q", 1, &w.id).await.unwrap().remove(0);
        assert_eq!((second.fence, second.attempts), (2, 2));
        let before = row(&db, id.as_str()).await;

        // Attempt 1's ack arrives late, from the same worker: refused.
        let w1 = write_acks(&db, &[done(id.as_str(), first.fence, serde_json::json!("from attempt 1"))], &[]).await.unwrap();
        assert_eq!(w1.stale, vec![(id.as_str().to_string(), first.fence)]);
        assert_eq!(row(&db, id.as_str()).await, before, "the newer attempt's row is untouched");
        // A stale failure or hand-back is refused the same way.
        // A plain success of attempt 1, sent straight to the row version its claim left
        // (since updated by the rescue and the second claim): refused too.
        let at_first = Ack { tid: Some(first.tid.clone()), ..done(id.as_str(), first.fence, Value::Null) };
        assert_eq!(write_acks(&db, &[at_first], &[]).await.unwrap().stale.len(), 1);
        assert_eq!(row(&db, id.as_str()).await, before);
        let stale_release = Ack { state: JobState::Pending, outcome: None, result: None, ..done(id.as_str(), first.fence, Value::Null) };
        assert_eq!(write_acks(&db, &[stale_release], &[]).await.unwrap().stale.len(), 1);
        assert_eq!(row(&db, id.as_str()).await, before);

        // Attempt 2's own ack lands — in one batch with attempt 1's late one, which does not,
        // and the answer says which of the two was refused (the fence tells them apart).
        let both = [
            done(id.as_str(), first.fence, serde_json::json!("from attempt 1")),
            done(id.as_str(), second.fence, serde_json::json!("from attempt 2")),
        ];
        let w2 = write_acks(&db, &both, &[]).await.unwrap();
        assert_eq!(w2.stale, vec![(id.as_str().to_string(), first.fence)]);
        let after = row(&db, id.as_str()).await;
        assert_eq!(after.status, "Done");
        assert_eq!(after.last_result, Some(serde_json::json!({ "Ok": "from attempt 2" })));
        // And a repeat of it (a retried batch) changes nothing more.
        assert_eq!(write_acks(&db, &[done(id.as_str(), second.fence, Value::Null)], &[]).await.unwrap().stale.len(), 1);
        let at_second = Ack { tid: Some(second.tid.clone()), ..done(id.as_str(), second.fence, Value::Null) };
        assert_eq!(write_acks(&db, &[at_second], &[]).await.unwrap().stale.len(), 1);
    }

    /// A batch of plain successes (the cheaper statement) where some jobs were claimed
    /// again meanwhile: those acks come back refused, the others apply.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_of_successes_reports_exactly_its_refused_acks() {
        let (db, _) = fresh_db().await;
        let mut conn = db.acquire().await.unwrap();
        let jobs: Vec<NewJob> = (0..6).map(|_| NewJob::to_queue("q", &serde_json::json!({}))).collect();
        crate::enqueue::enqueue_many(&mut conn, &jobs).await.unwrap();
        let w = live_worker(&mut conn, "q@mixed", 6).await;
        let c = claim_each_shard(&db, "q", 6, &w.id).await.unwrap();
        assert_eq!(c.len(), 6);
        // Two of them claimed again since (their fence moved on).
        for j in [&c[1], &c[4]] {
            sqlx::query("UPDATE apalis.jobs SET fence = fence + 1 WHERE id = $1").bind(&j.id).execute(&db).await.unwrap();
        }
        let acks: Vec<Ack> = c.iter().map(|j| Ack { tid: Some(j.tid.clone()), ..done(&j.id, j.fence, Value::Null) }).collect();
        let mut stale = write_acks(&db, &acks, &[]).await.unwrap().stale;
        stale.sort();
        let mut want = vec![(c[1].id.clone(), c[1].fence), (c[4].id.clone(), c[4].fence)];
        want.sort();
        assert_eq!(stale, want);
        for (i, j) in c.iter().enumerate() {
            let want = if i == 1 || i == 4 { "Running" } else { "Done" };
            assert_eq!(row(&db, &j.id).await.status, want, "job {i}");
        }
    }

    /// Every filter of the plan (row by row conditions, as opposed to index or TID conditions).
    fn plan_filters(plan: &Value, out: &mut Vec<String>) {
        for k in ["Filter", "Join Filter"] {
            if let Some(f) = plan.get(k).and_then(Value::as_str) {
                out.push(f.to_string());
            }
        }
        for p in plan.get("Plans").and_then(Value::as_array).into_iter().flatten() {
            plan_filters(p, out);
        }
    }

    /// The plan's UPDATE (the batch rows' DELETE is a ModifyTable too).
    fn find_update(plan: &Value) -> Option<&Value> {
        if plan.get("Operation").and_then(Value::as_str) == Some("Update") {
            return Some(plan);
        }
        plan.get("Plans").and_then(Value::as_array)?.iter().find_map(find_update)
    }

    /// Most rows a join filter of the plan threw away, anywhere in it.
    fn max_join_filter_removed(plan: &Value) -> u64 {
        let own = plan.get("Rows Removed by Join Filter").and_then(Value::as_u64).unwrap_or(0);
        let kids = plan.get("Plans").and_then(Value::as_array).map(|p| p.iter().map(max_join_filter_removed).max().unwrap_or(0));
        own.max(kids.unwrap_or(0))
    }

    /// The regression: statistics taken while no job ran made the planner drive the ack
    /// from the table, comparing every row with every ack (5,000² per batch). Whatever
    /// the statistics, a batch must probe row by row: no join may throw rows away.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ack_batch_probes_by_key_whatever_the_statistics_say() {
        let (db, _) = fresh_db().await;
        let mut conn = db.acquire().await.unwrap();
        // Earlier drains' rows (done) beside the queued ones, as a benchmark's fourth round sees.
        let jobs: Vec<NewJob> = (0..20_000).map(|_| NewJob::to_queue("q", &serde_json::json!({}))).collect();
        crate::enqueue::enqueue_many(&mut conn, &jobs).await.unwrap();
        sqlx::query("UPDATE apalis.jobs SET status = 'Done', outcome = 'succeeded', done_at = now()").execute(&db).await.unwrap();
        crate::enqueue::enqueue_many(&mut conn, &jobs).await.unwrap();
        sqlx::query("ANALYZE apalis.jobs").execute(&db).await.unwrap();
        let w = live_worker(&mut conn, "q@plan", 5000).await;
        let claimed = claim_each_shard(&db, "q", 5000, &w.id).await.unwrap();
        assert_eq!(claimed.len(), 5000);
        let ids: Vec<&str> = claimed.iter().map(|c| c.id.as_str()).collect();
        let fences: Vec<i64> = claimed.iter().map(|c| c.fence).collect();
        let n = ids.len();
        // A prepared statement runs on a generic plan after five executions (the runtime's
        // acks do): both kinds of plan are checked.
        let tids: Vec<&str> = claimed.iter().map(|c| c.tid.as_str()).collect();
        let list = |v: Vec<String>| v.join(",");
        // Literal arrays: EXECUTE inside EXPLAIN takes no bound parameters (ids are ULIDs;
        // a tid's text has a comma, so it is quoted).
        let ids_fences = format!("'{{{}}}'::text[], '{{{}}}'::int8[]", ids.join(","), list(fences.iter().map(i64::to_string).collect()));
        let general = format!(
            ", array_fill('Done'::text, ARRAY[{n}]), array_fill('succeeded'::text, ARRAY[{n}]), array_fill(0::int8, ARRAY[{n}]), \
             array_fill(NULL::text, ARRAY[{n}]), array_fill('null'::jsonb, ARRAY[{n}]), array_fill(NULL::text, ARRAY[{n}])"
        );
        let at = format!(", '{{{}}}'::text[]", list(tids.iter().map(|t| format!("\"{t}\"")).collect()));
        let no_tids = format!(", array_fill(NULL::text, ARRAY[{n}])");
        // (name, statement, its parameter types, its arguments, how it may read the table)
        let tid_or_key = ["Tid Scan -", "Index Scan jobs_pkey"].as_slice();
        let cases = [
            ("done at its version", ACK_DONE, "text[], int8[], text[], int8[]", at, tid_or_key),
            ("done by key", ACK_DONE, "text[], int8[], text[], int8[]", no_tids, tid_or_key),
            (
                "general",
                ACK,
                "text[], int8[], text[], text[], int8[], text[], jsonb[], text[], int8[]",
                general,
                ["Index Scan jobs_pkey"].as_slice(),
            ),
        ];
        for ((name, sql, types, extra, read), mode) in
            cases.iter().flat_map(|c| ["force_custom_plan", "force_generic_plan"].map(|m| (c, m)))
        {
            let mut tx = db.begin().await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL plan_cache_mode = {mode}"))).execute(&mut *tx).await.unwrap();
            // PREPARE + EXPLAIN EXECUTE: the plan a prepared statement really runs on.
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PREPARE ack_plan ({types}) AS {sql}"))).execute(&mut *tx).await.unwrap();
            let args = format!("{ids_fences}{extra}, '{{}}'::int8[]");
            let explain = sqlx::AssertSqlSafe(format!("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE ack_plan ({args})"));
            let q = sqlx::query_scalar::<_, Value>(explain);
            let plan = q.fetch_one(&mut *tx).await.unwrap();
            // A prepared statement outlives the transaction (it belongs to the session).
            sqlx::raw_sql("DEALLOCATE ack_plan").execute(&mut *tx).await.unwrap();
            tx.rollback().await.unwrap();
            let top = &plan[0]["Plan"];
            let update = find_update(top).expect("the update");
            assert_eq!(update["Actual Rows"].as_u64(), Some(n as u64), "{name} ({mode}): every ack applies");
            assert_eq!(top["Actual Rows"].as_u64(), Some(0), "{name} ({mode}): none comes back as stale");
            let reads = table_reads(top);
            assert!(
                !reads.is_empty() && reads.iter().all(|r| read.contains(&r.as_str())),
                "{name} ({mode}): the table is read by {read:?} only: {reads:?}\n{plan:#}"
            );
            let mut filters = Vec::new();
            plan_filters(top, &mut filters);
            assert!(!filters.iter().any(|f| f.contains("ANY")), "{name} ({mode}): an array searched per row: {filters:?}\n{plan:#}");
            if *name == "done at its version" {
                assert!(executed_reads(top).iter().all(|r| r == "Tid Scan -"), "{name} ({mode}): no ack looked up by key\n{plan:#}");
            }
            let removed = max_join_filter_removed(top);
            assert!(
                removed <= n as u64,
                "{name} ({mode}): a join threw {removed} rows away for {n} acks: the table drives the join\n{plan:#}"
            );
        }
        // And the acks do apply (the EXPLAINs were rolled back).
        let acks: Vec<Ack> = claimed.iter().map(|c| done(&c.id, c.fence, Value::Null)).collect();
        assert_eq!(write_acks(&db, &acks, &[]).await.unwrap().stale, vec![]);
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE status = 'Done' AND lock_by = $1")
            .bind(&w.id)
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(done, n as i64);
    }

    /// What the claim index's predicate on lock_at and the batch rows are for (migrations/
    /// …_claims.sql): a success ack changes no indexed column, so PostgreSQL can write it
    /// as a HOT update (no index entries) wherever the page has room. With `status` in an
    /// index's predicate, as before, not one ack was HOT. The batch's row goes with the
    /// write of its last ack.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn success_acks_are_hot_updates_and_end_their_batch() {
        let (db, _) = fresh_db().await;
        // One connection: its statistics are flushed on request (pg_stat_force_next_flush).
        let one =
            sqlx::postgres::PgPoolOptions::new().max_connections(1).connect_with(db.connect_options().as_ref().clone()).await.unwrap();
        let mut conn = one.acquire().await.unwrap();
        let jobs: Vec<crate::enqueue::NewJob> = (0..2000).map(|_| crate::enqueue::NewJob::to_queue("q", &serde_json::json!({}))).collect();
        crate::enqueue::enqueue_many(&mut conn, &jobs).await.unwrap();
        drop(conn);
        let w = live_worker(&mut one.acquire().await.unwrap(), "q@hot", 2000).await;
        let mut acked = 0;
        // Two claims of 400 from each shard (about 1,000 jobs each).
        for shard in Shard::all().flat_map(|s| [s, s]) {
            let claimed = claim(&one, "q", shard, 400, &w.id).await.unwrap();
            let batch = claimed[0].batch;
            let rows: Vec<Vec<String>> =
                sqlx::query_scalar("SELECT ids FROM apalis.claims WHERE id = $1").bind(batch).fetch_all(&one).await.unwrap();
            assert_eq!(rows.iter().map(Vec::len).collect::<Vec<_>>(), vec![400], "the claim recorded its batch");
            let acks: Vec<Ack> =
                claimed.iter().map(|c| Ack { batch, tid: Some(c.tid.clone()), ..done(&c.id, c.fence, Value::Null) }).collect();
            // Not its last ack: the row stays.
            assert_eq!(write_acks(&one, &acks[..100], &[]).await.unwrap().stale, vec![]);
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.claims").fetch_one(&one).await.unwrap();
            assert_eq!(left, 1);
            assert_eq!(write_acks(&one, &acks[100..], &[batch]).await.unwrap().stale, vec![]);
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.claims").fetch_one(&one).await.unwrap();
            assert_eq!(left, 0, "the batch's last ack took its row");
            acked += claimed.len();
        }
        sqlx::query("SELECT pg_stat_force_next_flush()").execute(&one).await.unwrap();
        let (updates, hot): (i64, i64) =
            sqlx::query_as("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relid = 'apalis.jobs'::regclass")
                .fetch_one(&one)
                .await
                .unwrap();
        // Claims are never HOT (they set lock_at); so at most `acked` of them are.
        assert_eq!(updates, 2 * acked as i64, "one update per claim and per ack");
        assert!(hot * 2 >= acked as i64, "{hot} of {acked} acks were HOT updates");
    }

    /// An ack whose row version is not where its claim left it (a table rewrite — VACUUM
    /// FULL, pg_repack — moves every version; an update leaves a new one elsewhere) is
    /// written by id instead: never lost. And the version found there may be another
    /// job's (a rewrite packs rows anew): never applied to that job.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ack_that_misses_its_row_version_is_written_by_id_and_never_to_another_job() {
        let (db, _) = fresh_db().await;
        let mut conn = db.acquire().await.unwrap();
        let jobs: Vec<crate::enqueue::NewJob> = (0..4).map(|_| crate::enqueue::NewJob::to_queue("q", &serde_json::json!({}))).collect();
        crate::enqueue::enqueue_many(&mut conn, &jobs).await.unwrap();
        let w = live_worker(&mut conn, "q@moved", 4).await;
        let c = claim_each_shard(&db, "q", 4, &w.id).await.unwrap();
        assert!(c.iter().all(|j| j.fence == 1), "one fence for all: only the id tells their versions apart");
        // a's version moves (what a rewrite does to all of them).
        sqlx::query("UPDATE apalis.jobs SET attempt_log = attempt_log WHERE id = $1").bind(&c[0].id).execute(&db).await.unwrap();
        let at = |j: &Claimed, tid: &str| Ack { tid: Some(tid.into()), ..done(&j.id, j.fence, Value::Null) };
        let acks = [
            at(&c[0], &c[0].tid),    // its old version: gone
            at(&c[1], &c[2].tid),    // c's version is there
            at(&c[3], "(999999,1)"), // nothing is there
        ];
        assert_eq!(write_acks(&db, &acks, &[]).await.unwrap().stale, vec![], "every ack applied, by id");
        for (j, status) in [(&c[0], "Done"), (&c[1], "Done"), (&c[2], "Running"), (&c[3], "Done")] {
            assert_eq!(row(&db, &j.id).await.status, status, "job {}", j.id);
        }
    }

    /// The race a fence check in the update itself closes: an ack's statement finds the
    /// claimed version (its snapshot predates the rescue and the new claim), then waits
    /// for the row lock while they commit. PostgreSQL re-checks the update's conditions on
    /// the newest version — attempt 2's, Running too — and must refuse it on the fence.
    /// (An update re-checking only id and status finalizes attempt 2 here. This cluster's
    /// release, 15.18, also refuses it on the ctid test alone; not every release does.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_ack_waiting_for_the_row_lock_does_not_finalize_the_newer_attempt() {
        let (db, _) = fresh_db().await;
        let mut conn = db.acquire().await.unwrap();
        let w = live_worker(&mut conn, "q@lapsed", 1).await;
        let id = enqueue(&mut conn, &NewJob::to_queue("q", &serde_json::json!({}))).await.unwrap();
        let first = claim_each_shard(&db, "q", 1, &w.id).await.unwrap().remove(0);
        // A rescue and a new claim, in one transaction left open: the row is locked.
        let mut other = db.begin().await.unwrap();
        sqlx::query("UPDATE apalis.jobs SET status = 'Failed', lock_by = NULL, lock_at = NULL WHERE id = $1")
            .bind(id.as_str())
            .execute(&mut *other)
            .await
            .unwrap();
        sqlx::query("UPDATE apalis.jobs SET status = 'Running', lock_by = 'q@next', lock_at = now(), fence = fence + 1 WHERE id = $1")
            .bind(id.as_str())
            .execute(&mut *other)
            .await
            .unwrap();
        let late = Ack { tid: Some(first.tid.clone()), ..done(id.as_str(), first.fence, Value::Null) };
        let (db2, late2) = (db.clone(), late.clone());
        let ack = tokio::spawn(async move { write_acks(&db2, &[late2], &[]).await });
        // The ack's statement is waiting for the row lock.
        molecule_domain::testing::until_a_statement_waits_on_a_lock(&db, "%WITH ended AS%").await;
        other.commit().await.unwrap();
        let w1 = ack.await.unwrap().unwrap();
        assert_eq!(w1.stale, vec![(id.as_str().to_string(), first.fence)], "the late ack of attempt 1 was refused");
        let after = row(&db, id.as_str()).await;
        assert_eq!((after.status.as_str(), after.fence, after.lock_by.as_deref()), ("Running", 2, Some("q@next")));
    }
}
