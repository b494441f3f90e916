//! A worker cut off from PostgreSQL by a partition (packets dropped, no reset: statements
//! hang instead of failing) must stop the jobs it runs before its lease runs out, whatever
//! its fetchers are awaiting: once the lease is gone, another process's rescuer hands the
//! jobs back and they run elsewhere (README, "The job core": leases).

use molecule_jobs::{JobContext, JobError, NewJob, PoolSpec, RetryPolicy, Runtime, RuntimeConfig, enqueue, handler_fn};
use molecule_tests::fresh_db;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP forwarder in front of PostgreSQL that can stop passing bytes on without closing
/// any socket: what a partition looks like to both ends.
struct Partition {
    url: String,
    open: watch::Sender<bool>,
}

impl Partition {
    async fn in_front_of(url: &str) -> Partition {
        let mut u = url::Url::parse(url).expect("a database URL");
        let upstream = format!("{}:{}", u.host_str().expect("a TCP host"), u.port().unwrap_or(5432));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        u.set_host(Some("127.0.0.1")).unwrap();
        u.set_port(Some(port)).unwrap();
        let (open, rx) = watch::channel(true);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, mut rx) = (upstream.clone(), rx.clone());
                tokio::spawn(async move {
                    // A connection opened during the partition waits for its end.
                    if rx.wait_for(|o| *o).await.is_err() {
                        return;
                    }
                    let Ok(server) = TcpStream::connect(&upstream).await else { return };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(pump(cr, sw, rx.clone()));
                    tokio::spawn(pump(sr, cw, rx));
                });
            }
        });
        Partition { url: u.to_string(), open }
    }

    fn cut(&self) {
        self.open.send_replace(false);
    }

    fn heal(&self) {
        self.open.send_replace(true);
    }
}

/// Copies bytes on while `open`; holds them (the sockets stay open) while not.
async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, mut open: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if open.wait_for(|o| *o).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Records when the attempt stopped, however it stopped (it returned, or was aborted).
struct StoppedAt(watch::Sender<Option<Instant>>);

impl Drop for StoppedAt {
    fn drop(&mut self) {
        self.0.send_replace(Some(Instant::now()));
    }
}

/// The partition comes while the job runs and the pool's fetchers are idle: their next
/// claim (or next-due read) hangs. The heartbeat cannot be written either; at half a lease
/// the process knows its lease is going, and the running attempt must be stopped then —
/// within the lease, before anybody else may take the job — not when a hung claim returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_worker_stops_its_running_job_within_the_lease() {
    let (direct, url) = fresh_db().await;
    let partition = Partition::in_front_of(&url).await;
    let db = molecule_domain::db::connect(&partition.url, 10).await.expect("connect through the forwarder");

    let (started_tx, mut started) = watch::channel(false);
    let (stopped_tx, mut stopped) = watch::channel(None::<Instant>);
    let (started_tx, stopped_tx) = (Arc::new(started_tx), Arc::new(stopped_tx));
    let handler = handler_fn(move |ctx: JobContext| {
        let (started_tx, stopped_tx) = (started_tx.clone(), stopped_tx.clone());
        async move {
            let _stopped = StoppedAt((*stopped_tx).clone());
            started_tx.send_replace(true);
            ctx.interrupt.wait().await;
            Err(JobError::Interrupted)
        }
    });
    let lease = Duration::from_secs(3);
    let cfg = RuntimeConfig {
        lease,
        heartbeat: Duration::from_millis(500),
        poll_interval: Duration::from_millis(100),
        grace: Duration::from_secs(1),
        interrupt_wait: Duration::from_millis(500),
        node: "lease-loss".into(),
        ..Default::default()
    };
    let policy = RetryPolicy { base: Duration::from_millis(100), cap: Duration::from_secs(1), max_attempts: 5 };
    // Four slots: with the job running, both fetchers keep claiming (and find nothing).
    let rt = Runtime::start(db.clone(), cfg, vec![PoolSpec::new("partition", 4, policy, handler)]);

    let mut conn = direct.acquire().await.unwrap();
    let id = enqueue(&mut conn, &NewJob::to_queue("partition", &serde_json::json!({})).max_attempts(5)).await.unwrap();
    drop(conn);
    tokio::time::timeout(Duration::from_secs(15), started.wait_for(|s| *s)).await.expect("the job started").unwrap();
    // Let the fetchers go back to claiming (a poll interval or two) before the cut.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let cut_at = Instant::now();
    partition.cut();
    let within = tokio::time::timeout(lease, stopped.wait_for(|s| s.is_some())).await;
    partition.heal();
    let stopped_at = match within {
        Ok(r) => r.unwrap().expect("set"),
        Err(_) => panic!("the running attempt still ran one lease ({lease:?}) into the partition"),
    };
    assert!(stopped_at >= cut_at);

    // Healed: the attempt went back to the queue, not lost; the runtime shuts down cleanly.
    let report = tokio::time::timeout(Duration::from_secs(30), rt.shutdown()).await.expect("the runtime shut down");
    let (status, lock_by): (String, Option<String>) =
        sqlx::query_as("SELECT status, lock_by FROM apalis.jobs WHERE id = $1").bind(id.as_str()).fetch_one(&direct).await.unwrap();
    assert!(lock_by.is_none() && status != "Done" && status != "Killed", "job {status} under {lock_by:?}; report {report:?}");
}
