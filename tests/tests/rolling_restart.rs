//! Issue 9: rolling restarts of worker processes with real processes, PostgreSQL and the
//! Docker engine. Two `molecule worker` processes serve exec; the one running a command
//! gets SIGTERM. The command's side effect is counted inside the container: it must run
//! exactly once, whatever the grace and the lease.

use molecule_domain::tokens;
use molecule_tests::{Proc, bin_path, eventually, fresh_db, http, start_api, strict_auth};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::process::Command;
use std::time::Duration;

struct Cluster {
    db: PgPool,
    addr: String,
    token: String,
    workers: Vec<Proc>,
}

impl Cluster {
    /// The API in this process; two worker processes with the given grace and lease.
    async fn start(grace_s: u64, lease_s: u64) -> Cluster {
        let (db, url) = fresh_db().await;
        let addr = start_api(db.clone(), strict_auth()).await;
        let mut c = db.acquire().await.unwrap();
        let (_, token) = tokens::create_org(&mut c, "rolling").await.unwrap();
        drop(c);
        let workers = (0..2)
            .map(|i| {
                let mut cmd = Command::new(bin_path("molecule"));
                cmd.args(["worker", "--pool", "provision=2", "--pool", "exec=4", "--pool", "stop=2"])
                    .env("DATABASE_URL", &url)
                    .env("PLATFORM_URL", format!("http://{addr}"))
                    .env("MOLECULE_BACKEND", "docker")
                    .env("MOLECULE_JOB_LEASE_SECS", lease_s.to_string())
                    .env("MOLECULE_SHUTDOWN_GRACE_SECS", grace_s.to_string())
                    .env("MOLECULE_POLL_INTERVAL_MS", "200")
                    .env("MOLECULE_LOG_FORMAT", "json");
                Proc::spawn(cmd, &format!("rolling-worker-{i}"))
            })
            .collect();
        Cluster { db, addr, token, workers }
    }

    async fn req(&self, method: &str, path: &str, body: Option<Value>) -> molecule_tests::Resp {
        http(&self.addr, method, path, Some(&self.token), body.map(|b| b.to_string()).as_deref(), None).await
    }

    async fn online_workspace(&self) -> String {
        let r = self.req("POST", "/workspaces", Some(json!({"name": "rolling", "runtime": "echo", "tier": 3}))).await;
        assert_eq!(r.status, 202, "{}", r.body);
        let ws = r.json()["workspace"]["id"].as_str().unwrap().to_string();
        eventually(Duration::from_secs(60), "the workspace to come online", || async {
            (self.req("GET", &format!("/workspaces/{ws}"), None).await.json()["status"] == "online").then_some(())
        })
        .await;
        ws
    }

    async fn exec(&self, ws: &str, script: &str, timeout_s: u64) -> String {
        let r =
            self.req("POST", &format!("/workspaces/{ws}/exec"), Some(json!({"argv": ["sh", "-c", script], "timeout_s": timeout_s}))).await;
        assert_eq!(r.status, 202, "{}", r.body);
        r.json()["job_id"].as_str().unwrap().to_string()
    }

    async fn job(&self, id: &str) -> Value {
        self.req("GET", &format!("/jobs/{id}"), None).await.json()
    }

    /// The worker process running `job` (its pid is in its worker id `exec@host:PID#…`).
    async fn holder(&mut self, job: &str) -> usize {
        let lock: Option<String> =
            sqlx::query_scalar("SELECT lock_by FROM apalis.jobs WHERE id = $1").bind(job).fetch_one(&self.db).await.unwrap();
        let lock = lock.expect("the job is held by a worker");
        let pid: i32 = lock.split(':').nth(1).and_then(|p| p.split('#').next()).and_then(|p| p.parse().ok()).expect("pid in the worker id");
        self.workers.iter().position(|w| w.pid() == pid).expect("one of our workers holds it")
    }

