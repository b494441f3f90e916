//! The embedded default: a private PostgreSQL cluster under the data directory, run
//! with the machine's own `initdb`/`pg_ctl`. Created on first start, reused after,
//! stopped when its owner stops. When run as root the cluster runs as the `postgres`
//! user (initdb refuses root).
//!
//! Layout under the data directory: `pg/` (the cluster), `pg.log`, `pg.password`
//! (the superuser's password, 0600; the cluster only accepts password auth on 127.0.0.1),
//! and two lock files. Several processes of ours may use one cluster (`serve`, then
//! `molecule org create` in another shell): `start.lock` (exclusive) is held while one of
//! them creates, starts, adopts or stops it, and every process using it holds a shared
//! lock on `users.lock`, so a stop stops the cluster only when no other process of ours
//! still uses it. Without them, a `serve` and an `org create` started together both ran
//! initdb and pg_ctl, and the one that finished first stopped the cluster under the other.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedPgError {
    #[error("PostgreSQL binaries (initdb, pg_ctl) not found on PATH or under /usr/lib/postgresql/*/bin")]
    BinariesMissing,
    #[error("running as root but there is no `postgres` user to run the cluster as")]
    NoPostgresUser,
    #[error("data directory {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(
        "data directory {dir} is not reachable by the postgres user ({blocked} does not let it in): \
         choose a MOLECULE_DATA_DIR under a directory every user can traverse, or unset it to use the default"
    )]
    NotTraversable { dir: String, blocked: String },
    #[error("{step} failed (exit {code:?}); see {log}")]
    Command { step: &'static str, code: Option<i32>, log: String },
    #[error("no free TCP port on 127.0.0.1: {0}")]
    NoPort(std::io::Error),
}

pub struct EmbeddedPostgres {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
    port: u16,
    password: String,
    run_as: Option<(u32, u32)>,
    stopped: bool,
    adopted: bool,
    /// This process's shared lock on `users.lock` while it uses the cluster.
    users: Option<std::fs::File>,
}

impl EmbeddedPostgres {
    /// Creates the cluster when missing, then starts it (or adopts one already running
    /// on this data directory) and returns once it accepts connections.
    pub fn start(root: &Path) -> Result<Self, EmbeddedPgError> {
        let bin_dir = find_bin_dir().ok_or(EmbeddedPgError::BinariesMissing)?;
        let io = |path: &Path| {
            let p = path.display().to_string();
            move |source| EmbeddedPgError::Io { path: p, source }
        };
        let created = !root.exists();
        std::fs::create_dir_all(root).map_err(io(root))?;
        let root = root.canonicalize().map_err(io(root))?;
        if created {
            // Whatever the umask: the server user must be able to enter it.
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).map_err(io(&root))?;
        }
        let data_dir = root.join("pg");
        let log_file = root.join("pg.log");
        let pw_file = root.join("pg.password");
        let run_as = if unsafe { libc::geteuid() } == 0 { Some(postgres_user().ok_or(EmbeddedPgError::NoPostgresUser)?) } else { None };
        if let Some((uid, gid)) = run_as {
            if let Some(blocked) = first_unsearchable(&root, uid, gid) {
                return Err(EmbeddedPgError::NotTraversable { dir: root.display().to_string(), blocked: blocked.display().to_string() });
            }
        }

        let mut me = EmbeddedPostgres {
            bin_dir,
            data_dir,
            log_file,
            port: 0,
            password: String::new(),
            run_as,
            // Nothing to stop until this handle launches the cluster or registers as a user
            // of a running one: a start that fails before must not stop another's cluster.
            stopped: true,
            adopted: false,
            users: None,
        };

        let _starting = me.exclusive_start()?;
        if !me.data_dir.join("PG_VERSION").exists() {
            me.init(&root, &pw_file)?;
        }
        me.password = std::fs::read_to_string(&pw_file).map_err(io(&pw_file))?.trim().to_string();
        if let Some((uid, gid)) = run_as {
            // The log is written by the server process.
            if !me.log_file.exists() {
                std::fs::write(&me.log_file, b"").map_err(io(&me.log_file))?;
            }
            chown(&me.log_file, uid, gid).map_err(io(&me.log_file))?;
        }

