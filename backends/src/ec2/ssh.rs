//! Commands on an instance over SSH (J5 exec, J4 rescue reads), the way EC2 Instance
//! Connect works: a fresh Ed25519 key per session, pushed with SendSSHPublicKey (EC2
//! accepts it for 60 s), then an SSH connection that authenticates with it. No key is
//! stored anywhere; a leaked one is useless a minute later.
//!
//! Host keys ([`Trust`]): once a key is pinned for an instance, every connection must
//! present it, or is refused (a typed error, logged). Before that, a key the instance
//! printed on its console at first boot (cloud-init's `BEGIN SSH HOST KEY KEYS` block, read
//! through the authenticated EC2 API) must be among those; with no such block, the first
//! key is trusted (trust on first use). The key is pinned once the login succeeded
//! ([`InstanceStore::pin_host_key`]). EC2 never reuses an instance id, so a pin never
//! outlives its machine. Never "accept anything".

use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{ChannelMsg, Sig};
use std::sync::Arc;
use std::time::Duration;

use super::InstanceStore;
use crate::{BackendError, ChunkSink, ExecOutcome, OutputStream};

/// Connecting and authenticating, at most.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The remote `timeout` kills the command this long after the platform's own deadline,
/// should the platform's kill never arrive (a lost connection).
const REMOTE_BACKSTOP: Duration = Duration::from_secs(30);
/// The marker line the wrapper prints first on stderr: the command's process group.
const PGID_MARKER: &str = "molecule-exec-pgid=";
/// Stderr held back while looking for the marker (a login shell may print first).
const MARKER_WINDOW: usize = 4096;
/// How long a command cut short before its marker arrived may still take to send it.
const MARKER_WAIT: Duration = Duration::from_secs(3);

/// Where and as whom to connect.
pub struct Target<'a> {
    pub instance_id: &'a str,
    /// `host:port`.
    pub address: &'a str,
    pub user: &'a str,
}

/// What a connection to an instance may present.
#[derive(Clone, Debug)]
pub enum Trust {
    /// This key only (pinned at an earlier connection).
    Pinned(String),
    /// One of these (printed by the instance at boot), then pinned.
    Listed(Vec<String>),
    /// Any key, then pinned: trust on first use.
    FirstUse,
}

/// Checks the server's key against what is trusted; remembers it for the pin.
struct HostKeyCheck {
    trust: Trust,
    /// The key presented (`type base64`), for pinning after the login.
    presented: Arc<std::sync::Mutex<Option<String>>>,
    /// Why a key was refused, for the error (the handler's own error type is russh's).
    refused: Arc<std::sync::Mutex<Option<String>>>,
}

impl client::Handler for HostKeyCheck {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let presented = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => openssh_key_body(&key.to_openssh().unwrap_or_default()),
            // Pinning is by key; a host certificate would need a CA this platform has none of.
            PublicKeyOrCertificate::Certificate(_) => String::new(),
        };
        let refusal = match &self.trust {
            _ if presented.is_empty() => Some("no plain host key presented"),
            Trust::Pinned(pinned) if *pinned != presented => Some("the instance's host key changed since it was pinned"),
            Trust::Listed(keys) if !keys.contains(&presented) => Some("not a key the instance printed at boot"),
            _ => None,
        };
        if let Some(why) = refusal {
            *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_string());
            return Ok(false);
        }
        *self.presented.lock().unwrap_or_else(|p| p.into_inner()) = Some(presented);
        Ok(true)
    }
}

/// The host keys in a console's cloud-init block (`type base64` each); None without one.
pub fn console_host_keys(console: &str) -> Option<Vec<String>> {
    let start = console.find("-----BEGIN SSH HOST KEY KEYS-----")?;
    let body = &console[start..];
    let end = body.find("-----END SSH HOST KEY KEYS-----")?;
    let keys: Vec<String> =
        body[..end].lines().skip(1).map(openssh_key_body).filter(|k| k.starts_with("ssh-") || k.starts_with("ecdsa-")).collect();
    (!keys.is_empty()).then_some(keys)
}

/// `type base64` of an OpenSSH public key line (the comment dropped).
fn openssh_key_body(line: &str) -> String {
    line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// A fresh Ed25519 key.
fn ephemeral_key() -> Result<PrivateKey, BackendError> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| BackendError::EngineUnavailable(format!("no randomness for an SSH key: {e}")))?;
    let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let mut key = PrivateKey::from(pair);
    // Named in the instance's auth log; EC2 Instance Connect also wants ≥ 80 characters.
    key.set_comment("molecule-platform");
    Ok(key)
}

