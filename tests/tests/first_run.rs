//! Issue 8: a first run that just works — the README's quick start run as written, from a
//! 0700 directory as root with no DATABASE_URL; logs for people and for machines; a data
//! directory the embedded cluster cannot reach is named in the error.

use molecule_tests::{Proc, bin_path, eventually, http_get};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The fenced block that follows the line starting with `marker` in README.md.
fn readme_block(marker: &str) -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let after = &readme[readme.find(marker).unwrap_or_else(|| panic!("README has no {marker:?}"))..];
    let open = after.find("```sh\n").expect("a ```sh block after the marker") + "```sh\n".len();
    let body = &after[open..];
    body[..body.find("\n```").expect("the block ends")].to_string()
}

/// Replaces `from` (which must occur) in `text`.
fn must_replace(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the README block no longer contains {from:?}: update this test with it");
    text.replace(from, to)
}

/// A directory only root can enter (mode 0700), like root's home or a `mktemp -d`.
fn closed_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("molecule-{tag}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    d
}

fn serve(cwd: &Path, listen: &str, name: &str) -> Proc {
    let block = readme_block("<!-- quickstart:serve");
    let cmd = block.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap().to_string();
    assert_eq!(cmd, "cargo run --release --bin molecule", "the README's serve command changed: update this test");
    let mut c = Command::new(bin_path("molecule"));
    c.current_dir(cwd)
        .env_remove("DATABASE_URL")
        .env_remove("MOLECULE_DATA_DIR")
        .env_remove("MOLECULE_ALLOW_LOOPBACK_AGENTS")
        .env_remove("MOLECULE_DEV")
        .env("LISTEN_ADDR", listen);
    Proc::spawn(c, name)
}

/// Removes a test's working directory and its relocated data directory, stopping a
/// cluster left running there (a failed test SIGKILLs its `serve`), even on panic.
struct Cleanup {
    cwd: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(chosen) = molecule_domain::embedded_pg::default_data_dir(&self.cwd.join(".molecule")) {
            let pg = chosen.path.join("pg");
            if pg.join("postmaster.pid").exists() {
                let _ = Command::new("su")
                    .args(["postgres", "-s", "/bin/sh", "-c", &format!("pg_ctl -D '{}' -m immediate stop", pg.display())])
                    .env("PATH", "/usr/lib/postgresql/15/bin:/usr/bin:/bin")
                    .output();
            }
            if chosen.relocated_from.is_some() {
                let _ = std::fs::remove_dir_all(&chosen.path);
            }
        }
        let _ = std::fs::remove_dir_all(&self.cwd);
    }
}

