//! Enqueue inside the caller's transaction: the job exists exactly when the caller's
//! domain write commits. Ids are ULIDs we generate and return.

use chrono::{DateTime, Utc};
use molecule_domain::{JobId, OrgId, WorkspaceId};
use sqlx::PgConnection;

use crate::kinds::JobKind;

/// A job to push. Build with [`NewJob::new`] (a product kind) or [`NewJob::to_queue`].
#[derive(Clone, Debug)]
pub struct NewJob {
    pub queue: String,
    pub payload: Vec<u8>,
    pub org_id: Option<OrgId>,
    pub workspace_id: Option<WorkspaceId>,
    /// None = now (database clock).
    pub run_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub max_attempts: i32,
    pub priority: i32,
    /// Same (queue, key) twice → the first job's id is returned and nothing is added.
    pub idempotency_key: Option<String>,
    /// Who wakes the queue's pools: the enqueuing transaction (a NOTIFY at its commit),
    /// or the caller after the commit ([`crate::announce`]).
    pub announce: Announce,
}

/// Who announces a new job to the pools of its queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Announce {
    /// The insert trigger, with a NOTIFY sent at the commit. Costs the commit its share
    /// of the WAL flush (see migrations/…_announce_after_commit.sql).
    #[default]
    InTransaction,
    /// The caller, after its transaction committed, with [`crate::announce::Announcer`].
    /// A caller that forgets leaves the job to the pools' polling (a second by default).
    AfterCommit,
}

impl Announce {
    /// `molecule.announce` for the enqueuing statement's transaction.
    fn setting(self) -> &'static str {
        match self {
            Announce::InTransaction => "",
            Announce::AfterCommit => "after_commit",
        }
    }
}

impl NewJob {
    pub fn new(kind: JobKind, payload: &impl serde::Serialize) -> Self {
        let mut job = Self::to_queue(kind.queue(), payload);
        job.max_attempts = kind.retry_policy().max_attempts;
        job
    }

    pub fn to_queue(queue: &str, payload: &impl serde::Serialize) -> Self {
        Self {
            queue: queue.to_string(),
            // Serializing our own payload types cannot fail (no non-string map keys).
            payload: serde_json::to_vec(payload).unwrap_or_else(|_| b"null".to_vec()),
            org_id: None,
            workspace_id: None,
            run_at: None,
            expires_at: None,
            max_attempts: 25,
            priority: 0,
            idempotency_key: None,
            announce: Announce::InTransaction,
        }
    }

    pub fn org(mut self, org: OrgId) -> Self {
        self.org_id = Some(org);
        self
    }
    pub fn workspace(mut self, ws: WorkspaceId) -> Self {
        self.workspace_id = Some(ws);
        self
    }
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self
    }
    pub fn expires_at(mut self, at: DateTime<Utc>) -> Self {
        self.expires_at = Some(at);
        self
    }
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = n.max(1);
        self
    }
    pub fn priority(mut self, p: i32) -> Self {
        self.priority = p;
        self
    }
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
    /// The caller announces this job after its transaction commits
    /// ([`crate::announce::Announcer::announce`]); the commit sends no NOTIFY.
    pub fn announce_after_commit(mut self) -> Self {
        self.announce = Announce::AfterCommit;
        self
    }
}

const INSERT_ONE: &str = r#"
WITH ins AS (
    INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at,
                             priority, idempotency_key, org_id, workspace_id, expires_at)
    SELECT $1, $2, $3, 'Pending', 0, $4, COALESCE($5, now()), $6, $7, $8, $9, $10
    -- For the insert trigger, which runs after this statement (announce_after_commit.sql).
    -- (An uncorrelated subquery: evaluated once, before the insert.)
    WHERE (SELECT set_config('molecule.announce', $11, true)) IS NOT NULL
    ON CONFLICT (job_type, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id
)
SELECT id FROM ins
UNION ALL
SELECT id FROM apalis.jobs WHERE $7::text IS NOT NULL AND job_type = $2 AND idempotency_key = $7
LIMIT 1
"#;

/// Pushes one job on `conn` (pass `&mut *tx` to enqueue inside a transaction).
pub async fn enqueue(conn: &mut PgConnection, job: &NewJob) -> Result<JobId, sqlx::Error> {
    let id = JobId::generate();
    // Twice at most: when a racing enqueue of the same key commits after this statement's
    // snapshot, DO NOTHING skips the insert and the SELECT cannot see the winner yet; the
    // next statement (a new snapshot, even inside a transaction at READ COMMITTED) does.
    for _ in 0..2 {
        let got: Option<String> = sqlx::query_scalar(INSERT_ONE)
            .bind(id.as_str())
            .bind(&job.queue)
            .bind(&job.payload)
            .bind(job.max_attempts)
            .bind(job.run_at)
            .bind(job.priority)
            .bind(&job.idempotency_key)
            .bind(job.org_id.map(|o| o.0))
            .bind(job.workspace_id.map(|w| w.0))
            .bind(job.expires_at)
            .bind(job.announce.setting())
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(got) = got {
            if got == id.as_str() {
                crate::metrics::enqueued(&job.queue, 1);
            }
            return Ok(JobId::from_db(got));
        }
    }
    Err(sqlx::Error::RowNotFound)
}

const INSERT_MANY: &str = r#"
INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at,
                         priority, org_id, workspace_id, expires_at)
SELECT id, job_type, job, 'Pending', 0, max_attempts, COALESCE(run_at, now()),
       priority, org_id, workspace_id, expires_at
FROM unnest($1::text[], $2::text[], $3::bytea[], $4::int[], $5::timestamptz[],
            $6::int[], $7::uuid[], $8::uuid[], $9::timestamptz[])
     AS t(id, job_type, job, max_attempts, run_at, priority, org_id, workspace_id, expires_at)
-- For the insert trigger (see INSERT_ONE); evaluated once.
WHERE (SELECT set_config('molecule.announce', $10, true)) IS NOT NULL
"#;

/// Pushes many jobs in one statement (bulk enqueue). Idempotency keys are not
/// supported here: use [`enqueue`] for keyed jobs.
pub async fn enqueue_many(conn: &mut PgConnection, jobs: &[NewJob]) -> Result<Vec<JobId>, sqlx::Error> {
    let ids: Vec<JobId> = jobs.iter().map(|_| JobId::generate()).collect();
    // Quiet only when every job's caller announces it.
    let announce = match jobs.iter().all(|j| j.announce == Announce::AfterCommit) {
        true if !jobs.is_empty() => Announce::AfterCommit,
        _ => Announce::InTransaction,
    };
    sqlx::query(INSERT_MANY)
        .bind(ids.iter().map(|i| i.as_str().to_string()).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.queue.clone()).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.payload.clone()).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.max_attempts).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.run_at).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.priority).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.org_id.map(|o| o.0)).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.workspace_id.map(|w| w.0)).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.expires_at).collect::<Vec<_>>())
        .bind(announce.setting())
        .execute(conn)
        .await?;
    // One count per run of jobs to the same queue (a bulk is usually one queue).
    for run in jobs.chunk_by(|a, b| a.queue == b.queue) {
        crate::metrics::enqueued(&run[0].queue, run.len());
    }
    Ok(ids)
}