        if let Some(port) = me.running_port() {
            tracing::info!(data_dir = %me.data_dir.display(), port, "embedded PostgreSQL already running; adopting it");
            me.port = port;
            me.adopted = true;
        } else {
            me.port = free_port().map_err(EmbeddedPgError::NoPort)?;
            // From here a failure stops what this start launched (if no one else uses it).
            me.stopped = false;
            me.launch()?;
        }
        me.users = Some(me.use_shared()?);
        me.stopped = false;
        Ok(me)
    }

    /// Starts a stopped cluster again on the same port (tests use it to bounce the database).
    pub fn start_again(&mut self) -> Result<(), EmbeddedPgError> {
        let _starting = self.exclusive_start()?;
        self.launch()?;
        self.users = Some(self.use_shared()?);
        self.stopped = false;
        Ok(())
    }

    /// `name` beside the cluster, opened close-on-exec (as std opens every file: the server
    /// pg_ctl starts never holds it); read-only when it exists and cannot be written,
    /// which is enough for a lock.
    fn lock_file(&self, name: &str) -> std::io::Result<std::fs::File> {
        let path = self.data_dir.with_file_name(name);
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).or_else(|_| std::fs::File::open(&path))
    }

    /// `name`'s lock, waited for up to [`LOCK_WAIT`]: a process stopped or hung while it
    /// holds one (an `org create` suspended during initdb) must not hang the others.
    fn locked(&self, name: &str, shared: bool) -> Result<std::fs::File, EmbeddedPgError> {
        let io = |source| EmbeddedPgError::Io { path: self.data_dir.with_file_name(name).display().to_string(), source };
        let f = self.lock_file(name).map_err(io)?;
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            let taken = if shared { f.try_lock_shared() } else { f.try_lock() };
            match taken {
                Ok(()) => return Ok(f),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    let why = format!("another molecule process has held this lock for {} s", LOCK_WAIT.as_secs());
                    return Err(io(std::io::Error::new(std::io::ErrorKind::TimedOut, why)));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
            }
        }
    }

    /// Held (until dropped) while this process creates, starts, adopts or stops the cluster.
    fn exclusive_start(&self) -> Result<std::fs::File, EmbeddedPgError> {
        self.locked("start.lock", false)
    }

    /// Marks this process as one using the cluster: a shared lock, released when the file
    /// is closed — also when the process dies.
    fn use_shared(&self) -> Result<std::fs::File, EmbeddedPgError> {
        self.locked("users.lock", true)
    }

    fn launch(&self) -> Result<(), EmbeddedPgError> {
        let io = |source| EmbeddedPgError::Io { path: self.data_dir.display().to_string(), source };
        let status = self
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .arg("-o")
            .arg(format!("-p {}", self.port))
            .args(["-w", "-t", "60", "start"])
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(io)?;
        if !status.success() {
            return Err(EmbeddedPgError::Command { step: "pg_ctl start", code: status.code(), log: self.log_file.display().to_string() });
        }
        tracing::info!(
            data_dir = %self.data_dir.display(),
            log = %self.log_file.display(),
            addr = %format!("127.0.0.1:{}", self.port),
            "embedded PostgreSQL started"
        );
        Ok(())
    }

    fn init(&self, root: &Path, pw_file: &Path) -> Result<(), EmbeddedPgError> {
        let io = |path: &Path| {
            let p = path.display().to_string();
            move |source| EmbeddedPgError::Io { path: p, source }
        };
        let password = random_hex(32);
        std::fs::write(pw_file, &password).map_err(io(pw_file))?;
        std::fs::set_permissions(pw_file, std::fs::Permissions::from_mode(0o600)).map_err(io(pw_file))?;
        // initdb reads the password from a file the server user can read; removed right after.
        let init_pw = root.join(".initdb.pw");
        std::fs::write(&init_pw, &password).map_err(io(&init_pw))?;
        std::fs::set_permissions(&init_pw, std::fs::Permissions::from_mode(0o600)).map_err(io(&init_pw))?;
        std::fs::create_dir_all(&self.data_dir).map_err(io(&self.data_dir))?;
        std::fs::set_permissions(&self.data_dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&self.data_dir))?;
        if let Some((uid, gid)) = self.run_as {
            chown(&self.data_dir, uid, gid).map_err(io(&self.data_dir))?;
            chown(&init_pw, uid, gid).map_err(io(&init_pw))?;
        }
        let out = self
            .pg_command("initdb")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-U", "postgres", "-A", "scram-sha-256", "-E", "UTF8", "--no-instructions"])
            .arg(format!("--pwfile={}", init_pw.display()))
            .output()
            .map_err(io(&self.data_dir));
        let _ = std::fs::remove_file(&init_pw);
        let out = out?;
        if !out.status.success() {
            let _ = std::fs::write(&self.log_file, [&out.stdout[..], &out.stderr[..]].concat());
            return Err(EmbeddedPgError::Command { step: "initdb", code: out.status.code(), log: self.log_file.display().to_string() });
        }
        // Loopback TCP only; no unix socket (its path length and permissions vary by data dir).
        let conf = self.data_dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).map_err(io(&conf))?;
        text.push_str(
            "\n# molecule embedded defaults\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\nmax_connections = 200\n",
        );
        std::fs::write(&conf, text).map_err(io(&conf))?;
        Ok(())
    }

    /// Port of a server already running on this data directory (postmaster.pid line 4),
    /// when its process is alive.
    fn running_port(&self) -> Option<u16> {
        let pid_file = std::fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let mut lines = pid_file.lines();
        let pid: i32 = lines.next()?.trim().parse().ok()?;
        let port: u16 = lines.nth(2)?.trim().parse().ok()?;
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        alive.then_some(port)
    }

    fn pg_command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(name));
        cmd.current_dir(self.data_dir.parent().unwrap_or(Path::new("/")));
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid).env("HOME", "/var/lib/postgresql").env_remove("PGDATA");
        }
        cmd
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection URL. Holds the password: never log it.
    pub fn database_url(&self) -> String {
        format!("postgres://postgres:{}@127.0.0.1:{}/postgres", self.password, self.port)
    }

    /// True when the cluster was already running (another process of ours started it).
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Stops the cluster (fast shutdown: sessions are disconnected, data is flushed),
    /// unless another process of ours still uses it: then it is left to that process.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        // No process can start using the cluster while this one decides (starting takes
        // the same lock), so "nobody else holds users.lock" stays true until the stop.
        let _stopping =
            self.exclusive_start().map_err(|e| tracing::warn!(error = %e, "embedded PostgreSQL: no start lock; deciding without it")).ok();
        // This handle's own shared lock goes first; a handle that never took one (a start
        // that failed after launching) asks on a file of its own.
        let users = match self.users.take() {
            Some(own) => own.unlock().map(|()| own),
            None => self.lock_file("users.lock"),
        };
        if let Ok(users) = users {
            if let Err(std::fs::TryLockError::WouldBlock) = users.try_lock() {
                tracing::info!(data_dir = %self.data_dir.display(), "embedded PostgreSQL left running: another process of ours uses it");
                return;
            }
        }
        let res = self
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "fast", "-w", "-t", "60", "stop"])
            .stdout(std::process::Stdio::null())
            .status();
        match res {
            Ok(s) if s.success() => tracing::info!(data_dir = %self.data_dir.display(), "embedded PostgreSQL stopped"),
            Ok(s) => tracing::warn!(code = ?s.code(), "pg_ctl stop failed"),
            Err(e) => tracing::warn!(error = %e, "pg_ctl stop could not run"),
        }
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn find_bin_dir() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                // Debian's /usr/bin/initdb is a wrapper that needs a cluster config; prefer the real dir.
                if let Ok(real) = dir.join("pg_ctl").canonicalize() {
                    if let Some(p) = real.parent() {
                        if p.join("initdb").is_file() && p.join("postgres").is_file() {
                            return Some(p.to_path_buf());
                        }
                    }
                }
            }
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").is_file() && p.join("pg_ctl").is_file())
        .collect();
    candidates
        .sort_by_key(|p| p.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0));
    candidates.pop()
}