async fn wait_ready(addr: &str, within: Duration) -> Duration {
    let t0 = Instant::now();
    eventually(within, "serve to be ready", || async { matches!(http_get(addr, "/readyz").await, Ok((200, _))).then_some(()) }).await;
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_quick_start_runs_from_a_0700_directory_and_again_after_a_restart() {
    let cwd = closed_dir("quickstart");
    let _cleanup = Cleanup { cwd: cwd.clone() };
    let port = molecule_tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut server = serve(&cwd, &addr, "quickstart-serve");
    let first = wait_ready(&addr, Duration::from_secs(30)).await;
    eprintln!("ready after {first:?} (fresh cluster)");

    // The client block as written, with the binary this test suite built and the port above.
    let mut script = readme_block("<!-- quickstart:client");
    script = must_replace(
        &script,
        r#"molecule() { cargo run -q --release --bin molecule -- "$@"; }"#,
        &format!(r#"molecule() {{ "{}" "$@"; }}"#, bin_path("molecule").display()),
    );
    script = must_replace(&script, "127.0.0.1:8080", &addr);
    script.push_str("\nprintf '\\nQUICKSTART %s %s\\n' \"$TOKEN\" \"$WS\"\n");
    let t0 = Instant::now();
    let out = Command::new("bash")
        .args(["-e", "-o", "pipefail", "-c", &script])
        .current_dir(&cwd)
        .env_remove("DATABASE_URL")
        .env_remove("MOLECULE_DATA_DIR")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("client block ({:?}):\n{stdout}\n{}", t0.elapsed(), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the README's client block failed");
    assert!(stdout.contains(r#"{"status":"ready"}"#), "readyz");
    assert!(stdout.contains(r#""status":"online""#), "the first workspace came online without any flag");
    assert!(stdout.contains(r#"{"data":"hello\n","stream":"stdout"}"#) && stdout.contains(r#"{"exit_code":0}"#), "exec streamed");
    let (token, ws) = {
        let line = stdout.lines().find(|l| l.starts_with("QUICKSTART ")).unwrap();
        let mut it = line.split_whitespace().skip(1);
        (it.next().unwrap().to_string(), it.next().unwrap().to_string())
    };
    // The delete's stop job takes the container away.
    let label = format!("label=molecule.workspace.id={ws}");
    eventually(Duration::from_secs(30), "the container to be removed", || async {
        let o = Command::new("docker").args(["ps", "-aq", "--filter", &label]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).trim().is_empty().then_some(())
    })
    .await;

    // Restart with the data kept: ready again, the org's token still works.
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(40)).and_then(|s| s.code()), Some(0), "serve exits 0 on SIGTERM");
    let mut server = serve(&cwd, &addr, "quickstart-serve-again");
    let again = wait_ready(&addr, Duration::from_secs(30)).await;
    eprintln!("ready after {again:?} (existing cluster)");
    let r = molecule_tests::http(&addr, "GET", &format!("/workspaces/{ws}"), Some(&token), None, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["status"], "removed");
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(40)).and_then(|s| s.code()), Some(0));

    // As root the cluster could not live under the 0700 directory: it went to /var/lib/molecule.
    let chosen = molecule_domain::embedded_pg::default_data_dir(&cwd.join(".molecule")).unwrap();
    if unsafe { libc::geteuid() } == 0 {
        assert!(chosen.relocated_from.is_some() && chosen.path.join("pg/PG_VERSION").exists(), "{chosen:?}");
    }
}

/// An explicit MOLECULE_DATA_DIR is used as given; one the cluster's user cannot reach is
/// refused with the variable and the blocking directory named.
#[test]
fn an_unreachable_explicit_data_dir_is_named() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: the cluster runs as this user, who can reach its own directories");
        return;
    }
    let closed = closed_dir("explicit");
    let out = Command::new(bin_path("molecule"))
        .args(["org", "create", "x"])
        .env_remove("DATABASE_URL")
        .env("MOLECULE_DATA_DIR", closed.join("data"))
        .env("MOLECULE_LOG_FORMAT", "json")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("MOLECULE_DATA_DIR") && err.contains(&*closed.to_string_lossy()), "{err}");
    assert!(!closed.join("data/pg").exists(), "nothing was initialised");
    let _ = std::fs::remove_dir_all(&closed);
}

/// Text for a terminal, JSON otherwise, MOLECULE_LOG_FORMAT wins, no colour codes in files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_text_on_a_terminal_and_json_elsewhere() {
    let (_db, url) = molecule_tests::fresh_db().await;
    let bin = bin_path("molecule");
    let piped = |format: Option<&str>| {
        let mut c = Command::new(&bin);
        c.arg("migrate").env("DATABASE_URL", &url).env_remove("MOLECULE_LOG_FORMAT").env_remove("RUST_LOG");
        if let Some(f) = format {
            c.env("MOLECULE_LOG_FORMAT", f);
        }
        let out = c.output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    // `script` gives the command a terminal (a pty) and copies what it shows to stdout.
    let on_terminal = |format: Option<&str>| {
        let mut c = Command::new("script");
        c.args(["-qec", &format!("'{}' migrate", bin.display()), "/dev/null"])
            .env("DATABASE_URL", &url)
            .env_remove("MOLECULE_LOG_FORMAT")
            .env_remove("RUST_LOG");
        if let Some(f) = format {
            c.env("MOLECULE_LOG_FORMAT", f);
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let is_json = |text: &str| {
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        !lines.is_empty() && lines.iter().all(|l| serde_json::from_str::<serde_json::Value>(l.trim()).is_ok())
    };

    let default_pipe = piped(None);
    assert!(is_json(&default_pipe) && default_pipe.contains("migrations applied"), "{default_pipe}");
    let text_pipe = piped(Some("text"));
    assert!(!is_json(&text_pipe) && text_pipe.contains("migrations applied"), "{text_pipe}");
    assert!(!text_pipe.contains('\u{1b}'), "no colour codes when not on a terminal: {text_pipe:?}");
    let default_tty = on_terminal(None);
    assert!(!is_json(&default_tty) && default_tty.contains("migrations applied"), "{default_tty}");
    let json_tty = on_terminal(Some("json"));
    assert!(is_json(&json_tty), "MOLECULE_LOG_FORMAT wins on a terminal: {json_tty:?}");
}
