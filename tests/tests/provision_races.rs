//! A provision (J1) and a restart (J3) of one workspace take turns on every backend, and
//! the one that comes second does not undo the other's work: the token the instance ends
//! up with is the workspace's live token (seed 004: a revoked one is a 401 forever).
//! A fake backend whose first start blocks until the test lets it go stands in for a
//! slow first image pull.

use molecule_backends::{Backend, BackendError, ChunkSink, ExecOutcome, ExecRequest, ManagedInstance, StartSpec, Started};
use molecule_domain::tokens::{self, TokenOwner};
use molecule_domain::{OrgId, WorkspaceId};
use molecule_jobs::{JobContext, JobError};
use molecule_tests::fresh_db;
use molecule_workers::Deps;
use sqlx::PgPool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Like Docker (no instance ids). The first start waits for `release`; every start then
/// "writes" its token into the volume: the last write wins, as on a real volume.
#[derive(Default)]
struct SlowFirstStart {
    first_taken: AtomicBool,
    entered: Notify,
    release: Notify,
    written: Mutex<Option<String>>,
}

#[async_trait::async_trait]
impl Backend for SlowFirstStart {
    fn name(&self) -> &'static str {
        "fake"
    }
    async fn start(&self, spec: &StartSpec) -> Result<Started, BackendError> {
        if !self.first_taken.swap(true, Ordering::SeqCst) {
            self.entered.notify_one();
            self.release.notified().await;
        }
        *self.written.lock().unwrap() = Some(spec.secrets().token().to_string());
        Ok(Started { container_name: "ws-fake".into(), image_digest: None, instance_id: None, agent_url: None })
    }
    async fn stop(&self, _: WorkspaceId) -> Result<(), BackendError> {
        Ok(())
    }
    async fn remove_volume(&self, _: WorkspaceId) -> Result<(), BackendError> {
        Ok(())
    }
    async fn is_running(&self, _: WorkspaceId) -> (bool, Option<BackendError>) {
        (true, None)
    }
    async fn list_managed(&self) -> Result<Vec<ManagedInstance>, BackendError> {
        Ok(vec![])
    }
    async fn exec(&self, _: WorkspaceId, _: &ExecRequest, _: ChunkSink<'_>) -> Result<ExecOutcome, BackendError> {
        unreachable!("not used")
    }
    async fn read_file(&self, _: WorkspaceId, _: &str) -> Result<Option<Vec<u8>>, BackendError> {
        unreachable!("not used")
    }
    async fn rescue_sections(&self, _: WorkspaceId) -> Result<Vec<(String, String)>, BackendError> {
        unreachable!("not used")
    }
}

struct Rig {
    db: PgPool,
    deps: Deps,
    fake: Arc<SlowFirstStart>,
    ws: WorkspaceId,
}

async fn rig() -> Rig {
    let (db, _) = fresh_db().await;
    let mut c = db.acquire().await.unwrap();
    let (org, _) = tokens::create_org(&mut c, "races").await.unwrap();
    drop(c);
    let ws: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO workspaces (org_id, name, runtime, tier, status) VALUES ($1, 'race', 'echo', 3, 'provisioning') RETURNING id",
    )
    .bind(org.0)
    .fetch_one(&db)
    .await
    .unwrap();
    let fake = Arc::new(SlowFirstStart::default());
    let deps = Deps::minimal(db.clone(), fake.clone()).unwrap();
    Rig { db, deps, fake, ws: WorkspaceId(ws) }
}

fn ctx(db: &PgPool, queue: &str, org: Option<OrgId>, ws: WorkspaceId) -> JobContext {
    JobContext { max_attempts: 5, org_id: org, workspace_id: Some(ws), ..JobContext::outside_queue(db.clone(), queue) }
}

fn refused_for_a_restart(r: &Result<serde_json::Value, JobError>) -> bool {
    matches!(r, Err(e) if e.code() == "restart_in_progress")
}

/// The token the instance was left with authenticates as the workspace, and it is the
/// workspace's only live token; the workspace is still waiting for its agent.
async fn the_instance_holds_the_live_token(r: &Rig) {
    let written = r.fake.written.lock().unwrap().clone().expect("a start wrote a token");
    let mut c = r.db.acquire().await.unwrap();
    let owner = tokens::lookup(&mut c, &written).await.unwrap();
    assert!(
        matches!(owner, Some(TokenOwner::Workspace { workspace_id, .. }) if workspace_id == r.ws),
        "the token in the instance's volume is revoked: its agent would get 401 forever"
    );
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM workspace_auth_tokens WHERE workspace_id = $1 AND revoked_at IS NULL")
        .bind(r.ws.0)
        .fetch_one(&r.db)
        .await
        .unwrap();
    assert_eq!(live, 1);
    let status: String =
        sqlx::query_scalar("SELECT status::text FROM workspaces WHERE id = $1").bind(r.ws.0).fetch_one(&r.db).await.unwrap();
    assert_eq!(status, "provisioning");
}

async fn entered(fake: &SlowFirstStart) {
    tokio::time::timeout(Duration::from_secs(10), fake.entered.notified()).await.expect("the first start began");
}

