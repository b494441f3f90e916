//! Issue 14, part 3: the operator CLI (`molecule queues`, `molecule jobs …`,
//! `molecule workspaces …`) end to end, as an operator runs it: a real `serve` process on
//! the local Docker engine, the CLI as a separate process with its output captured (not a
//! terminal: one progress line per change), every result checked through the API too.

use molecule_tests::{Proc, bin_path, eventually, free_port, fresh_db, http, http_get};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::Duration;

const ADMIN: &str = "operator-cli-admin-token";

/// Seconds a `hermes` workspace may stay provisioning before S1 fails it. Its image lives
/// in a registry where nothing listens, so its provision attempts fail (and retry) until then.
const HERMES_TIMEOUT_S: u64 = 10;

struct Server {
    proc: Proc,
    addr: String,
    url: String,
    /// An organization token, made by `molecule org create --json`.
    token: String,
}

/// What one CLI run left: its exit code and both streams.
#[derive(Debug)]
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {self:?}"))
    }
}

impl Server {
    async fn start(name: &str) -> Server {
        let (_db, db_url) = fresh_db().await;
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(bin_path("molecule"));
        cmd.arg("serve")
            .env("DATABASE_URL", &db_url)
            .env("LISTEN_ADDR", &addr)
            .env("ADMIN_TOKEN", ADMIN)
            .env("MOLECULE_LOG_FORMAT", "json")
            // Other tests' containers share the engine (tests/run.sh exports it too).
            .env("MOLECULE_SWEEP_ORPHANS", "off")
            // Runtime images other than `echo` (a local image) come from a registry where
            // nothing listens: their pulls fail at once.
            .env("MOLECULE_IMAGE_REGISTRY", "127.0.0.1:9/none")
            // S1 every second, with a short timeout for `hermes` only.
            .env("MOLECULE_SWEEP_PROVISION_TIMEOUT", "* * * * * *")
            .env("MOLECULE_PROVISION_TIMEOUTS", format!("hermes={HERMES_TIMEOUT_S}"))
            .env_remove("MOLECULE_POOLS")
            .env_remove("MOLECULE_DEV")
            .env_remove("MOLECULE_BACKEND");
        let proc = Proc::spawn(cmd, name);
        eventually(Duration::from_secs(60), "serve to be ready", || async {
            matches!(http_get(&addr, "/readyz").await, Ok((200, _))).then_some(())
        })
        .await;
        let out = tokio::process::Command::new(bin_path("molecule"))
            .args(["org", "create", "operators", "--json"])
            .env("DATABASE_URL", &db_url)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "org create: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let token = v["token"].as_str().unwrap().to_string();
        Server { proc, url: format!("http://{addr}"), addr, token }
    }