fn ssh_err(what: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError::EngineUnavailable(format!("SSH {what}: {e}"))
}

/// An authenticated SSH session to one instance.
pub struct Session {
    handle: client::Handle<HostKeyCheck>,
}

impl Session {
    /// Pushes a fresh key through EC2 Instance Connect, connects, checks the host key and
    /// authenticates.
    pub async fn open(
        connect: &aws_sdk_ec2instanceconnect::Client,
        store: Arc<dyn InstanceStore>,
        t: &Target<'_>,
        trust: Trust,
    ) -> Result<Session, BackendError> {
        let key = ephemeral_key()?;
        let public = key.public_key().to_openssh().map_err(|e| ssh_err("key encoding", e))?;
        let sent = connect
            .send_ssh_public_key()
            .instance_id(t.instance_id)
            .instance_os_user(t.user)
            .ssh_public_key(public)
            .send()
            .await
            .map_err(|e| super::aws::Fault::of(&e).into_backend("SendSSHPublicKey"))?;
        if !sent.success() {
            return Err(BackendError::engine(502, "SendSSHPublicKey: not accepted"));
        }
        let refused = Arc::new(std::sync::Mutex::new(None));
        let presented = Arc::new(std::sync::Mutex::new(None));
        let pin_after_login = !matches!(trust, Trust::Pinned(_));
        let check = HostKeyCheck { trust, presented: presented.clone(), refused: refused.clone() };
        let config = Arc::new(client::Config {
            inactivity_timeout: Some(Duration::from_secs(300)),
            keepalive_interval: Some(Duration::from_secs(15)),
            nodelay: true,
            ..Default::default()
        });
        let handshake = async {
            let mut handle = client::connect(config, t.address, check).await?;
            let auth = handle.authenticate_publickey(t.user, PrivateKeyWithHashAlg::new(Arc::new(key), None)).await?;
            Ok::<_, russh::Error>((handle, auth))
        };
        let (handle, auth) = match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
            Err(_) => return Err(ssh_err("connect", "timed out")),
            Ok(Err(e)) => {
                let why = refused.lock().unwrap_or_else(|p| p.into_inner()).take();
                return Err(match why {
                    Some(why) => {
                        tracing::error!(instance_id = t.instance_id, reason = why, "SSH HOST KEY REFUSED: connection closed");
                        BackendError::engine(495, &format!("SSH host key refused: {why}"))
                    }
                    None => ssh_err("connect", e),
                });
            }
            Ok(Ok(v)) => v,
        };
        let session = Session { handle };
        if !auth.success() {
            session.close().await;
            return Err(BackendError::engine(401, "SSH: the instance refused the pushed key"));
        }
        if pin_after_login {
            // Pinned only once the login worked; a racing first connection that pinned
            // another key wins, and this one is refused.
            let key = presented.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default();
            match store.pin_host_key(t.instance_id, &key).await {
                Ok(pinned) if pinned == key => {}
                Ok(_) => {
                    session.close().await;
                    return Err(BackendError::engine(495, "SSH host key refused: another key was pinned for the instance meanwhile"));
                }
                Err(e) => {
                    session.close().await;
                    return Err(e);
                }
            }
        }
        Ok(session)
    }

    /// Runs `argv` (quoted here) with a deadline. The command runs in a process group of
    /// its own under the remote `timeout` (a backstop should this connection be lost);
    /// on the deadline, or when `stop` fires, the whole group is killed from a second
    /// channel.
    pub async fn exec(
        &self,
        argv: &[String],
        deadline: Duration,
        cap: usize,
        stop: Option<tokio::sync::watch::Receiver<bool>>,
        sink: ChunkSink<'_>,
    ) -> Result<ExecOutcome, BackendError> {
        let script = format!("echo \"{PGID_MARKER}$$\" >&2; exec timeout -s KILL {} \"$@\"", (deadline + REMOTE_BACKSTOP).as_secs());
        let command = format!("exec sh -c {} molecule-exec {}", crate::shell::quote(&script), crate::shell::join(argv));
        let mut channel = self.handle.channel_open_session().await.map_err(|e| ssh_err("channel", e))?;
        channel.exec(true, command).await.map_err(|e| ssh_err("exec", e))?;
        let mut out = ExecOutcome::default();
        let mut marker = Marker::default();
        let read = async {
            let mut code = None;
            while let Some(msg) = channel.wait().await {
                match msg {
                    ChannelMsg::Data { data } => out.take(OutputStream::Stdout, &data, cap, sink),
                    ChannelMsg::ExtendedData { data, ext: 1 } => {
                        let released = marker.push(&data);
                        out.take(OutputStream::Stderr, &released, cap, sink);
                    }
                    ChannelMsg::ExitStatus { exit_status } => code = Some(exit_status as i64),
                    ChannelMsg::ExitSignal { signal_name, .. } => code = Some(128 + signal_number(&signal_name)),
                    _ => {}
                }
            }
            let rest = marker.finish();
            out.take(OutputStream::Stderr, &rest, cap, sink);
            code
        };
        enum End {
            Exited(Option<i64>),
            TimedOut,
            Stopped,
        }
        let end = tokio::select! {
            r = tokio::time::timeout(deadline, read) => match r {
                Ok(code) => End::Exited(code),
                Err(_) => End::TimedOut,
            },
            _ = crate::stopped(stop) => End::Stopped,
        };
        match end {
            End::Exited(Some(code)) => {
                out.exit_code = Some(code);
                Ok(out)
            }
            End::Exited(None) => {
                // Closed without an exit status: the command may still run. Kill it if
                // this session still can, and say the run failed (never a clean exit).
                if let Some(pgid) = marker.pgid {
                    self.kill_group(pgid).await;
                }
                Err(ssh_err("exec", "the channel closed before the command reported how it ended"))
            }
            End::TimedOut | End::Stopped => {
                out.timed_out = matches!(end, End::TimedOut);
                out.interrupted = matches!(end, End::Stopped);
                // Cut short before the wrapper named its process group: give it a moment
                // to (what it prints meanwhile is not kept).
                let named = async {
                    while marker.pgid.is_none() {
                        match channel.wait().await {
                            Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                                marker.push(&data);
                            }
                            Some(_) => {}
                            None => break,
                        }
                    }
                };
                let _ = tokio::time::timeout(MARKER_WAIT, named).await;
                match marker.pgid {
                    Some(pgid) => self.kill_group(pgid).await,
                    None => tracing::warn!("the command's process group is unknown; the remote timeout will end it"),
                }
                Ok(out)
            }
        }
    }

    async fn kill_group(&self, pgid: u32) {
        let kill = async {
            let mut ch = self.handle.channel_open_session().await?;
            // No `--`: dash's kill refuses it, and every shell reads `-KILL -N` as a group.
            // As root where the user may (`sudo -n`): a command may have started sudo'd
            // children the user's own kill cannot reach.
            ch.exec(true, super::as_root(&format!("kill -KILL -{pgid}"))).await?;
            while ch.wait().await.is_some() {}
            Ok::<(), russh::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(10), kill).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not kill the command's process group"),
            Err(_) => tracing::warn!("killing the command's process group timed out"),
        }
    }

    /// Runs a platform-written shell line (not a tenant's argv) and returns its exit code,
    /// stdout and stderr, each capped.
    pub async fn output(&self, line: &str, cap: usize, deadline: Duration) -> Result<(Option<i64>, Vec<u8>, Vec<u8>), BackendError> {
        let mut channel = self.handle.channel_open_session().await.map_err(|e| ssh_err("channel", e))?;
        channel.exec(true, line).await.map_err(|e| ssh_err("exec", e))?;
        let mut out = ExecOutcome::default();
        let discard = |_: OutputStream, _: &[u8]| {};
        let read = async {
            let mut code = None;
            while let Some(msg) = channel.wait().await {
                match msg {
                    ChannelMsg::Data { data } => out.take(OutputStream::Stdout, &data, cap, &discard),
                    ChannelMsg::ExtendedData { data, ext: 1 } => out.take(OutputStream::Stderr, &data, cap, &discard),
                    ChannelMsg::ExitStatus { exit_status } => code = Some(exit_status as i64),
                    ChannelMsg::ExitSignal { signal_name, .. } => code = Some(128 + signal_number(&signal_name)),
                    _ => {}
                }
            }
            code
        };
        let code = tokio::time::timeout(deadline, read).await.map_err(|_| ssh_err("command", "timed out"))?;
        Ok((code, out.stdout, out.stderr))
    }

    pub async fn close(self) {
        // A peer that stopped answering must not hold the caller.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.handle.disconnect(russh::Disconnect::ByApplication, "", "en")).await;
    }
}