/// The reviewer's sequence: the provision's start is slow, a restart comes meanwhile.
/// The restart waits its turn (the job runtime retries it), then replaces the instance
/// with fresh secrets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_a_slow_provision_waits_and_the_instance_keeps_a_live_token() {
    let r = rig().await;
    let provision = tokio::spawn({
        let (deps, ctx) = (r.deps.clone(), ctx(&r.db, "provision", None, r.ws));
        let ws = r.ws;
        async move { molecule_workers::provision::run(&deps, &ctx, ws).await }
    });
    entered(&r.fake).await;
    let restart_ctx = ctx(&r.db, "restart", None, r.ws);
    let first = molecule_workers::restart::run(&r.deps, &restart_ctx, r.ws).await;
    r.fake.release.notify_one();
    let p = provision.await.unwrap();
    assert!(p.is_ok(), "{p:?}");
    if refused_for_a_restart(&first) {
        // The runtime's retry of the restart, now that the provision is done.
        let again = molecule_workers::restart::run(&r.deps, &restart_ctx, r.ws).await;
        assert!(again.is_ok(), "{again:?}");
    } else {
        assert!(first.is_ok(), "{first:?}");
    }
    the_instance_holds_the_live_token(&r).await;
}

/// The other order: a restart's start is slow and the provision job (queued at create)
/// comes meanwhile. It waits its turn, then finds the instance started and leaves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provision_during_a_slow_restart_waits_then_leaves_the_restarted_instance_alone() {
    let r = rig().await;
    let restart = tokio::spawn({
        let (deps, ctx) = (r.deps.clone(), ctx(&r.db, "restart", None, r.ws));
        let ws = r.ws;
        async move { molecule_workers::restart::run(&deps, &ctx, ws).await }
    });
    entered(&r.fake).await;
    let provision_ctx = ctx(&r.db, "provision", None, r.ws);
    let first = molecule_workers::provision::run(&r.deps, &provision_ctx, r.ws).await;
    r.fake.release.notify_one();
    let done = restart.await.unwrap();
    assert!(done.is_ok(), "{done:?}");
    if refused_for_a_restart(&first) {
        let again = molecule_workers::provision::run(&r.deps, &provision_ctx, r.ws).await.expect("the retry succeeds");
        assert!(again["skipped"].as_str().is_some_and(|s| s.contains("already started")), "{again}");
    } else {
        assert!(first.is_ok(), "{first:?}");
    }
    the_instance_holds_the_live_token(&r).await;
}

