//! The stats refresher: the job table is analyzed as soon as it has outgrown its planner
//! statistics, not a minute or more later when autovacuum gets to it.
//!
//! A prepared statement's generic plan is made once, for the table's size at that moment,
//! and kept until the table's statistics change. Claims prepared while the table was
//! nearly empty — a fresh install, a worker started beside an idle queue — take their
//! rows through a scan of the claim index or of the whole table instead of by ctid
//! (store/claim.rs) once it has grown: in `bench/e2e`'s `serve` phases, a table grown
//! from empty to 20k rows in seconds, 10 ms a claim instead of 0.18. Autovacuum would
//! analyze it eventually (it looks at each database once a minute, and its worker may be
//! busy vacuuming, throttled), and a million jobs enqueued at once into a fresh install
//! would drain at that pace until it did. Here, once the table holds four times the pages
//! its statistics say (and more than 64), one process runs ANALYZE: the new statistics
//! invalidate every session's cached plans of the table, and each is made again at the
//! table's real size — while the statistics say under 1 024 pages (`OUTGROWN` says
//! why no later). It never waits: a vacuum or analyze holding the table's lock (the one
//! autovacuum would be cancelled for) means one is under way, and it skips.

use sqlx::PgPool;

/// Grown past statistics that still call it small, and ours to analyze (ANALYZE by anyone
/// else only warns). Once its statistics say 1 024 pages, any plan made from them goes by
/// ctid (to the planner a TID scan of a claim's rows costs what reading 40 pages does), so
/// the refresher stops there: a few ANALYZEs in a table's life, all while it is small —
/// never one of a large table in the middle of a drain or beside a pickup.
const OUTGROWN: &str = "
SELECT c.relpages < 1024
       AND pg_relation_size(c.oid) / current_setting('block_size')::int8 > 4 * GREATEST(c.relpages, 16)
       AND (pg_has_role(c.relowner, 'USAGE') OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user))
FROM pg_class c WHERE c.oid = 'apalis.jobs'::regclass";

/// Analyzes the job table if it has outgrown its statistics; true when it did. One
/// process at a time: the others skip, and find the statistics fresh afterwards.
pub async fn refresh_if_outgrown(db: &PgPool) -> Result<bool, sqlx::Error> {
    if !sqlx::query_scalar::<_, bool>(OUTGROWN).fetch_one(db).await? {
        return Ok(false);
    }
    let mut tx = db.begin().await?;
    let ours: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext('molecule.jobs.stats_refresher'))").fetch_one(&mut *tx).await?;
    // Asked again under the lock: another process may have analyzed it meanwhile.
    if !ours || !sqlx::query_scalar::<_, bool>(OUTGROWN).fetch_one(&mut *tx).await? {
        return Ok(false);
    }
    // Bounded, so the lease rescuer beside it is never held up for long.
    sqlx::query("SET LOCAL statement_timeout = '30s'").execute(&mut *tx).await?;
    sqlx::query("ANALYZE (SKIP_LOCKED) apalis.jobs").execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enqueue::{NewJob, enqueue_many};
    use molecule_domain::testing::fresh_db;

    /// The generic plan of a claim, as a session that prepared it while the table was
    /// empty runs it.
    async fn claim_plan(conn: &mut sqlx::PgConnection) -> String {
        let plan: Vec<String> = sqlx::query_scalar("EXPLAIN EXECUTE claim('q', 10, 'w', 0)").fetch_all(&mut *conn).await.unwrap();
        plan.join("\n")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_planned_on_an_empty_table_goes_by_ctid_once_the_grown_table_is_refreshed() {
        let (db, _) = fresh_db().await;
        // Autovacuum stays out of it: its analyze would remake the plans this test watches.
        sqlx::query("ALTER TABLE apalis.jobs SET (autovacuum_enabled = off)").execute(&db).await.unwrap();
        let mut session = db.acquire().await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET plan_cache_mode = force_generic_plan; PREPARE claim(text, int8, text, int4) AS {}",
            crate::store::claim::CLAIM
        )))
        .execute(&mut *session)
        .await
        .unwrap();
        let empty = claim_plan(&mut session).await;
        assert!(!empty.contains("Tid Scan on jobs j"), "planned on an empty table, the update scans (what this service is for):\n{empty}");
        assert!(!refresh_if_outgrown(&db).await.unwrap(), "an empty table has nothing to outgrow");

        let mut conn = db.acquire().await.unwrap();
        for _ in 0..4 {
            let jobs: Vec<NewJob> = (0..5000).map(|i| NewJob::to_queue("q", &serde_json::json!({ "i": i }))).collect();
            enqueue_many(&mut conn, &jobs).await.unwrap();
        }
        let stale = claim_plan(&mut session).await;
        assert_eq!(stale, empty, "20k jobs later the session still runs the plan made on the empty table");

        assert!(refresh_if_outgrown(&db).await.unwrap(), "the grown table is analyzed");
        assert!(!refresh_if_outgrown(&db).await.unwrap(), "and then no longer outgrown");
        let fresh = claim_plan(&mut session).await;
        assert!(fresh.contains("Tid Scan on jobs j"), "the session's claim is planned again, by ctid:\n{fresh}");
    }
}