fn signal_number(s: &Sig) -> i64 {
    match s {
        Sig::HUP => 1,
        Sig::INT => 2,
        Sig::QUIT => 3,
        Sig::ILL => 4,
        Sig::ABRT => 6,
        Sig::FPE => 8,
        Sig::KILL => 9,
        Sig::USR1 => 10,
        Sig::SEGV => 11,
        Sig::PIPE => 13,
        Sig::ALRM => 14,
        Sig::TERM => 15,
        Sig::Custom(_) => 0,
    }
}

/// Takes the wrapper's marker line out of stderr: everything before it (a login shell's
/// noise) and after it is the command's; held back at most [`MARKER_WINDOW`] bytes.
#[derive(Default)]
struct Marker {
    held: Vec<u8>,
    done: bool,
    pgid: Option<u32>,
}

impl Marker {
    fn push(&mut self, data: &[u8]) -> Vec<u8> {
        if self.done {
            return data.to_vec();
        }
        self.held.extend_from_slice(data);
        let text = &self.held;
        let needle = PGID_MARKER.as_bytes();
        if let Some(at) = text.windows(needle.len()).position(|w| w == needle) {
            if let Some(nl) = text[at..].iter().position(|b| *b == b'\n') {
                let value = &text[at + needle.len()..at + nl];
                self.pgid = std::str::from_utf8(value).ok().and_then(|v| v.trim().parse().ok()).filter(|p| *p > 1);
                let mut released = text[..at].to_vec();
                released.extend_from_slice(&text[at + nl + 1..]);
                self.held.clear();
                self.done = true;
                return released;
            }
        }
        if self.held.len() > MARKER_WINDOW {
            self.done = true;
            return std::mem::take(&mut self.held);
        }
        Vec::new()
    }

