//! A real PostgreSQL for tests (feature `testing`): every test gets a database of its own,
//! migrated, on one cluster per test binary — `MOLECULE_TEST_PG_URL` (a superuser URL) or,
//! when unset, a private embedded cluster started once and stopped at exit. Used by the
//! unit tests beside the code (`jobs/src/maintenance/…`) and by `tests/`.

use crate::embedded_pg::EmbeddedPostgres;
use sqlx::PgPool;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

static CLUSTER: OnceLock<Mutex<Option<EmbeddedPostgres>>> = OnceLock::new();
static ADMIN_URL: OnceLock<String> = OnceLock::new();
/// The cluster's directory, removed at exit (≈ 230 MB per test binary and run: left
/// behind, they once filled this machine's disk).
static CLUSTER_DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn stop_cluster() {
    if let Some(m) = CLUSTER.get() {
        if let Ok(mut g) = m.lock() {
            if let Some(mut pg) = g.take() {
                pg.stop();
                if let Some(dir) = CLUSTER_DIR.get() {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
        }
    }
}

/// Superuser URL of the shared test cluster (its `postgres` database).
pub fn admin_url() -> String {
    ADMIN_URL
        .get_or_init(|| {
            if let Ok(u) = std::env::var("MOLECULE_TEST_PG_URL") {
                return u;
            }
            let root = temp_dir("cluster");
            let dir = crate::embedded_pg::default_data_dir(&root).expect("cluster directory").path;
            let _ = CLUSTER_DIR.set(if dir.starts_with(&root) { root } else { dir.clone() });
            let pg = EmbeddedPostgres::start(&dir).expect("start the embedded test cluster");
            let url = pg.database_url();
            CLUSTER.get_or_init(|| Mutex::new(Some(pg)));
            unsafe { libc::atexit(stop_cluster) };
            url
        })
        .clone()
}

/// A new temporary directory (under TMPDIR).
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("molecule-test-{tag}-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

/// URL of `db` on the cluster whose admin URL is `admin`.
pub fn url_for(admin: &str, db: &str) -> String {
    let (base, _) = admin.rsplit_once('/').expect("admin URL has a database");
    format!("{base}/{db}")
}

/// A fresh, migrated database on the shared cluster: (pool, url).
pub async fn fresh_db() -> (PgPool, String) {
    fresh_db_on(&admin_url()).await
}

pub async fn fresh_db_on(admin: &str) -> (PgPool, String) {
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let admin_pool = crate::db::connect(admin, 2).await.expect("connect to the test cluster");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin_pool).await.expect("create test database");
    admin_pool.close().await;
    let url = url_for(admin, &name);
    let pool = crate::db::connect(&url, 10).await.expect("connect to the test database");
    crate::db::migrate(&pool).await.expect("migrate");
    (pool, url)
}

/// Waits (up to 10 s, then panics) until a statement of this database whose text is LIKE
/// `query_like` waits on a lock: a test's way to know a concurrent statement is blocked
/// on a row it holds before it lets go.
pub async fn until_a_statement_waits_on_a_lock(db: &PgPool, query_like: &str) {
    let waiting = async {
        loop {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE $1",
            )
            .bind(query_like)
            .fetch_one(db)
            .await
            .expect("pg_stat_activity");
            if n > 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
        .await
        .unwrap_or_else(|_| panic!("no statement LIKE {query_like:?} waited on a lock within 10 s"));
}