    /// Deletes the workspace through the remaining worker and waits for its container to go.
    async fn cleanup(&self, ws: &str) {
        let r = self.req("DELETE", &format!("/workspaces/{ws}"), None).await;
        for j in r.json()["job_ids"].as_array().cloned().unwrap_or_default() {
            let id = j.as_str().unwrap().to_string();
            eventually(Duration::from_secs(60), "the stop job", || async { (self.job(&id).await["status"] == "succeeded").then_some(()) })
                .await;
        }
    }
}

fn in_container(ws: &str, script: &str) -> String {
    let name = format!("ws-{}", &ws.replace('-', "")[..12]);
    let out = Command::new("docker").args(["exec", &name, "sh", "-c", script]).output().expect("docker CLI");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn runs(ws: &str, marker: &str) -> usize {
    in_container(ws, &format!("cat /tmp/{marker} 2>/dev/null")).lines().filter(|l| *l == "run").count()
}

/// Grace (40 s) longer than the command (15 s), lease (6 s) much shorter than both: the
/// draining process keeps heartbeating, so nobody else runs the job, and its ack lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_long_grace_lets_the_exec_finish_once_and_succeed() {
    let mut c = Cluster::start(40, 6).await;
    let ws = c.online_workspace().await;
    let job = c.exec(&ws, "echo run >> /tmp/long; sleep 15; echo done", 60).await;
    eventually(Duration::from_secs(30), "the command to start", || async { (runs(&ws, "long") == 1).then_some(()) }).await;
    let i = c.holder(&job).await;
    c.workers[i].signal(libc::SIGTERM);
    let st = c.workers[i].wait_exit(Duration::from_secs(60)).expect("the draining worker exits");
    assert_eq!(st.code(), Some(0), "{st:?}");
    let j = c.job(&job).await;
    assert_eq!(j["status"], "succeeded", "{j}");
    assert_eq!(j["attempts"], 1, "{j}");
    assert_eq!(j["result"]["stdout"], "done\n");
    assert_eq!(runs(&ws, "long"), 1, "the command ran exactly once");
    let audit: Vec<(String, Option<i32>)> =
        sqlx::query_as("SELECT outcome, exit_code FROM audit_events WHERE job_id = $1").bind(&job).fetch_all(&c.db).await.unwrap();
    assert_eq!(audit, vec![("exited".to_string(), Some(0))]);
    c.cleanup(&ws).await;
}

/// Grace (3 s) shorter than the command (60 s): the command is killed, the job ends
/// `interrupted` and is never run again; its one audit row says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_grace_interrupts_the_exec_and_never_runs_it_again() {
    let mut c = Cluster::start(3, 6).await;
    let ws = c.online_workspace().await;
    let job = c.exec(&ws, "echo run >> /tmp/short; sleep 60", 120).await;
    eventually(Duration::from_secs(30), "the command to start", || async { (runs(&ws, "short") == 1).then_some(()) }).await;
    let i = c.holder(&job).await;
    c.workers[i].signal(libc::SIGTERM);
    let st = c.workers[i].wait_exit(Duration::from_secs(30)).expect("the worker exits after grace + interrupt");
    assert_eq!(st.code(), Some(0), "{st:?}");
    let j = c.job(&job).await;
    assert_eq!(j["status"], "interrupted", "{j}");
    assert!(j["last_error"].as_str().unwrap().starts_with("interrupted"), "{j}");
    // Terminal: the other worker (alive all along) can never claim it again.
    let other = 1 - i;
    assert!(c.workers[other].child.try_wait().unwrap().is_none(), "the other worker is still serving");
    assert_eq!(runs(&ws, "short"), 1, "the command ran exactly once");
    assert!(!in_container(&ws, "ps").contains("sleep 60"), "the interrupted command was killed");
    let audit: Vec<(String, Option<i32>)> =
        sqlx::query_as("SELECT outcome, exit_code FROM audit_events WHERE job_id = $1").bind(&job).fetch_all(&c.db).await.unwrap();
    assert_eq!(audit, vec![("interrupted".to_string(), None)], "one audit row, completed as interrupted");
    c.cleanup(&ws).await;
}
