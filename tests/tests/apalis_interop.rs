//! apalis interop (issue 14, part 5): our queues are apalis queues. A job pushed through
//! apalis-postgres' own API lands in one of our queues and runs in our pool; apalis' own
//! list and metrics APIs (apalis-core's `ListTasks`, `ListAllTasks`, `FetchById`,
//! `ListQueues`, `ListWorkers`, `Metrics`, implemented by `PostgresStorage`) read the rows
//! our core wrote, with the states our core meant.

use apalis_core::backend::{
    FetchById, Filter, ListAllTasks, ListQueues, ListTasks, ListWorkers, Metrics, QueueInfo, StatType, Statistic, TaskSink,
};
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::status::Status;
use apalis_core::task::task_id::TaskId;
use apalis_postgres::{Config, PgTask, PostgresStorage};
use chrono::Utc;
use molecule_domain::JobId;
use molecule_jobs::status::{self, JobView};
use molecule_jobs::sweeper::{SweepArgs, Sweeper};
use molecule_jobs::{
    JobContext, JobError, JobKind, JobStatus, NewJob, PoolSpec, RetryPolicy, Runtime, RuntimeConfig, enqueue, typed_handler,
};
use molecule_tests::{eventually, fresh_db};
use serde_json::json;
use sqlx::PgPool;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// What our handler saw of one attempt.
#[derive(Clone, Debug)]
struct Seen {
    id: String,
    attempt: i32,
    max_attempts: i32,
    args: SweepArgs,
    payload: Vec<u8>,
}

/// The columns apalis-postgres 1.0 reads with `SELECT *` into its rows: its compiled
/// queries (`query_file_as!`) take them by position, so ours must come after these.
const APALIS_JOB_COLUMNS: [&str; 14] = [
    "job",
    "id",
    "job_type",
    "status",
    "attempts",
    "max_attempts",
    "run_at",
    "last_result",
    "lock_at",
    "lock_by",
    "done_at",
    "priority",
    "idempotency_key",
    "metadata",
];
const APALIS_WORKER_COLUMNS: [&str; 6] = ["id", "worker_type", "storage_name", "layers", "last_seen", "started_at"];

async fn columns(db: &PgPool, table: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns \
         WHERE table_schema = 'apalis' AND table_name = $1 ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(db)
    .await
    .unwrap()
}

async fn push(db: &PgPool, job: NewJob) -> JobId {
    let mut conn = db.acquire().await.unwrap();
    enqueue(&mut conn, &job).await.unwrap()
}

async fn wait_status(db: &PgPool, id: &str, want: JobStatus) -> JobView {
    let id = JobId::from_db(id.to_string());
    eventually(Duration::from_secs(20), &format!("job {id} to be {want:?}"), || async {
        status::get(db, &id).await.unwrap().filter(|v| v.status == want)
    })
    .await
}

fn filter(status: Status) -> Filter {
    Filter { status: Some(status), page: 1, page_size: Some(100) }
}