fn postgres_user() -> Option<(u32, u32)> {
    let name = std::ffi::CString::new("postgres").ok()?;
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    let pw = unsafe { &*pw };
    Some((pw.pw_uid, pw.pw_gid))
}

fn chown(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
}

/// The first existing directory on the way to `dir` (itself included) that the user
/// `uid`/`gid` may not search, by its owner/group/other execute bits.
fn first_unsearchable(dir: &Path, uid: u32, gid: u32) -> Option<PathBuf> {
    let mut chain: Vec<&Path> = dir.ancestors().collect();
    chain.reverse();
    chain.into_iter().find_map(|a| {
        let m = std::fs::metadata(a).ok()?;
        let mode = m.mode();
        let searchable = if m.uid() == uid {
            mode & 0o100 != 0
        } else if m.gid() == gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        (!searchable).then(|| a.to_path_buf())
    })
}

/// How long a start or stop waits for another process's lock on the cluster (initdb and
/// pg_ctl's own 60 s wait fit in it).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Where relocated data directories live: a place the `postgres` user can always reach.
pub const RELOCATED_BASE: &str = "/var/lib/molecule";

/// A data directory chosen for the embedded cluster.
#[derive(Debug, Clone)]
pub struct DataDir {
    pub path: PathBuf,
    /// When the preferred directory could not be used: (it, the directory that blocked it).
    pub relocated_from: Option<(PathBuf, PathBuf)>,
}

