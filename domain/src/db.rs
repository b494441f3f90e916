//! Connection pool, migrations and the readiness probe.

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::str::FromStr;
use std::time::Duration;

/// Our own migrations (plain SQL under `migrations/`), applied after apalis-postgres'
/// schema, which the job core's migrations build on.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not a valid PostgreSQL URL: {0}")]
    BadUrl(String),
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("apalis-postgres migrations failed: {0}")]
    ApalisMigrate(String),
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Runs a batched DELETE until a batch comes back short; returns the rows deleted. `sql`
/// takes the age in seconds as `$1` and the batch size as `$2`, and deletes at most one
/// batch (`… WHERE id IN (SELECT id … ORDER BY <age> LIMIT $2)`), so no statement holds
/// many locks or runs long (S7).
pub async fn delete_in_batches(db: &PgPool, sql: &'static str, older_than: Duration, batch: i64) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let n = sqlx::query(sql).bind(older_than.as_secs_f64()).bind(batch).execute(db).await?.rows_affected();
        total += n;
        if (n as i64) < batch {
            return Ok(total);
        }
    }
}

/// Opens a pool. `acquire_timeout` is short so a database outage surfaces as an error
/// quickly (callers back off and retry) instead of a hang.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    // Parse first so the error names the URL problem without echoing the URL (it may hold a password).
    let opts = PgConnectOptions::from_str(url).map_err(|e| DbError::BadUrl(redact_url_error(&e)))?;
    pool_options(PING_IF_IDLE_FOR).max_connections(max_connections).connect_with(opts).await.map_err(DbError::Connect)
}

/// The database cannot serve this statement now, whatever the statement: it is shutting
/// down or restarting under it (57P01–57P05: a statement in flight when PostgreSQL stops
/// gets 57P01, not an I/O error), the connection failed (class 08), it is out of
/// connections or disk (53300, 53100), or it hit an I/O error (class 58). Not an
/// out-of-memory or a cancelled statement (53200, 57014): those may be the statement's
/// own doing, and repeat with it.
pub fn is_outage(e: &dyn sqlx::error::DatabaseError) -> bool {
    e.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c.starts_with("58") || c == "53300" || c == "53100")
}

/// SQLSTATE of a lock wait cut short by `lock_timeout`.
pub const LOCK_NOT_AVAILABLE: &str = "55P03";

/// The statement gave up waiting for a lock (`lock_timeout`): nothing of it was done, and
/// running it again at once would wait as long again.
pub fn gave_up_on_lock(e: &dyn sqlx::error::DatabaseError) -> bool {
    e.code().as_deref() == Some(LOCK_NOT_AVAILABLE)
}

/// The statement was chosen as a deadlock's victim (40P01): its transaction is rolled
/// back, and running it again is the answer.
pub fn deadlock_victim(e: &dyn sqlx::error::DatabaseError) -> bool {
    e.code().as_deref() == Some("40P01")
}

/// PostgreSQL refused a value it cannot store: a NUL character in `text` (22021) or a
/// `\u0000` escape in `jsonb` (22P05). Always the caller's data, never the database's
/// state: a bad request, not a fault.
pub fn refused_nul(e: &dyn sqlx::error::DatabaseError) -> bool {
    matches!(e.code().as_deref(), Some("22021" | "22P05"))
}

