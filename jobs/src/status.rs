//! The client's view of a job (A13): one status vocabulary over apalis' columns,
//! reads, and cancel / retry by id (A14).

use chrono::{DateTime, Utc};
use molecule_domain::{JobId, OrgId};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting to run, due now.
    Pending,
    /// Waiting to run, due later.
    Scheduled,
    Running,
    Succeeded,
    /// The last attempt failed; it will run again at `run_at`.
    Retrying,
    /// Failed permanently (another attempt would fail the same way): not run again.
    Failed,
    /// Out of attempts: not run again.
    Dead,
    /// Not run: past its `expires_at`.
    Expired,
    Cancelled,
    /// Was running when its worker stopped; of a kind that must not run twice (exec), so
    /// not run again automatically (`POST /jobs/{id}/retry` can).
    Interrupted,
}

impl JobStatus {
    pub const ALL: [JobStatus; 10] = [
        Self::Pending,
        Self::Scheduled,
        Self::Running,
        Self::Succeeded,
        Self::Retrying,
        Self::Failed,
        Self::Dead,
        Self::Expired,
        Self::Cancelled,
        Self::Interrupted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Scheduled => "scheduled",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Retrying => "retrying",
            Self::Failed => "failed",
            Self::Dead => "dead",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
            Self::Interrupted => "interrupted",
        }
    }

    /// The job will not change any more on its own.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Pending | Self::Scheduled | Self::Running | Self::Retrying)
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "scheduled" => Self::Scheduled,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "retrying" => Self::Retrying,
            "failed" => Self::Failed,
            "dead" => Self::Dead,
            "expired" => Self::Expired,
            "cancelled" => Self::Cancelled,
            "interrupted" => Self::Interrupted,
            _ => return None,
        })
    }
}

/// SQL for the client status of a row of `apalis.jobs j` (a macro so it can be
/// `concat!`-ed into static statements).
#[macro_export]
macro_rules! job_status_sql {
    () => {
        "CASE \
            WHEN j.status = 'Done' THEN 'succeeded' \
            WHEN j.status = 'Killed' THEN COALESCE(j.outcome, 'dead') \
            WHEN j.status IN ('Queued', 'Running') THEN 'running' \
            WHEN j.status = 'Failed' THEN 'retrying' \
            WHEN j.run_at > now() THEN 'scheduled' \
            ELSE 'pending' END"
    };
}

/// Columns of a job's view, over `apalis.jobs j`. `result` only in full views: an exec
/// result can hold 2 MiB, so listings never read it.
macro_rules! view_columns {
    ($result:literal) => {
        concat!(
            "j.id, j.job_type AS kind, ",
            job_status_sql!(),
            " AS status, j.attempts, j.max_attempts, j.run_at, j.created_at, \
             j.started_at, j.done_at AS finished_at, j.expires_at, j.last_error, ",
            $result,
            " AS result, j.org_id, j.workspace_id, j.attempt_log"
        )
    };
}

macro_rules! select_view {
    ($filter:literal) => {
        concat!(
            "SELECT ",
            view_columns!("CASE WHEN j.status = 'Done' THEN j.last_result -> 'Ok' END"),
            " FROM apalis.jobs j WHERE ",
            $filter
        )
    };
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct JobView {
    pub id: String,
    pub kind: String,
    pub status: JobStatus,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// What the job returned, when it succeeded (any JSON). Listings leave it out: see
    /// `result_url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Where the full result is read (`GET /jobs/{id}`), in listings of succeeded jobs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_url: Option<String>,
    pub org_id: Option<Uuid>,
    pub workspace_id: Option<Uuid>,
    /// One entry per failed attempt: attempt, started_at, failed_at, error.
    #[schema(value_type = Vec<Object>)]
    pub attempt_log: serde_json::Value,
}

#[derive(sqlx::FromRow)]
struct ViewRow {
    id: String,
    kind: String,
    status: String,
    attempts: i32,
    max_attempts: i32,
    run_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
    result: Option<serde_json::Value>,
    org_id: Option<Uuid>,
    workspace_id: Option<Uuid>,
    attempt_log: serde_json::Value,
}

impl From<ViewRow> for JobView {
    fn from(r: ViewRow) -> Self {
        JobView {
            id: r.id,
            kind: r.kind,
            status: JobStatus::parse(&r.status).unwrap_or(JobStatus::Dead),
            attempts: r.attempts,
            max_attempts: r.max_attempts,
            run_at: r.run_at,
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            expires_at: r.expires_at,
            last_error: r.last_error,
            result: r.result,
            result_url: None,
            org_id: r.org_id,
            workspace_id: r.workspace_id,
            attempt_log: r.attempt_log,
        }
    }
}

fn view(r: ViewRow) -> JobView {
    r.into()
}

/// Whether the job was enqueued, or last retried by hand, more than `age` ago (None: no
/// such job).
pub async fn queued_before(db: &PgPool, id: &JobId, age: std::time::Duration) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar("SELECT coalesce(retried_at, created_at) < now() - $2::float8 * interval '1 second' FROM apalis.jobs WHERE id = $1")
        .bind(id.as_str())
        .bind(age.as_secs_f64())
        .fetch_optional(db)
        .await
}