/// The data directory to use when none was configured: `preferred` (e.g. `./.molecule`)
/// when the cluster's user can reach it; otherwise — running as root under a 0700
/// directory such as root's home or a `mktemp -d` — one under [`RELOCATED_BASE`] named
/// after `preferred`'s absolute path, so every command run from the same place (`serve`,
/// `org create`) finds the same cluster again.
pub fn default_data_dir(preferred: &Path) -> std::io::Result<DataDir> {
    let plain = DataDir { path: preferred.to_path_buf(), relocated_from: None };
    if unsafe { libc::geteuid() } != 0 {
        return Ok(plain);
    }
    let Some((uid, gid)) = postgres_user() else { return Ok(plain) };
    let abs = std::path::absolute(preferred)?;
    // Resolve symlinks and `..` in the part that exists; keep the rest as written.
    let existing = abs.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
    let abs = existing.canonicalize()?.join(abs.strip_prefix(existing).unwrap_or(Path::new("")));
    let Some(blocked) = first_unsearchable(&abs, uid, gid) else {
        return Ok(DataDir { path: abs, relocated_from: None });
    };
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(abs.as_os_str().as_encoded_bytes()));
    let owner: String = abs
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().chars().filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c)).take(40).collect())
        .filter(|n: &String| !n.is_empty())
        .unwrap_or_else(|| "root".into());
    let base = Path::new(RELOCATED_BASE);
    std::fs::create_dir_all(base)?;
    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755))?;
    Ok(DataDir { path: base.join(format!("{owner}-{}", &digest[..12])), relocated_from: Some((abs, blocked)) })
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn random_hex(_bytes: usize) -> String {
    // Two v4 UUIDs: 244 random bits from the OS generator.
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_0700_ancestor_blocks_other_users_and_not_its_owner() {
        let base = std::env::temp_dir().join(format!("molecule-reach-{}", uuid::Uuid::new_v4().simple()));
        let closed = base.join("closed");
        let inner = closed.join("inner");
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let me = std::fs::metadata(&closed).unwrap();
        let (owner, group) = (me.uid(), me.gid());
        // Someone else (neither owner nor group) cannot enter `closed`; its owner can.
        assert_eq!(first_unsearchable(&inner, owner + 4242, group + 4242), Some(closed.clone()));
        assert_eq!(first_unsearchable(&inner, owner, group), None);
        // Group-searchable lets the group in, and only the group.
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o710)).unwrap();
        assert_eq!(first_unsearchable(&inner, owner + 4242, group), None);
        assert_eq!(first_unsearchable(&inner, owner + 4242, group + 4242), Some(closed.clone()));
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o711)).unwrap();
        assert_eq!(first_unsearchable(&inner, owner + 4242, group + 4242), None);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn default_dir_moves_out_of_a_0700_directory_only_when_it_must() {
        let root = unsafe { libc::geteuid() } == 0;
        let base = std::env::temp_dir().join(format!("molecule-dd-{}", uuid::Uuid::new_v4().simple()));
        let open = base.join("open");
        let closed = base.join("closed");
        std::fs::create_dir_all(&open).unwrap();
        std::fs::create_dir_all(&closed).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();

        let d = default_data_dir(&open.join(".molecule")).unwrap();
        assert!(d.relocated_from.is_none(), "{d:?}");
        assert!(d.path.ends_with("open/.molecule"), "{d:?}");

        let d1 = default_data_dir(&closed.join(".molecule")).unwrap();
        if root && postgres_user().is_some() {
            let (from, blocked) = d1.relocated_from.clone().expect("relocated");
            assert_eq!(blocked, closed.canonicalize().unwrap());
            assert!(from.ends_with("closed/.molecule"));
            assert!(d1.path.starts_with(RELOCATED_BASE) && d1.path.file_name().unwrap().to_string_lossy().starts_with("closed-"));
            // The same place gives the same directory (serve and `org create` agree); another place another.
            assert_eq!(default_data_dir(&closed.join(".molecule")).unwrap().path, d1.path);
            assert_ne!(default_data_dir(&closed.join("other")).unwrap().path, d1.path);
        } else {
            // Not root: the cluster runs as this user, who can reach its own directory.
            assert!(d1.relocated_from.is_none());
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}