/// The regression of 1259b4e: a restart queued while a provision holds the workspace's
/// restart lock (its start slow, as a first image pull) failed each time it found the
/// lock held, a retryable failure that used one of its attempts, and died long before the
/// provision was done. Now it snoozes (J3: it waits its turn, no attempt used): with
/// three attempts and retries every few hundred milliseconds, it finds the lock held more
/// times than it has attempts, runs each time as attempt 1, and still runs when the
/// provision is done, and ends done. The test waits on what the handler answered, not on
/// the clock: a wrapper around the restart handler records each answer and shortens its
/// snooze from `TURN_RETRY` (5 s) to a few hundred milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_queued_during_a_long_provision_waits_without_using_its_attempts() {
    use molecule_jobs::handler::HandlerFuture;
    use molecule_jobs::status::{self, JobView};
    use molecule_jobs::{JobKind, JobStatus, NewJob, Runtime, RuntimeConfig};
    use molecule_workers::restart::TURN_RETRY;
    /// What the restart handler answered when it found the lock held.
    #[derive(Clone, Debug)]
    struct Turn {
        attempt: i32,
        /// The snooze it asked for; None: it failed instead.
        snoozed_for: Option<Duration>,
    }
    const SHORT_TURN: Duration = Duration::from_millis(250);
    let r = rig().await;
    let provision = tokio::spawn({
        let (deps, ctx) = (r.deps.clone(), ctx(&r.db, "provision", None, r.ws));
        let ws = r.ws;
        async move { molecule_workers::provision::run(&deps, &ctx, ws).await }
    });
    entered(&r.fake).await;
    let turns: Arc<Mutex<Vec<Turn>>> = Arc::default();
    let mut specs = molecule_workers::handlers::pool_specs(&r.deps, &[(JobKind::Restart, 1)].into_iter().collect());
    for s in &mut specs {
        // Retries that would use up three attempts in well under a second.
        s.retry.base = Duration::from_millis(100);
        s.retry.cap = Duration::from_millis(200);
        let (inner, turns) = (s.handler.clone(), turns.clone());
        s.handler = Arc::new(move |ctx: JobContext| -> HandlerFuture {
            let (inner, turns) = (inner.clone(), turns.clone());
            Box::pin(async move {
                let attempt = ctx.attempt;
                match inner(ctx).await {
                    Err(JobError::Snooze { after, why }) if why.code == "restart_in_progress" => {
                        turns.lock().unwrap().push(Turn { attempt, snoozed_for: Some(after) });
                        Err(JobError::Snooze { after: after.min(SHORT_TURN), why })
                    }
                    Err(e) if e.code() == "restart_in_progress" => {
                        turns.lock().unwrap().push(Turn { attempt, snoozed_for: None });
                        Err(e)
                    }
                    other => other,
                }
            })
        });
    }
    let cfg = RuntimeConfig { poll_interval: Duration::from_millis(200), grace: Duration::from_secs(5), ..Default::default() };
    let rt = Runtime::start(r.db.clone(), cfg, specs);
    let id = {
        let mut c = r.db.acquire().await.unwrap();
        let job = NewJob::to_queue("restart", &serde_json::json!({ "workspace_id": r.ws.0 })).workspace(r.ws).max_attempts(3);
        molecule_jobs::enqueue(&mut c, &job).await.unwrap()
    };
    let view = |db: PgPool, id: molecule_domain::JobId| async move { status::get(&db, &id).await.unwrap().expect("the job") };
    // It found the lock held more times than it has attempts (or it ended: checked below).
    let seen: JobView = molecule_tests::eventually(Duration::from_secs(30), "the restart to find the lock held 4 times", || {
        let held = turns.lock().unwrap().len();
        let f = view(r.db.clone(), id.clone());
        async move { Some(f.await).filter(|v| held >= 4 || v.status.is_final()) }
    })
    .await;
    let so_far = turns.lock().unwrap().clone();
    assert!(
        so_far.iter().all(|t| t.snoozed_for == Some(TURN_RETRY) && t.attempt == 1),
        "waiting its turn used attempts: {so_far:?} (the job: {:?} after {} attempts)",
        seen.status,
        seen.attempts
    );
    assert!(!seen.status.is_final(), "the restart ended while it waited its turn: {seen:?}");
    // Between two claims, the row counts no attempt and says why it waits.
    let between: JobView = molecule_tests::eventually(Duration::from_secs(10), "the restart between two claims", || {
        let f = view(r.db.clone(), id.clone());
        async move { Some(f.await).filter(|v| v.status != JobStatus::Running) }
    })
    .await;
    assert!(!between.status.is_final(), "{between:?}");
    assert_eq!(between.attempts, 0, "waiting its turn uses no attempt: {between:?}");
    assert!(between.last_error.as_deref().is_some_and(|e| e.starts_with("restart_in_progress")), "{between:?}");
    r.fake.release.notify_one();
    assert!(provision.await.unwrap().is_ok());
    let done: JobView = molecule_tests::eventually(Duration::from_secs(15), "the restart to end", || {
        let f = view(r.db.clone(), id.clone());
        async move { Some(f.await).filter(|v| v.status.is_final()) }
    })
    .await;
    rt.shutdown().await;
    assert_eq!((done.status, done.attempts), (JobStatus::Succeeded, 1), "{done:?}");
    the_instance_holds_the_live_token(&r).await;
}

/// The wait is bounded: a job that finds the lock held once it is ten minutes old
/// (`TURN_WAIT`) fails retryably, using an attempt, so a lock that stays taken ends it.
/// A retry by hand starts the wait anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_its_turn_too_long_uses_its_attempts_again() {
    let r = rig().await;
    let provision = tokio::spawn({
        let (deps, ctx) = (r.deps.clone(), ctx(&r.db, "provision", None, r.ws));
        let ws = r.ws;
        async move { molecule_workers::provision::run(&deps, &ctx, ws).await }
    });
    entered(&r.fake).await;
    let mut young = ctx(&r.db, "restart", None, r.ws);
    let mut old = ctx(&r.db, "restart", None, r.ws);
    for (ctx, age) in [(&mut young, "1 minute"), (&mut old, "11 minutes")] {
        let mut c = r.db.acquire().await.unwrap();
        let id = molecule_jobs::enqueue(&mut c, &molecule_jobs::NewJob::to_queue("parked", &serde_json::json!({}))).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE apalis.jobs SET created_at = now() - interval '{age}' WHERE id = $1")))
            .bind(id.as_str())
            .execute(&r.db)
            .await
            .unwrap();
        ctx.id = id;
    }
    let y = molecule_workers::restart::run(&r.deps, &young, r.ws).await;
    assert!(matches!(y, Err(JobError::Snooze { .. })), "{y:?}");
    let o = molecule_workers::restart::run(&r.deps, &old, r.ws).await;
    assert!(matches!(&o, Err(JobError::Retryable(f)) if f.code == "restart_in_progress"), "{o:?}");
    // Dead, then retried by hand while the lock is still held: it waits its turn again.
    sqlx::query("UPDATE apalis.jobs SET status = 'Killed', outcome = 'dead' WHERE id = $1")
        .bind(old.id.as_str())
        .execute(&r.db)
        .await
        .unwrap();
    assert!(matches!(molecule_jobs::status::retry(&r.db, &old.id).await.unwrap(), molecule_jobs::status::Transition::Done));
    let again = molecule_workers::restart::run(&r.deps, &old, r.ws).await;
    assert!(matches!(again, Err(JobError::Snooze { .. })), "{again:?}");
    r.fake.release.notify_one();
    assert!(provision.await.unwrap().is_ok());
}