/// A failed attempt's detail (engine or SDK text, hosts, worker ids): for operators only,
/// never in a tenant's view of the job.
pub async fn error_detail(db: &PgPool, id: &JobId) -> Result<Option<String>, sqlx::Error> {
    Ok(sqlx::query_scalar::<_, Option<String>>("SELECT last_error_detail FROM apalis.jobs WHERE id = $1")
        .bind(id.as_str())
        .fetch_optional(db)
        .await?
        .flatten())
}

/// Of these jobs, the ones that have ended (succeeded, failed, dead, expired, cancelled,
/// interrupted), with how. For maintenance that settles rows whose job ended without
/// writing them (the A2A TTL sweep).
pub async fn ended(db: &PgPool, ids: &[String]) -> Result<Vec<(String, JobStatus)>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(concat!(
        "SELECT j.id, ",
        job_status_sql!(),
        " FROM apalis.jobs j WHERE j.id = ANY($1) AND j.status IN ('Done', 'Killed')"
    ))
    .bind(ids)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().filter_map(|(id, s)| JobStatus::parse(&s).map(|s| (id, s))).collect())
}

/// A job by id, whoever owns it (workers, operators, tests). API reads use [`get_for_org`].
pub async fn get(db: &PgPool, id: &JobId) -> Result<Option<JobView>, sqlx::Error> {
    let row: Option<ViewRow> = sqlx::query_as(select_view!("j.id = $1")).bind(id.as_str()).fetch_optional(db).await?;
    Ok(row.map(view))
}

/// A job by id, only when it belongs to `org` (strict equality: X1).
pub async fn get_for_org(db: &PgPool, id: &JobId, org: OrgId) -> Result<Option<JobView>, sqlx::Error> {
    let row: Option<ViewRow> =
        sqlx::query_as(select_view!("j.id = $1 AND j.org_id = $2")).bind(id.as_str()).bind(org.0).fetch_optional(db).await?;
    Ok(row.map(view))
}

/// Whose jobs a listing reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobScope {
    /// One organization's (every tenant listing: X1).
    Org(OrgId),
    /// Every organization's: operators only (the dashboard with ADMIN_TOKEN).
    AllOrgs,
}

/// Filters of a job listing.
#[derive(Clone, Debug)]
pub struct ListFilter {
    pub scope: JobScope,
    pub workspace: Option<Uuid>,
    pub kind: Option<String>,
    pub status: Option<JobStatus>,
    /// Jobs strictly older than this job id (the previous page's last id).
    pub before: Option<JobId>,
    pub limit: i64,
}

const LIST: &str = concat!(
    "SELECT * FROM (SELECT ",
    view_columns!("NULL::jsonb"),
    " FROM apalis.jobs j WHERE ($1::uuid IS NULL OR j.org_id = $1) AND ($2::uuid IS NULL OR j.workspace_id = $2) \
      AND ($3::text IS NULL OR j.job_type = $3) AND ($5::text IS NULL OR j.id < $5)",
    ") v WHERE ($4::text IS NULL OR v.status = $4) ORDER BY v.id DESC LIMIT $6"
);

