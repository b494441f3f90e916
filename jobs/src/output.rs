//! Job output as a worker produces it (exec streaming, A5): chunks in order, already
//! capped and redacted by the producer, announced by NOTIFY so readers in any process
//! follow without polling; and the "job finished" announcement that ends a follow.

use sqlx::PgPool;
use std::time::Duration;

/// NOTIFY channel of new chunks; the payload is the job id.
pub const OUTPUT_CHANNEL: &str = "molecule_exec_output";
/// NOTIFY channel of jobs that reached their outcome (pools with `notify_finished`); the
/// payload is the job id.
pub const FINISHED_CHANNEL: &str = "molecule_job_finished";

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Chunk {
    pub seq: i32,
    pub stream: String,
    pub data: String,
}

/// Appends chunks and announces them, in one statement.
pub async fn append(db: &PgPool, job_id: &str, chunks: &[Chunk]) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH ins AS (INSERT INTO exec_output (job_id, seq, stream, data) \
         SELECT $1, s, st, d FROM unnest($2::int[], $3::text[], $4::text[]) AS t(s, st, d) RETURNING 1) \
         SELECT pg_notify($5, $1) FROM (SELECT count(*) FROM ins) c",
    )
    .bind(job_id)
    .bind(chunks.iter().map(|c| c.seq).collect::<Vec<_>>())
    .bind(chunks.iter().map(|c| c.stream.as_str()).collect::<Vec<_>>())
    .bind(chunks.iter().map(|c| c.data.as_str()).collect::<Vec<_>>())
    .bind(OUTPUT_CHANNEL)
    .execute(db)
    .await?;
    Ok(())
}

/// The last chunk number written for a job (0 when none): a later attempt of the same
/// job (a retried exec) goes on from here, so its chunks follow the earlier ones.
pub async fn last_seq(db: &PgPool, job_id: &str) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT COALESCE(max(seq), 0) FROM exec_output WHERE job_id = $1").bind(job_id).fetch_one(db).await
}

/// The chunks after `seq`, in order.
pub async fn read_after(db: &PgPool, job_id: &str, seq: i32) -> Result<Vec<Chunk>, sqlx::Error> {
    sqlx::query_as("SELECT seq, stream, data FROM exec_output WHERE job_id = $1 AND seq > $2 ORDER BY seq")
        .bind(job_id)
        .bind(seq)
        .fetch_all(db)
        .await
}

const PRUNE: &str = r#"
DELETE FROM exec_output
WHERE (job_id, seq) IN (
    SELECT job_id, seq FROM exec_output
    WHERE created_at < now() - $1 * interval '1 second'
    ORDER BY created_at
    LIMIT $2
)
"#;

/// Deletes chunks older than `retention`, `batch` rows per statement (S7).
pub async fn prune(db: &PgPool, retention: Duration, batch: i64) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let n = sqlx::query(PRUNE).bind(retention.as_secs() as i64).bind(batch).execute(db).await?.rows_affected();
        total += n;
        if (n as i64) < batch {
            return Ok(total);
        }
    }
}