/// How long a pooled connection may sit idle before it is pinged before its next use.
pub const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Options for our pools: a 5 s acquire timeout (an outage surfaces as an error, callers
/// back off), and a ping before use only for a connection idle longer than `ping_if_idle_for`
/// (HikariCP's bypass window). sqlx's default pings on every acquire: a round trip before
/// every statement, or two of the ten a workspace create makes. A connection in steady use
/// needs none. One that breaks anyway (its backend gone less than a second after its last
/// use; after a restart, connections idle through the downtime are pinged) fails its
/// statement, as a statement in flight would: a 503, a claim's back-off, an ack retried
/// ([`is_outage`]), or a handler's retryable error that uses up an attempt. sqlx drops it
/// on release (where it still pings every connection, off the caller's path).
pub fn pool_options(ping_if_idle_for: Duration) -> PgPoolOptions {
    PgPoolOptions::new().acquire_timeout(Duration::from_secs(5)).test_before_acquire(false).before_acquire(move |conn, meta| {
        Box::pin(async move {
            use sqlx::Connection;
            // A failed ping drops the connection (as sqlx's own test does, logged at WARN
            // here); acquire then opens a new one.
            if meta.idle_for > ping_if_idle_for {
                conn.ping().await?;
            }
            Ok(true)
        })
    })
}

fn redact_url_error(e: &sqlx::Error) -> String {
    // sqlx parse errors describe the problem, not the URL; keep only the first line.
    e.to_string().lines().next().unwrap_or("unparsable").to_string()
}

/// The advisory lock our processes take, one at a time, around the migrators.
pub const MIGRATE_LOCK: i64 = 0x6d6f_6c65_6375_6c65; // "molecule"

/// Applies apalis-postgres' schema, then ours; re-running is a no-op. Concurrent starts
/// of several processes queue on [`MIGRATE_LOCK`] by polling `pg_try_advisory_lock`: the
/// migrators' own advisory locks are taken by a statement that waits, and a waiting
/// statement is a transaction that `CREATE`/`DROP INDEX CONCURRENTLY` (some of our
/// migrations) must wait for, while it waits for the session building the index — a
/// deadlock PostgreSQL ends by cancelling one of them, perhaps the index build (which
/// leaves an INVALID index behind). A poll holds no transaction open between tries.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    let mut conn = pool.acquire().await.map_err(DbError::Connect)?;
    while !sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
        .bind(MIGRATE_LOCK)
        .fetch_one(&mut *conn)
        .await
        .map_err(DbError::Connect)?
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let res = async {
        apalis_postgres::PostgresStorage::setup(pool).await.map_err(|e| DbError::ApalisMigrate(e.to_string()))?;
        MIGRATOR.run(pool).await?;
        Ok(())
    }
    .await;
    // Released with the session if this fails (the connection is then closed).
    if sqlx::query("SELECT pg_advisory_unlock($1)").bind(MIGRATE_LOCK).execute(&mut *conn).await.is_err() {
        conn.close_on_drop();
    }
    res
}

/// Ready = the database answers and every migration we ship is applied.
pub async fn readiness(pool: &PgPool) -> Result<(), String> {
    let applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success").fetch_one(pool).await.map_err(|e| match e {
            // undefined_table: no _sqlx_migrations yet.
            sqlx::Error::Database(e) if e.code().as_deref() == Some("42P01") => "migrations have not been applied".to_string(),
            _ => "database unreachable".to_string(),
        })?;
    let expected = MIGRATOR.iter().count() as i64;
    if applied < expected {
        return Err(format!("{applied} of {expected} migrations applied"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// §2: an applied migration is never edited. sqlx refuses to migrate a database whose
    /// recorded checksum of a migration differs from the file's, so an edited file breaks
    /// every install that applied it. `migrations/CHECKSUMS` holds each migration's
    /// checksum as sqlx records it; a new migration adds its line (the failure says which).
    #[test]
    fn no_applied_migration_is_edited() {
        let listed: std::collections::HashMap<i64, String> = include_str!("../../migrations/CHECKSUMS")
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (v, sum) = l.split_once(' ').expect("`<version> <sha384>` lines");
                (v.parse().expect("a version"), sum.trim().to_string())
            })
            .collect();
        for m in super::MIGRATOR.iter() {
            let sum = hex::encode(&m.checksum);
            match listed.get(&m.version) {
                Some(want) => assert_eq!(
                    &sum, want,
                    "migration {} ({}) was edited after it was listed: add a new migration instead",
                    m.version, m.description
                ),
                None => {
                    panic!("migration {} ({}) is not in migrations/CHECKSUMS: add the line `{} {sum}`", m.version, m.description, m.version)
                }
            }
        }
        assert_eq!(listed.len(), super::MIGRATOR.iter().count(), "CHECKSUMS lists a migration that is gone");
    }
}
