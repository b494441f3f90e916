//! One at a time across every process: restarts of one workspace (J3), sweeps of one kind
//! (SPEC §5).

use molecule_jobs::JobError;

use crate::provision::db_err;

/// Runs `work` holding the lock named `key`, or answers None when someone else holds it.
/// The lock is transaction-scoped, on a transaction kept open for the duration, on a
/// connection of its own: it ends with the transaction or the connection whatever
/// happens — return, error, panic or an aborted task — so it cannot leak the way a session
/// lock on a pooled connection did. Not a pooled connection, because the holder keeps it
/// for its whole run while that work needs the pool: as many holders as the pool's size
/// would sit on every connection their work waits for.
pub async fn one_at_a_time<T>(db: &sqlx::PgPool, key: &str, work: impl std::future::Future<Output = T>) -> Result<Option<T>, JobError> {
    use sqlx::{Connection, PgConnection};
    let mut conn = PgConnection::connect_with(&db.connect_options()).await.map_err(db_err)?;
    // The transaction idles while the work runs: a server-wide idle-in-transaction
    // timeout must not end it (and the lock with it) halfway.
    sqlx::query("SET idle_in_transaction_session_timeout = 0").execute(&mut conn).await.map_err(db_err)?;
    let mut tx = conn.begin().await.map_err(db_err)?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(key)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err)?;
    if !got {
        let _ = tx.rollback().await;
        let _ = conn.close().await;
        return Ok(None);
    }
    let out = work.await;
    let _ = tx.rollback().await;
    let _ = conn.close().await;
    Ok(Some(out))
}