fn ids(tasks: &[PgTask]) -> BTreeSet<String> {
    tasks.iter().map(|t| t.task_id().expect("apalis reads an id").to_string()).collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

/// apalis' numeric statistics by title (list_queues gives text, metrics reals; timestamps
/// are left out: list_queues renders them as dates).
fn stats(stats: &[Statistic]) -> BTreeMap<String, f64> {
    stats
        .iter()
        .filter(|s| s.stat_type != StatType::Timestamp)
        .map(|s| (s.title.clone(), s.value.parse::<f64>().unwrap_or_else(|_| panic!("{}: {:?}", s.title, s.value))))
        .collect()
}

fn stat(stats: &BTreeMap<String, f64>, title: &str) -> f64 {
    *stats.get(title).unwrap_or_else(|| panic!("apalis reports no {title}: {stats:?}"))
}

fn queue<'a>(queues: &'a [QueueInfo], name: &str) -> &'a QueueInfo {
    queues.iter().find(|q| q.name == name).unwrap_or_else(|| panic!("apalis lists no queue {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apalis_pushes_run_in_our_pool_and_apalis_reads_our_rows() {
    let (db, _) = fresh_db().await;

    // apalis' compiled `SELECT *` queries read columns by position: our columns must all
    // come after its own (a later apalis migration adding a column would break this).
    assert_eq!(columns(&db, "jobs").await[..APALIS_JOB_COLUMNS.len()], APALIS_JOB_COLUMNS.map(String::from));
    assert_eq!(columns(&db, "workers").await, APALIS_WORKER_COLUMNS.map(String::from));

    // Our pool of the `sweep` kind, with a test handler that reads the product's payload
    // type and does what the sweeper named in it says.
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let (hold_tx, hold_rx) = watch::channel(false);
    let handler = typed_handler({
        let seen = seen.clone();
        move |ctx: JobContext, args: SweepArgs| {
            let seen = seen.clone();
            let mut hold = hold_rx.clone();
            async move {
                seen.lock().unwrap().push(Seen {
                    id: ctx.id.as_str().to_string(),
                    attempt: ctx.attempt,
                    max_attempts: ctx.max_attempts,
                    args: args.clone(),
                    payload: ctx.payload.to_vec(),
                });
                match args.sweeper {
                    Sweeper::Orphans => Err(JobError::permanent("test", "fails for good")),
                    Sweeper::StaleTokens => Err(JobError::retryable("test", "fails, retried later")),
                    Sweeper::Hibernation => {
                        let _ = hold.wait_for(|go| *go).await;
                        Ok(json!({"held": true}))
                    }
                    _ => Ok(json!({"sweeper": args.sweeper.name(), "heartbeat_stale_s": args.heartbeat_stale_s})),
                }
            }
        }
    });
    let mut spec = PoolSpec::for_kind(JobKind::Sweep, 4, handler);
    // A failed attempt waits an hour: the row stays Failed while apalis reads it.
    spec.retry = RetryPolicy { base: Duration::from_secs(3600), cap: Duration::from_secs(3600), max_attempts: 3 };
    let cfg = RuntimeConfig {
        poll_interval: Duration::from_millis(500),
        grace: Duration::from_secs(5),
        node: "interop".into(),
        ..Default::default()
    };
    let rt = Runtime::start(db.clone(), cfg, vec![spec]);

    let sweep_q = JobKind::Sweep.queue();
    let console_q = JobKind::Console.queue();
    let mut apalis_sweep = PostgresStorage::<SweepArgs>::new(&db).with_config(Config::default().queue(sweep_q));
    let apalis_console = PostgresStorage::<serde_json::Value>::new(&db).with_config(Config::default().queue(console_q));

    // apalis' ListWorkers shows our pool's worker row (our heartbeat writes apalis.workers).
    let worker = eventually(Duration::from_secs(10), "our sweep pool in apalis' worker list", || async {
        apalis_sweep.list_workers().await.unwrap().into_iter().next()
    })
    .await;
    assert!(worker.id.starts_with("sweep@interop#"), "{worker:?}");
    assert_eq!(worker.queue, sweep_q);
    assert_eq!(worker.backend, "molecule");
    assert_eq!(worker.layers, "concurrency=4");
    let now_s = Utc::now().timestamp() as u64;
    assert!(now_s.abs_diff(worker.last_heartbeat) <= 60, "last heartbeat {} vs now {now_s}", worker.last_heartbeat);
    assert!(worker.started_at > 0 && worker.started_at <= worker.last_heartbeat);

    // 1. Pushed with apalis' TaskSink (PostgresStorage::push_task), a ULID id of our own.
    let mut pushed = SweepArgs::new(Sweeper::Health);
    pushed.heartbeat_stale_s = Some(90);
    let pushed_id = ulid::Ulid::generate().to_string();
    apalis_sweep
        .push_task(
            TaskBuilder::new(pushed.clone())
                .task_id(TaskId::from_ulid(pushed_id.parse().unwrap()))
                .max_attempts(JobKind::Sweep.retry_policy().max_attempts as usize)
                .build(),
        )
        .await
        .unwrap();
    // 2. Pushed with apalis' `queries::push_tasks` inside the caller's transaction.
    let mut in_tx = SweepArgs::new(Sweeper::Retention);
    in_tx.retention_s = Some(3600);
    let in_tx_id = ulid::Ulid::generate().to_string();
    let mut tx = db.begin().await.unwrap();
    let task: PgTask = TaskBuilder::new(serde_json::to_vec(&in_tx).unwrap()).task_id(TaskId::from_ulid(in_tx_id.parse().unwrap())).build();
    apalis_postgres::queries::push_tasks(&mut *tx, sweep_q, vec![task]).await.unwrap();
    tx.commit().await.unwrap();

    // Rows in every state our core writes, enqueued and run by our core.
    let sweep = |s: Sweeper| NewJob::new(JobKind::Sweep, &SweepArgs::new(s));
    let succeeded = push(&db, sweep(Sweeper::A2aTtl)).await;
    // No backend here: the orphan sweep fails permanently (no_backend).
    let no_backend = push(&db, sweep(Sweeper::Orphans)).await;
    let retrying = push(&db, sweep(Sweeper::StaleTokens)).await;
    let running = push(&db, sweep(Sweeper::Hibernation)).await;
    let scheduled = push(&db, sweep(Sweeper::ProvisionTimeout).run_at(Utc::now() + chrono::Duration::hours(1))).await;
    let expired = push(&db, sweep(Sweeper::Retention).expires_at(Utc::now() - chrono::Duration::seconds(5))).await;
    // A queue no pool serves here: its job stays pending, due now.
    let waiting = push(&db, NewJob::new(JobKind::Console, &json!({"workspace_id": uuid::Uuid::nil()}))).await;

    // Our core's view of every row.
    let p = wait_status(&db, &pushed_id, JobStatus::Succeeded).await;
    let t = wait_status(&db, &in_tx_id, JobStatus::Succeeded).await;
    wait_status(&db, succeeded.as_str(), JobStatus::Succeeded).await;
    wait_status(&db, no_backend.as_str(), JobStatus::Failed).await;
    let r = wait_status(&db, retrying.as_str(), JobStatus::Retrying).await;
    wait_status(&db, running.as_str(), JobStatus::Running).await;
    wait_status(&db, scheduled.as_str(), JobStatus::Scheduled).await;
    wait_status(&db, expired.as_str(), JobStatus::Expired).await;
    wait_status(&db, waiting.as_str(), JobStatus::Pending).await;
    eventually(Duration::from_secs(10), "the held job's handler to start", || async {
        seen.lock().unwrap().iter().any(|s| s.id == running.as_str()).then_some(())
    })
    .await;

    // The apalis-pushed jobs ran in OUR pool: our handler decoded apalis' JSON payloads.
    {
        let seen = seen.lock().unwrap();
        let by_id = |id: &str| seen.iter().filter(|s| s.id == id).cloned().collect::<Vec<_>>();
        let runs = by_id(&pushed_id);
        assert_eq!(runs.len(), 1, "the TaskSink job ran once: {seen:?}");
        assert_eq!(runs[0].args, pushed);
        assert_eq!(runs[0].payload, serde_json::to_vec(&pushed).unwrap(), "apalis' JsonCodec bytes are ours");
        assert_eq!((runs[0].attempt, runs[0].max_attempts), (1, JobKind::Sweep.retry_policy().max_attempts));
        let runs = by_id(&in_tx_id);
        assert_eq!(runs.len(), 1, "the push_tasks job ran once: {seen:?}");
        assert_eq!(runs[0].args, in_tx);
        assert_eq!(runs[0].max_attempts, 25, "apalis' default max_attempts when the task sets none");
        assert!(by_id(expired.as_str()).is_empty() && by_id(scheduled.as_str()).is_empty());
        assert_eq!(seen.len(), 6, "one attempt each for the six due, unexpired jobs: {seen:?}");
    }
    assert_eq!((p.attempts, p.kind.as_str()), (1, sweep_q));
    assert_eq!(p.result, Some(json!({"sweeper": "health", "heartbeat_stale_s": 90})));
    assert_eq!(t.result, Some(json!({"sweeper": "retention", "heartbeat_stale_s": null})));

    // apalis' ListTasks over our queue: each state holds exactly the rows our core put there.
    let expect: [(Status, BTreeSet<String>); 6] = [
        (Status::Done, set(&[&pushed_id, &in_tx_id, succeeded.as_str()])),
        (Status::Failed, set(&[retrying.as_str()])),
        (Status::Killed, set(&[no_backend.as_str(), expired.as_str()])),
        (Status::Running, set(&[running.as_str()])),
        (Status::Pending, set(&[scheduled.as_str()])),
        (Status::Queued, set(&[])),
    ];
    let mut listed = BTreeMap::new();
    for (st, want) in &expect {
        let tasks = apalis_sweep.list_tasks(&filter(st.clone())).await.unwrap();
        assert_eq!(&ids(&tasks), want, "apalis' {st} tasks of {sweep_q}");
        for task in &tasks {
            assert_eq!(task.status(), *st);
            assert_eq!(task.queue().map(|q| q.to_string()).as_deref(), Some(sweep_q));
        }
        for task in tasks {
            listed.insert(task.task_id().unwrap().to_string(), task);
        }
    }
    // What apalis reads of single rows: payload, lock holder, attempts, times.
    let done = &listed[&pushed_id];
    assert_eq!(serde_json::from_slice::<SweepArgs>(&done.args).unwrap(), pushed);
    assert_eq!(done.lock_by(), Some(worker.id.as_str()), "the job was run by our pool's worker");
    assert_eq!(done.attempt(), 1);
    assert_eq!(done.max_attempts(), Some(JobKind::Sweep.retry_policy().max_attempts as usize));
    assert!(done.done_at().is_some());
    let held = &listed[running.as_str()];
    assert_eq!(held.lock_by(), Some(worker.id.as_str()));
    assert!(held.lock_at().is_some() && held.done_at().is_none());
    let failed = &listed[retrying.as_str()];
    assert_eq!((failed.attempt(), failed.lock_by(), failed.done_at()), (1, None, None));
    let retry_at = failed.run_at().unwrap();
    assert!(retry_at >= now_s + 3000, "apalis reads our persisted backoff: run_at {retry_at}, now {now_s}");
    assert_eq!((r.attempts, retry_at), (1, r.run_at.timestamp() as u64), "apalis and our view agree on the retry");
    assert_eq!(serde_json::from_slice::<SweepArgs>(&listed[scheduled.as_str()].args).unwrap().sweeper, Sweeper::ProvisionTimeout);

    // apalis' FetchById reads our rows too, and knows nothing of an id we never wrote.
    let mut by_id = apalis_sweep.clone();
    let fetched = by_id.fetch_by_id(&TaskId::from_ulid(no_backend.as_str().parse().unwrap())).await.unwrap().unwrap();
    assert_eq!(fetched.status(), Status::Killed);
    assert_eq!(fetched.lock_by(), Some(worker.id.as_str()));
    assert!(by_id.fetch_by_id(&TaskId::from_ulid(ulid::Ulid::generate())).await.unwrap().is_none());

    // apalis' ListAllTasks across queues.
    let pending = apalis_sweep.list_all_tasks(&filter(Status::Pending)).await.unwrap();
    assert_eq!(ids(&pending), set(&[scheduled.as_str(), waiting.as_str()]));
    let killed = apalis_console.list_all_tasks(&filter(Status::Killed)).await.unwrap();
    assert_eq!(ids(&killed), set(&[no_backend.as_str(), expired.as_str()]));
    assert!(apalis_console.list_tasks(&filter(Status::Done)).await.unwrap().is_empty());

    // apalis' ListQueues: both of our queues, with their counts and our worker.
    let queues = apalis_sweep.list_queues().await.unwrap();
    let names: BTreeSet<&str> = queues.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(names, BTreeSet::from([sweep_q, console_q]));
    let sq = queue(&queues, sweep_q);
    let s = stats(&sq.stats);
    for (title, want) in
        [("RUNNING_JOBS", 1.0), ("PENDING_JOBS", 1.0), ("FAILED_JOBS", 1.0), ("DONE_JOBS", 3.0), ("KILLED_JOBS", 2.0), ("TOTAL_JOBS", 8.0)]
    {
        assert_eq!(stat(&s, title), want, "list_queues {sweep_q} {title}");
    }
    assert_eq!(sq.workers, vec![worker.id.clone()], "the queue's lock holders are our worker");
    assert_eq!(sq.activity.iter().sum::<usize>(), 8, "7-day activity: every job of the queue, by run_at day");
    let cq = queue(&queues, console_q);
    assert_eq!(stat(&stats(&cq.stats), "PENDING_JOBS"), 1.0);
    assert_eq!(stat(&stats(&cq.stats), "TOTAL_JOBS"), 1.0);
    assert!(cq.workers.is_empty());

    // apalis' Metrics, per queue and global.
    let m = stats(&apalis_sweep.fetch_by_queue().await.unwrap());
    for (title, want) in [
        ("RUNNING_JOBS", 1.0),
        ("PENDING_JOBS", 1.0),
        ("FAILED_JOBS", 1.0),
        ("ACTIVE_JOBS", 2.0),
        ("DONE_JOBS", 3.0),
        ("KILLED_JOBS", 2.0),
        ("COMPLETED_JOBS", 6.0),
        ("TOTAL_JOBS", 8.0),
        ("QUEUE_BACKLOG", 0.0),
    ] {
        assert_eq!(stat(&m, title), want, "metrics {sweep_q} {title}");
    }
    let g = stats(&apalis_sweep.global().await.unwrap());
    for (title, want) in [("TOTAL_JOBS", 9.0), ("PENDING_JOBS", 2.0), ("QUEUE_BACKLOG", 1.0), ("DONE_JOBS", 3.0), ("KILLED_JOBS", 2.0)] {
        assert_eq!(stat(&g, title), want, "global metrics {title}");
    }
    let all_workers = apalis_console.list_all_workers().await.unwrap();
    assert_eq!(all_workers.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(), vec![worker.id.as_str()]);
    assert!(apalis_console.list_workers().await.unwrap().is_empty(), "no pool serves {console_q} here");

    // The held job finishes: apalis sees it move from Running to Done.
    hold_tx.send_replace(true);
    wait_status(&db, running.as_str(), JobStatus::Succeeded).await;
    assert!(apalis_sweep.list_tasks(&filter(Status::Running)).await.unwrap().is_empty());
    assert!(ids(&apalis_sweep.list_tasks(&filter(Status::Done)).await.unwrap()).contains(running.as_str()));

    // A clean shutdown removes our worker row: apalis' worker lists are empty again.
    let report = rt.shutdown().await;
    assert_eq!((report.released, report.interrupted, report.stale_acks), (0, 0, 0));
    assert!(apalis_sweep.list_workers().await.unwrap().is_empty());
    assert!(apalis_sweep.list_all_workers().await.unwrap().is_empty());
}
