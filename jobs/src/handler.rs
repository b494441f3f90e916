//! What a pool runs for each job, and how a job attempt can fail.

use molecule_domain::{JobId, OrgId, WorkspaceId};
use serde::de::DeserializeOwned;
use sqlx::PgPool;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// Everything an attempt knows: ids (never whole rows: a job re-reads state at start),
/// the attempt number (1-based, persisted), and a database pool.
#[derive(Clone, Debug)]
pub struct JobContext {
    pub id: JobId,
    pub queue: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub org_id: Option<OrgId>,
    pub workspace_id: Option<WorkspaceId>,
    pub payload: Arc<[u8]>,
    pub db: PgPool,
    /// Set when this attempt must stop: its worker's shutdown grace period ran out, or the
    /// worker lost its lease (no heartbeat written for half a lease).
    pub interrupt: Interrupt,
}

/// The end of a worker's shutdown grace period (or of its lease), as a running attempt
/// sees it. A handler that can stop cleanly (say, kill the command it started) waits on [`Interrupt::wait`]
/// and returns [`JobError::Interrupted`]; one that does not is aborted a little later.
#[derive(Clone, Debug)]
pub struct Interrupt(tokio::sync::watch::Receiver<bool>);

impl Interrupt {
    pub fn new(rx: tokio::sync::watch::Receiver<bool>) -> Self {
        Interrupt(rx)
    }

    /// Never fires (jobs run outside a pool, tests).
    pub fn never() -> Self {
        let (tx, rx) = tokio::sync::watch::channel(false);
        std::mem::forget(tx);
        Interrupt(rx)
    }

    /// The underlying signal, for code that cannot depend on this crate (backends).
    pub fn receiver(&self) -> tokio::sync::watch::Receiver<bool> {
        self.0.clone()
    }

    /// Resolves when the attempt must stop.
    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|v| *v).await.is_err() {
            // The pool is gone without interrupting: nothing will ever come.
            std::future::pending::<()>().await;
        }
    }
}

impl JobContext {
    /// An attempt run outside the queue (a tool, a test driving one handler): a fresh id,
    /// attempt 1 of 1, no org or workspace, an empty JSON payload, never interrupted.
    pub fn outside_queue(db: PgPool, queue: &str) -> Self {
        JobContext {
            id: JobId::generate(),
            queue: queue.to_string(),
            attempt: 1,
            max_attempts: 1,
            org_id: None,
            workspace_id: None,
            payload: Arc::from(&b"{}"[..]),
            db,
            interrupt: Interrupt::never(),
        }
    }

    /// Decodes the payload; a payload that does not decode is a permanent failure.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, JobError> {
        serde_json::from_slice(&self.payload).map_err(|e| JobError::Undecodable(e.to_string()))
    }
}

/// Why an attempt failed, said twice: a stable `code` (with the canned sentence tenants
/// read for it in `GET /jobs/:id`, [`crate::failures`]) and the `detail` — engine or SDK
/// text, image references, hosts — which only the server log and operators see.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: &'static str,
    pub detail: String,
}

/// How an attempt failed. The runtime turns it into the job's next state.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Worth another attempt after backoff (dead once attempts run out).
    #[error("{}: {}", .0.code, .0.detail)]
    Retryable(Failure),
    /// Will never succeed: the job is failed at once (A13 `failed`).
    #[error("{}: {}", .0.code, .0.detail)]
    Permanent(Failure),
    /// The payload is not what this queue's handler reads: failed at once.
    #[error("undecodable payload: {0}")]
    Undecodable(String),
    /// No workspace backend is configured in this process (MOLECULE_BACKEND=none).
    #[error("no backend configured: set MOLECULE_BACKEND to docker or ec2 and retry the job")]
    NoBackend,
    /// The attempt stopped because its worker shut down ([`Interrupt`]). Kinds that must
    /// not run twice end `interrupted`; the others are handed back.
    #[error("interrupted: its worker stopped it before it finished (shutdown grace over, or heartbeat lost)")]
    Interrupted,
    /// Not now: the job goes back to the queue, due `after` from now, and this attempt
    /// does not count (Oban's snooze). For a turn to wait for (a lock another job holds),
    /// never for a failure. Its `expires_at` still holds. The core does not cap snoozes:
    /// a handler that snoozes must bound the wait itself (say, by the job's age) and fail
    /// once past it, or the job never ends.
    #[error("snoozed for {after:?}: {}: {}", .why.code, .why.detail)]
    Snooze { after: Duration, why: Failure },
}

impl JobError {
    pub fn retryable(code: &'static str, detail: impl Into<String>) -> Self {
        JobError::Retryable(Failure { code, detail: detail.into() })
    }

    pub fn permanent(code: &'static str, detail: impl Into<String>) -> Self {
        JobError::Permanent(Failure { code, detail: detail.into() })
    }

    /// Run again after `after`, this attempt not counted ([`JobError::Snooze`]); `code`
    /// and `detail` say why it waits (the code's sentence is the job's `last_error` meanwhile).
    pub fn snooze(after: Duration, code: &'static str, detail: impl Into<String>) -> Self {
        JobError::Snooze { after, why: Failure { code, detail: detail.into() } }
    }

    pub fn is_permanent(&self) -> bool {
        !matches!(self, JobError::Retryable(_) | JobError::Interrupted | JobError::Snooze { .. })
    }

    /// The stable code of this failure.
    pub fn code(&self) -> &'static str {
        match self {
            JobError::Retryable(f) | JobError::Permanent(f) | JobError::Snooze { why: f, .. } => f.code,
            JobError::Undecodable(_) => "undecodable_payload",
            JobError::NoBackend => "no_backend",
            JobError::Interrupted => "interrupted",
        }
    }

    /// What a tenant reads: the code and its canned sentence, nothing of the detail.
    pub fn public(&self) -> String {
        crate::failures::public(self.code())
    }

    /// Everything, for the server log and operators.
    pub fn detail(&self) -> String {
        self.to_string()
    }
}

pub type HandlerResult = Result<serde_json::Value, JobError>;
pub type HandlerFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send>>;
/// A pool's handler: shared by every concurrent attempt.
pub type Handler = Arc<dyn Fn(JobContext) -> HandlerFuture + Send + Sync>;

/// A handler from an async closure over the raw context.
pub fn handler_fn<F, Fut>(f: F) -> Handler
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    Arc::new(move |ctx| Box::pin(f(ctx)))
}

/// A handler that first decodes the payload into `T` (undecodable → failed, and the pool goes on).
pub fn typed_handler<T, F, Fut>(f: F) -> Handler
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(JobContext, T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    let f = Arc::new(f);
    Arc::new(move |ctx: JobContext| {
        let f = f.clone();
        Box::pin(async move {
            let args: T = ctx.decode()?;
            f(ctx, args).await
        })
    })
}