    fn finish(&mut self) -> Vec<u8> {
        self.done = true;
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_is_taken_out_of_stderr_wherever_it_comes() {
        let mut m = Marker::default();
        assert!(m.push(b"motd line\nmolecule-exec-").is_empty());
        assert_eq!(m.push(b"pgid=4242\nerr1\n"), b"motd line\nerr1\n");
        assert_eq!(m.pgid, Some(4242));
        assert_eq!(m.push(b"more"), b"more");

        let mut m = Marker::default();
        let noise = vec![b'x'; MARKER_WINDOW + 1];
        assert_eq!(m.push(&noise), noise, "no marker: everything is released, nothing lost");
        assert_eq!(m.pgid, None);

        let mut m = Marker::default();
        assert!(m.push(b"partial").is_empty());
        assert_eq!(m.finish(), b"partial");
    }

    #[test]
    fn a_pinned_key_is_compared_without_its_comment() {
        assert_eq!(openssh_key_body("ssh-ed25519 AAAAC3Nz root@host"), "ssh-ed25519 AAAAC3Nz");
        assert_eq!(openssh_key_body("ssh-ed25519 AAAAC3Nz"), "ssh-ed25519 AAAAC3Nz");
    }

    #[test]
    fn the_boot_keys_are_read_from_the_console() {
        let console = "cloud-init: ok\n-----BEGIN SSH HOST KEY KEYS-----\necdsa-sha2-nistp256 AAAAE2Vj root@ip-10-0-0-1\n\
                       ssh-ed25519 AAAAC3Nz root@ip-10-0-0-1\n-----END SSH HOST KEY KEYS-----\nlogin:";
        assert_eq!(console_host_keys(console), Some(vec!["ecdsa-sha2-nistp256 AAAAE2Vj".to_string(), "ssh-ed25519 AAAAC3Nz".to_string()]));
        assert_eq!(console_host_keys("no block here"), None);
        assert_eq!(console_host_keys("-----BEGIN SSH HOST KEY KEYS-----\ngarbage\n"), None, "an unterminated block lists nothing");
        assert_eq!(console_host_keys("-----BEGIN SSH HOST KEY KEYS-----\n-----END SSH HOST KEY KEYS-----"), None);
    }

    #[test]
    fn every_key_is_new() {
        let a = ephemeral_key().unwrap().public_key().to_openssh().unwrap();
        let b = ephemeral_key().unwrap().public_key().to_openssh().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("ssh-ed25519 ") && a.len() >= 80, "EC2 Instance Connect wants a real OpenSSH key: {a}");
    }
}