/// One page of an org's jobs, newest first, without their results (`result_url` says
/// where a succeeded job's result is).
pub async fn list(db: &PgPool, f: &ListFilter) -> Result<Vec<JobView>, sqlx::Error> {
    let status = f.status.map(JobStatus::as_str);
    let rows: Vec<ViewRow> = sqlx::query_as(LIST)
        .bind(match f.scope {
            JobScope::Org(o) => Some(o.0),
            JobScope::AllOrgs => None,
        })
        .bind(f.workspace)
        .bind(&f.kind)
        .bind(status)
        .bind(f.before.as_ref().map(|b| b.as_str().to_string()))
        .bind(f.limit)
        .fetch_all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let mut v = view(r);
            if v.status == JobStatus::Succeeded {
                v.result_url = Some(format!("/jobs/{}", v.id));
            }
            v
        })
        .collect())
}

#[derive(Debug, PartialEq, Eq)]
pub enum Transition {
    Done,
    NotFound,
    /// The job is in a status the operation does not apply to.
    Conflict(JobStatus),
}

/// lock_at set: out of the claim index (whose predicate is `lock_at IS NULL`).
const CANCEL: &str = r#"
UPDATE apalis.jobs
SET status = 'Killed', outcome = 'cancelled', done_at = now(), last_error = 'cancelled',
    lock_at = COALESCE(lock_at, now())
WHERE id = $1 AND status IN ('Pending', 'Failed')
"#;

/// Cancels a job that is waiting (pending, scheduled, or retrying: awaiting its retry).
pub async fn cancel(db: &PgPool, id: &JobId) -> Result<Transition, sqlx::Error> {
    let n = sqlx::query(CANCEL).bind(id.as_str()).execute(db).await?.rows_affected();
    settle(db, id, n).await
}

/// [`cancel`], only when the job belongs to `org` (another org's job is NotFound).
pub async fn cancel_for_org(db: &PgPool, id: &JobId, org: OrgId) -> Result<Transition, sqlx::Error> {
    if get_for_org(db, id, org).await?.is_none() {
        return Ok(Transition::NotFound);
    }
    cancel(db, id).await
}

/// [`retry`], only when the job belongs to `org`.
pub async fn retry_for_org(db: &PgPool, id: &JobId, org: OrgId) -> Result<Transition, sqlx::Error> {
    if get_for_org(db, id, org).await?.is_none() {
        return Ok(Transition::NotFound);
    }
    retry(db, id).await
}

/// Runs a retrying, failed, dead, cancelled or interrupted job again now, with at least one attempt left.
const RETRY: &str = r#"
WITH r AS (
    UPDATE apalis.jobs
    SET status = 'Pending', outcome = NULL, done_at = NULL, run_at = now(), retried_at = now(), lock_by = NULL,
        lock_at = NULL, max_attempts = greatest(max_attempts, attempts + 1)
    WHERE id = $1 AND (status = 'Failed' OR (status = 'Killed' AND outcome IN ('failed', 'dead', 'cancelled', 'interrupted')))
    RETURNING job_type
)
SELECT pg_notify($2, json_build_object('job_type', job_type, 'id', $1::text)::text) FROM r
"#;

/// Removes a job's row outright, as retention does to old ones: true when there was one.
pub async fn delete(db: &PgPool, id: &JobId) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query("DELETE FROM apalis.jobs WHERE id = $1").bind(id.as_str()).execute(db).await?.rows_affected() > 0)
}

pub async fn retry(db: &PgPool, id: &JobId) -> Result<Transition, sqlx::Error> {
    let n = sqlx::query(RETRY).bind(id.as_str()).bind(crate::runtime::INSERT_CHANNEL).execute(db).await?.rows_affected();
    settle(db, id, n).await
}

async fn settle(db: &PgPool, id: &JobId, affected: u64) -> Result<Transition, sqlx::Error> {
    if affected > 0 {
        return Ok(Transition::Done);
    }
    Ok(match get(db, id).await? {
        None => Transition::NotFound,
        Some(v) => Transition::Conflict(v.status),
    })
}
