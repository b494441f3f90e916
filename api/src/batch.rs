//! Group commit for the enqueuing routes (issue 15): requests that arrive while earlier
//! ones are being written share one transaction and one set of statements.
//!
//! A request's own transaction costs PostgreSQL far more than its rows: on this machine a
//! job row committed alone is ≈ 0.4 of a raw single-row INSERT's rate, while 32 of them
//! in one transaction, two statements, go ten times as fast (pgbench, same cluster). So
//! each route hands its validated request to a [`Batcher`]: a few lanes, each taking
//! whatever is waiting (up to a limit), running it as one batch and answering every caller.
//! Natural batching adds no wait: an idle lane takes a lone request at once; batches form
//! only while every lane is busy, which is exactly when the round trips they save matter.
//! A batch the database refused (an error it answered: the transaction rolled back) is run
//! again one request at a time, so a request a constraint refuses fails alone and the
//! others keep their answers. Any other failure — the connection lost, perhaps during the
//! commit, the database unreachable — is every caller's answer, never a second try: the
//! batch may have committed, and its exec must not run twice.

use futures_util::future::BoxFuture;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::error::{ApiError, ApiResult};

/// Batches running at once per route: one per two cores (at least one). A lane's batch
/// keeps one PostgreSQL backend busy while the server needs about as much CPU again for
/// the HTTP, JSON and auth of the requests in it. On this two-core machine one lane beat
/// two and three (`bench/e2e`, `api` alone, three builds alternating, two rounds: creates
/// 11 199 / 10 917 a second with one lane, 9 651 / 9 273 with two, 7 808 / 7 776 with
/// three; execs 14 847 / 13 688, 13 961 / 13 035, 10 247 / 9 266; p99 lowest with one):
/// concurrent batches split into smaller ones, each paying its statements and its commit,
/// and contend for the rows they share (the organization every create's foreign key
/// locks). More cores than two are not measured; the rule is a guess for them, capped at
/// three (the count used before) so the lanes of the three batchers never hold more than
/// nine of the pool's connections. With one lane, a batch that waits holds up its whole
/// route: [`LOCK_WAIT`] bounds that wait.
pub fn lanes() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get() / 2).clamp(1, 3)
}
/// The most requests one batch takes.
pub const MAX: usize = 64;

/// The longest a batch waits for a lock by default (a parent workspace's row a delete
/// holds, a table a migration locks): every request of its route waits behind it (one
/// lane here). The locks these batches meet are held for a few statements; a batch that
/// waits longer gives up, and its callers get 503 `busy`, theirs to retry. (The exec
/// batch's activity mark does not wait for its row at all: domain::activity.)
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A batch's transaction, its lock waits bounded by `lock_wait`.
pub async fn begin(db: &sqlx::PgPool, lock_wait: std::time::Duration) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let mut tx = db.begin().await?;
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(format!("{}ms", lock_wait.as_millis().max(1)))
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

type Item<T, R> = (T, oneshot::Sender<R>);

/// Hands requests of type `T` to lanes running them in batches; each caller gets its `R`.
pub struct Batcher<T, R> {
    tx: mpsc::Sender<Item<T, R>>,
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Batcher { tx: self.tx.clone() }
    }
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// `lanes` batches run at once (each holds one connection while it runs), each of at
    /// most `max` requests. `run` answers a batch in order: one `R` per request. The lanes
    /// stop once every clone of the batcher is dropped.
    pub fn start<F, Fut>(lanes: usize, max: usize, run: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        // Room for four full batches a lane; beyond that, callers wait to be queued (the
        // server's connection cap bounds them anyway).
        let (tx, rx) = mpsc::channel(lanes.max(1) * max.max(1) * 4);
        let rx = Arc::new(Mutex::new(rx));
        let run = Arc::new(run);
        for _ in 0..lanes.max(1) {
            tokio::spawn(lane(rx.clone(), run.clone(), max.max(1)));
        }
        Batcher { tx }
    }

    /// Requests queued for the next batch a lane takes.
    pub fn waiting(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Runs `item` in the next batch a lane takes. None: its batch ended without an answer
    /// for it (it panicked; logged), or the lanes are gone.
    pub async fn submit(&self, item: T) -> Option<R> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((item, reply)).await.ok()?;
        answer.await.ok()
    }
}

