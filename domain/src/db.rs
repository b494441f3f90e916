//! Connection pool, migrations and the readiness probe.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
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
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(opts)
        .await
        .map_err(DbError::Connect)
}

fn redact_url_error(e: &sqlx::Error) -> String {
    // sqlx parse errors describe the problem, not the URL; keep only the first line.
    e.to_string().lines().next().unwrap_or("unparsable").to_string()
}

/// Applies apalis-postgres' schema, then ours. Both migrators take an advisory lock,
/// so concurrent starts of several processes are safe; re-running is a no-op.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    apalis_postgres::PostgresStorage::setup(pool)
        .await
        .map_err(|e| DbError::ApalisMigrate(e.to_string()))?;
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Ready = the database answers and every migration we ship is applied.
pub async fn readiness(pool: &PgPool) -> Result<(), String> {
    let applied: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM _sqlx_migrations WHERE success",
    )
    .fetch_one(pool)
    .await
    .map_err(|e| match e {
        sqlx::Error::Database(_) => "migrations have not been applied".to_string(),
        _ => "database unreachable".to_string(),
    })?;
    let expected = MIGRATOR.iter().count() as i64;
    if applied < expected {
        return Err(format!("{applied} of {expected} migrations applied"));
    }
    Ok(())
}