    /// `molecule <args>` with MOLECULE_URL and MOLECULE_TOKEN (this org's) set, and
    /// `extra` environment on top (a value of None removes the variable).
    async fn cli_env(&self, args: &[&str], extra: &[(&str, Option<&str>)]) -> Out {
        let mut c = tokio::process::Command::new(bin_path("molecule"));
        c.args(args)
            .stdin(Stdio::null())
            .env_remove("ADMIN_TOKEN")
            .env_remove("DATABASE_URL")
            .env("MOLECULE_URL", &self.url)
            .env("MOLECULE_TOKEN", &self.token);
        for (k, v) in extra {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        let out = c.output().await.unwrap();
        let out = Out {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        eprintln!(
            "$ molecule {}\n  exit {:?}\n  stdout: {}\n  stderr: {}",
            args.join(" "),
            out.code,
            out.stdout.trim_end(),
            out.stderr.trim_end()
        );
        out
    }

    async fn cli(&self, args: &[&str]) -> Out {
        self.cli_env(args, &[]).await
    }

    /// GET through the API itself (not the CLI), with this org's token.
    async fn get(&self, path: &str) -> Value {
        let r = http(&self.addr, "GET", path, Some(&self.token), None, None).await;
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        r.json()
    }

    async fn stop(mut self) {
        self.proc.signal(libc::SIGTERM);
        assert_eq!(self.proc.wait_exit(Duration::from_secs(60)).and_then(|s| s.code()), Some(0), "serve exits 0 on SIGTERM");
    }
}

/// The progress lines `--wait` wrote (`[   1.2s] state`), in order.
fn progress(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix('[').and_then(|r| r.split_once("s] ")).map(|(_, state)| state.to_string()))
        .collect()
}

/// The workspace id in `workspace <uuid> (<name>) …`.
fn ws_id_in(text: &str) -> String {
    let at = text.find("workspace ").unwrap_or_else(|| panic!("no workspace id in {text:?}")) + "workspace ".len();
    let id = text[at..].split_whitespace().next().unwrap().to_string();
    uuid::Uuid::parse_str(&id).unwrap_or_else(|e| panic!("{id:?} is not a UUID ({e}) in {text:?}"));
    id
}

fn containers_of(ws: &str) -> String {
    let o = Command::new("docker").args(["ps", "-aq", "--filter", &format!("label=molecule.workspace.id={ws}")]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspaces_come_online_are_listed_and_deleted_through_the_cli() {
    let s = Server::start("operator-cli-serve").await;

    // create --wait, for a person: progress on stderr, the result on stdout, exit 0.
    let out = s.cli(&["workspaces", "create", "alpha", "--runtime", "echo", "--tier", "3", "--wait", "--timeout", "120"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let alpha = ws_id_in(&out.stdout);
    assert!(out.stdout.contains(&format!("workspace {alpha} (alpha) is online")), "{out:?}");
    let steps = progress(&out.stderr);
    let first_provisioning =
        steps.iter().position(|l| l.starts_with("provisioning: ")).unwrap_or_else(|| panic!("no provisioning line: {steps:?}"));
    let online = steps.iter().position(|l| l.starts_with("online after ")).unwrap_or_else(|| panic!("no final online line: {steps:?}"));
    assert!(first_provisioning < online && online == steps.len() - 1, "provisioning first, online last: {steps:?}");
    assert!(!out.stderr.contains('\r') && !out.stderr.contains('\u{1b}'), "no spinner off a terminal: {:?}", out.stderr);
    assert_eq!(s.get(&format!("/workspaces/{alpha}")).await["status"], "online", "the API agrees");
    assert!(!containers_of(&alpha).is_empty(), "its container runs");

    // create --wait --json: stdout is exactly the final workspace.
    let out = s.cli(&["workspaces", "create", "beta", "--runtime", "echo", "--wait", "--json"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let beta_ws = out.json();
    assert_eq!((beta_ws["name"].as_str(), beta_ws["status"].as_str(), beta_ws["tier"].as_i64()), (Some("beta"), Some("online"), Some(2)));
    let beta = beta_ws["id"].as_str().unwrap().to_string();

    // list: a table with both, and the API's page with --json.
    let out = s.cli(&["workspaces", "list"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("ID") && lines[0].contains("NAME") && lines[0].contains("STATUS"), "{lines:?}");
    let status_col = lines[0].find("STATUS").unwrap();
    for (id, name) in [(&alpha, "alpha"), (&beta, "beta")] {
        let row = lines.iter().find(|l| l.starts_with(id.as_str())).unwrap_or_else(|| panic!("{id} not listed: {lines:?}"));
        assert!(row.contains(name), "{row}");
        assert_eq!(&row[status_col..status_col + "online".len()], "online", "aligned STATUS column: {lines:?}");
    }
    let page = s.cli(&["workspaces", "list", "--json", "--limit", "1"]).await.json();
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["items"][0]["id"], beta.as_str(), "newest first");
    let next = page["next_cursor"].as_str().unwrap().to_string();
    let page2 = s.cli(&["workspaces", "list", "--json", "--cursor", &next]).await.json();
    assert_eq!(page2["items"][0]["id"], alpha.as_str(), "the cursor pages on");

    // jobs: the provision job of alpha, listed with filters and shown.
    let out = s.cli(&["jobs", "list", "--json", "--workspace", &alpha, "--kind", "provision"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let jobs = out.json();
    let items = jobs["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{jobs}");
    assert_eq!((items[0]["kind"].as_str(), items[0]["status"].as_str()), (Some("provision"), Some("succeeded")));
    let provision_job = items[0]["id"].as_str().unwrap().to_string();
    let none = s.cli(&["jobs", "list", "--json", "--workspace", &alpha, "--status", "dead"]).await.json();
    assert_eq!(none["items"].as_array().unwrap().len(), 0, "the status filter applies: {none}");
    let out = s.cli(&["jobs", "list", "--queue", "provision"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("ID") && out.stdout.contains(&provision_job), "{out:?}");
    let out = s.cli(&["jobs", "show", &provision_job]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    for want in [
        format!("id:          {provision_job}"),
        "kind:        provision".into(),
        "status:      succeeded".into(),
        format!("workspace:   {alpha}"),
        "result:".into(),
    ] {
        assert!(out.stdout.contains(&want), "{want:?} missing: {}", out.stdout);
    }
    // A succeeded job cannot be cancelled: the API's own sentence, exit 1.
    let out = s.cli(&["jobs", "cancel", &provision_job]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("the job is succeeded; only pending, scheduled or retrying jobs can be cancelled")
            && out.stderr.contains("409"),
        "{out:?}"
    );
    let out = s.cli(&["jobs", "retry", &provision_job]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("the job is succeeded; only retrying, failed, dead, cancelled or interrupted jobs can be retried"),
        "{out:?}"
    );
    let out = s.cli(&["jobs", "show", "01ARZ3NDEKTSV4RRFFQ69G5FAV"]).await;
    assert_eq!((out.code, out.stderr.trim()), (Some(1), "molecule: job not found (HTTP 404, not_found)"), "{out:?}");

    // queues: ADMIN_TOKEN, which wins over the org token in MOLECULE_TOKEN.
    let out = s.cli_env(&["queues", "--json"], &[("ADMIN_TOKEN", Some(ADMIN))]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let queues = out.json();
    let provision = queues.as_array().unwrap().iter().find(|q| q["queue"] == "provision").unwrap_or_else(|| panic!("{queues}"));
    assert!(provision["workers_alive"].as_i64().unwrap() >= 1, "serve's provision pool is alive: {provision}");
    let out = s.cli(&["queues", "--token", ADMIN]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("QUEUE") && out.stdout.lines().any(|l| l.starts_with("provision ")), "{out:?}");
    // The org token in MOLECULE_TOKEN: its own org's jobs, the platform's workers left out.
    let out = s.cli(&["queues", "--json"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let own = out.json();
    let provision = own.as_array().unwrap().iter().find(|q| q["queue"] == "provision").unwrap_or_else(|| panic!("{own}"));
    assert_eq!(provision["workers_alive"], 0, "{provision}");

    // Errors: a wrong token, no token, nothing listening.
    let out = s.cli(&["workspaces", "list", "--token", "not-a-token"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(out.stderr.trim(), "molecule: invalid or revoked token (HTTP 401, unauthorized)", "{out:?}");
    let out = s.cli_env(&["jobs", "list"], &[("MOLECULE_TOKEN", None)]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("no token") && out.stderr.contains("MOLECULE_TOKEN"), "{out:?}");
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let out = s.cli(&["workspaces", "list", "--url", &nowhere]).await;
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(out.stderr.contains(&format!("cannot reach the API at {nowhere}")) && out.stderr.contains("refused"), "{out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "one line: {out:?}");
    let out = s.cli(&["workspaces", "create", "x", "--runtime", "echo", "--timeout", "5"]).await;
    assert_eq!(out.code, Some(2), "--timeout needs --wait: {out:?}");
    let out = s.cli(&["workspaces", "create", "x", "--runtime", "nope"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("unknown runtime") && out.stderr.contains("invalid_runtime"), "the API's message: {out:?}");

    // delete --wait: removed, its stop job done, its container gone.
    let out = s.cli(&["workspaces", "delete", &alpha, "--wait"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains(&format!("workspace {alpha} is removed and stopped")) && out.stdout.contains("status:      removed"),
        "{out:?}"
    );
    let steps = progress(&out.stderr);
    assert!(steps.last().is_some_and(|l| l.starts_with("removed; stopped after ")), "{steps:?}");
    assert_eq!(s.get(&format!("/workspaces/{alpha}")).await["status"], "removed");
    let stops = s.get(&format!("/jobs?workspace_id={alpha}&kind=stop")).await;
    assert_eq!(stops["items"][0]["status"], "succeeded", "{stops}");
    assert!(containers_of(&alpha).is_empty(), "its container is gone once delete --wait returns");
    let listed = s.cli(&["workspaces", "list", "--json"]).await.json();
    let ids: Vec<&str> = listed["items"].as_array().unwrap().iter().filter_map(|w| w["id"].as_str()).collect();
    assert_eq!(ids, [beta.as_str()], "removed ones are not listed");
    // Again: already removed, nothing to wait for.
    let out = s.cli(&["workspaces", "delete", &alpha, "--wait"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("was already removed"), "{out:?}");

    let out = s.cli(&["workspaces", "delete", &beta, "--wait", "--json"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.json()["status"], "removed");
    assert!(containers_of(&beta).is_empty(), "beta's container is gone");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_that_cannot_start_fails_the_wait_with_its_reason_and_its_job_is_cancelled_and_retried() {
    let s = Server::start("operator-cli-serve-failing").await;

    // Two that cannot start (no image for `hermes`), waited on side by side: one for a
    // person, one with --json.
    let (human, json) = tokio::join!(
        s.cli(&["workspaces", "create", "broken", "--runtime", "hermes", "--wait", "--timeout", "120"]),
        s.cli(&["workspaces", "create", "broken-json", "--runtime", "hermes", "--wait", "--timeout", "120", "--json"]),
    );
    assert_eq!(human.code, Some(1), "a failed workspace exits 1: {human:?}");
    let broken = ws_id_in(&human.stderr);
    let last = human.stderr.lines().last().unwrap();
    let reason = format!("did not register within {HERMES_TIMEOUT_S} s of its start");
    assert!(last.starts_with(&format!("molecule: workspace {broken} (broken) failed: The workspace's agent {reason}")), "{last}");
    assert!(last.ends_with("[reason: provision_timeout]"), "the reason code from its events: {last}");
    let steps = progress(&human.stderr);
    assert!(steps.first().is_some_and(|l| l.starts_with("provisioning: ")), "{steps:?}");
    assert!(
        steps.iter().any(|l| l.starts_with("provisioning: Starting the workspace failed: its runtime image is not available")
            && l.contains("attempt 1 of 5")),
        "the failed attempt is shown while it retries: {steps:?}"
    );
    assert!(steps.last().is_some_and(|l| l.starts_with("failed: ") && l.contains(&reason)), "{steps:?}");
    assert!(human.stdout.is_empty(), "nothing on stdout without --json: {human:?}");
    let w = s.get(&format!("/workspaces/{broken}")).await;
    assert_eq!(w["status"], "failed", "the API agrees: {w}");

    assert_eq!(json.code, Some(1), "{json:?}");
    let v = json.json();
    assert_eq!((v["name"].as_str(), v["status"].as_str()), (Some("broken-json"), Some("failed")), "{v}");
    assert!(v["last_sample_error"].as_str().unwrap().contains(&reason), "{v}");
    assert!(json.stderr.lines().last().unwrap().contains("failed: The workspace's agent did not register"), "{json:?}");

    // A provision job waiting for its retry is cancelled, then run again.
    let out = s.cli(&["workspaces", "create", "stuck", "--runtime", "hermes", "--json"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let created = out.json();
    let job = created["job_id"].as_str().unwrap().to_string();
    assert_eq!(created["workspace"]["status"], "provisioning");
    eventually(Duration::from_secs(60), "the provision job's first attempt to fail", || async {
        (s.get(&format!("/jobs/{job}")).await["status"] == "retrying").then_some(())
    })
    .await;
    let out = s.cli(&["jobs", "cancel", &job]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout.trim(), format!("job {job} cancelled: now cancelled"));
    let shown = s.cli(&["jobs", "show", &job, "--json"]).await.json();
    assert_eq!((shown["status"].as_str(), shown["attempts"].as_i64()), (Some("cancelled"), Some(1)), "{shown}");
    let out = s.cli(&["jobs", "show", &job]).await;
    assert!(out.stdout.contains("failed attempts:\n  #1 at "), "{out:?}");
    let cancelled = s.cli(&["jobs", "list", "--json", "--status", "cancelled"]).await.json();
    let ids: Vec<&str> = cancelled["items"].as_array().unwrap().iter().filter_map(|j| j["id"].as_str()).collect();
    assert_eq!(ids, [job.as_str()], "{cancelled}");

    let out = s.cli(&["jobs", "retry", &job, "--json"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let retried = out.json();
    assert_eq!(retried["id"], job.as_str());
    assert_ne!(retried["status"], "cancelled", "{retried}");
    eventually(Duration::from_secs(60), "the retried job to run its second attempt", || async {
        let j = s.get(&format!("/jobs/{job}")).await;
        (j["attempts"].as_i64() >= Some(2) && j["status"] != "running").then_some(())
    })
    .await;

    // A failed workspace is deleted like any other.
    let out = s.cli(&["workspaces", "delete", &broken, "--wait", "--timeout", "120"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(s.get(&format!("/workspaces/{broken}")).await["status"], "removed");
    s.stop().await;
}