async fn lane<T, R, F, Fut>(rx: Arc<Mutex<mpsc::Receiver<Item<T, R>>>>, run: Arc<F>, max: usize)
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<T>) -> Fut,
    Fut: Future<Output = Vec<R>> + Send + 'static,
{
    loop {
        let (items, replies): (Vec<T>, Vec<oneshot::Sender<R>>) = {
            // One lane at a time takes what is waiting; the others wait for the lock, not
            // for a batch to finish.
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else { return };
            let mut taken = vec![first];
            while taken.len() < max {
                match rx.try_recv() {
                    Ok(next) => taken.push(next),
                    Err(_) => break,
                }
            }
            taken.into_iter().unzip()
        };
        // A task of its own, so a panic ends this batch (its callers get None) and not the lane.
        let answers = match tokio::spawn(run(items)).await {
            Ok(answers) => answers,
            Err(e) => {
                tracing::error!(error = %e, "a batch ended without answers");
                continue;
            }
        };
        debug_assert_eq!(answers.len(), replies.len(), "one answer per request");
        // A caller that went away dropped its receiver: its send fails, nothing else does.
        for (reply, out) in replies.into_iter().zip(answers) {
            let _ = reply.send(out);
        }
    }
}

/// Runs `reqs` together. Refused by the database (and more than one), each runs alone; any
/// other failure is every caller's answer (see the module's doc: it may have committed).
pub async fn each_alone_if_refused<T, R>(
    reqs: Vec<T>,
    run: impl for<'a> Fn(&'a [T]) -> BoxFuture<'a, Result<Vec<ApiResult<R>>, sqlx::Error>>,
) -> Vec<ApiResult<R>> {
    let e = match run(&reqs).await {
        Ok(out) => return out,
        Err(e) if reqs.len() > 1 && refused(&e) => e,
        Err(e) => return every_caller(&reqs, e),
    };
    tracing::debug!(error = %e, requests = reqs.len(), "a batch was refused; running its requests one by one");
    let mut out = Vec::with_capacity(reqs.len());
    let mut busy = false;
    for one in reqs.chunks(1) {
        // Once one of them gave up on a lock, the rest would likely wait as long, one after
        // another, the lane held all along: they get the same answer.
        if busy {
            out.push(Err(ApiError::Busy));
            continue;
        }
        out.push(match run(one).await {
            Ok(mut answer) => answer.pop().unwrap_or(Err(ApiError::Internal)),
            Err(e) => Err(ApiError::from(e)),
        });
        busy = matches!(out.last(), Some(Err(ApiError::Busy)));
    }
    out
}

/// The database answered with an error, so the transaction rolled back: safe to run again.
/// (An outage's errors are answers too, but running again would only wait again; so would
/// a lock wait given up, once for every request that needs the row.)
fn refused(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if !molecule_domain::db::is_outage(db.as_ref()) && !molecule_domain::db::gave_up_on_lock(db.as_ref()))
}

/// One error for every request of a batch (logged once).
pub fn every_caller<T, R>(reqs: &[T], e: sqlx::Error) -> Vec<ApiResult<R>> {
    let e = ApiError::from(e);
    reqs.iter().map(|_| Err(e.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::{Notify, Semaphore};

    #[tokio::test]
    async fn every_caller_gets_its_own_answer_and_waiting_requests_share_a_batch() {
        let batches = Arc::new(std::sync::Mutex::new(Vec::<usize>::new()));
        let started = Arc::new(Notify::new());
        let gate = Arc::new(Semaphore::new(0));
        let (seen, began, held) = (batches.clone(), started.clone(), gate.clone());
        // One lane, held in its first batch until the other requests wait in the channel.
        let b = Batcher::start(1, 64, move |items: Vec<u32>| {
            let (seen, began, held) = (seen.clone(), began.clone(), held.clone());
            async move {
                if items == [0] {
                    began.notify_one();
                    let _ = held.acquire().await.map(|p| p.forget());
                }
                seen.lock().unwrap().push(items.len());
                items.into_iter().map(|i| i * 10).collect::<Vec<u32>>()
            }
        });
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.submit(0).await }
        });
        started.notified().await;
        let rest: Vec<_> = (1..=5u32)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { b.submit(i).await })
            })
            .collect();
        while b.waiting() < 5 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(1);
        assert_eq!(first.await.unwrap(), Some(0));
        for (i, r) in (1..=5u32).zip(rest) {
            assert_eq!(r.await.unwrap(), Some(i * 10), "request {i} got its own answer");
        }
        assert_eq!(*batches.lock().unwrap(), vec![1, 5], "the five waiting requests ran as one batch");
    }

    /// With more than one lane (machines of four cores or more: [`lanes`]), batches run at
    /// once, and what waits meanwhile goes to whichever lane is free first, whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_lanes_run_two_batches_at_once_and_the_waiting_requests_go_to_one() {
        // A regression fails here instead of hanging.
        tokio::time::timeout(std::time::Duration::from_secs(20), two_lanes()).await.expect("finished in time");
    }

    async fn two_lanes() {
        let batches = Arc::new(std::sync::Mutex::new(Vec::<usize>::new()));
        let running = Arc::new(Semaphore::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let (seen, began, held) = (batches.clone(), running.clone(), gate.clone());
        let b = Batcher::start(2, 64, move |items: Vec<u32>| {
            let (seen, began, held) = (seen.clone(), began.clone(), held.clone());
            async move {
                if items == [0] || items == [100] {
                    began.add_permits(1);
                    let _ = held.acquire().await.map(|p| p.forget());
                }
                seen.lock().unwrap().push(items.len());
                items.into_iter().map(|i| i + 1).collect::<Vec<u32>>()
            }
        });
        let submit = |i: u32| {
            let b = b.clone();
            tokio::spawn(async move { b.submit(i).await })
        };
        let first = submit(0);
        // Both lanes inside a batch at the same time: the second lone request did not wait
        // for the first batch to end.
        let _ = running.acquire().await.map(|p| p.forget());
        let second = submit(100);
        // Hangs (the timeout above fails it) with one lane: checked.
        let _ = running.acquire().await.map(|p| p.forget());
        let rest: Vec<_> = (1..=5u32).map(submit).collect();
        while b.waiting() < 5 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(2);
        assert_eq!(first.await.unwrap(), Some(1));
        assert_eq!(second.await.unwrap(), Some(101));
        for (i, r) in (1..=5u32).zip(rest) {
            assert_eq!(r.await.unwrap(), Some(i + 1), "request {i} got its own answer");
        }
        let mut sizes = batches.lock().unwrap().clone();
        sizes.sort();
        assert_eq!(sizes, vec![1, 1, 5], "two lone batches, then the five waiting as one");
    }

    /// A lost connection may have lost the answer to a commit that happened: the batch is
    /// not run again (an exec would run twice); every caller gets the error.
    #[tokio::test]
    async fn a_batch_that_may_have_committed_is_not_run_again() {
        let runs = std::sync::atomic::AtomicUsize::new(0);
        let out = each_alone_if_refused(vec![1, 2, 3], |_reqs: &[i32]| {
            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Err::<Vec<ApiResult<()>>, _>(sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into())) })
        })
        .await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1, "run once, never one by one");
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|r| matches!(r, Err(ApiError::Unavailable))), "every caller: 503");
    }

    /// A database error with a SQLSTATE of our choosing.
    #[derive(Debug)]
    struct Coded(&'static str);

    impl std::fmt::Display for Coded {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "error {}", self.0)
        }
    }

    impl std::error::Error for Coded {}

    impl sqlx::error::DatabaseError for Coded {
        fn message(&self) -> &str {
            "coded"
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn coded(code: &'static str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(Coded(code)))
    }

    /// A batch that gave up waiting for a lock is not run again one by one (each would wait
    /// as long again, the lane held all along): every caller gets 503 `busy` at once.
    #[tokio::test]
    async fn a_batch_that_gave_up_on_a_lock_is_not_run_again() {
        let runs = std::sync::atomic::AtomicUsize::new(0);
        let out = each_alone_if_refused(vec![1, 2, 3], |_reqs: &[i32]| {
            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Err::<Vec<ApiResult<()>>, _>(coded(molecule_domain::db::LOCK_NOT_AVAILABLE)) })
        })
        .await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1, "run once, never one by one");
        assert!(out.iter().all(|r| matches!(r, Err(ApiError::Busy))), "every caller: busy");
    }

    /// Refused for another reason, the batch runs one by one; once one of those gives up on
    /// a lock, the rest get `busy` without running (the lane is not held for each in turn).
    #[tokio::test]
    async fn one_by_one_stops_at_the_first_that_gave_up_on_a_lock() {
        let ran = std::sync::Mutex::new(Vec::new());
        let out = each_alone_if_refused(vec![1, 2, 3, 4], |reqs: &[i32]| {
            ran.lock().unwrap().push(reqs.to_vec());
            let r = reqs.to_vec();
            Box::pin(async move {
                match r.as_slice() {
                    [_, _, ..] => Err(coded("23505")), // the batch: refused by a constraint
                    [2] => Err(coded(molecule_domain::db::LOCK_NOT_AVAILABLE)),
                    _ => Ok(vec![Ok(())]),
                }
            })
        })
        .await;
        assert_eq!(*ran.lock().unwrap(), vec![vec![1, 2, 3, 4], vec![1], vec![2]], "3 and 4 never ran");
        assert!(matches!(out[0], Ok(())));
        assert!(out[1..].iter().all(|r| matches!(r, Err(ApiError::Busy))), "2 gave up; 3 and 4 get the same");
    }

    #[tokio::test]
    async fn a_caller_left_without_an_answer_gets_none_and_the_lane_lives_on() {
        let b: Batcher<u32, u32> = Batcher::start(1, 8, |items: Vec<u32>| async move {
            if items.contains(&0) {
                panic!("a batch that panics");
            }
            items
        });
        assert_eq!(b.submit(0).await, None, "its callers get None, not a hang");
        assert_eq!(b.submit(7).await, Some(7), "and the one lane still runs the next batch");
    }
}
