//! Commands on an instance over SSH (J5 exec, J4 rescue reads), the way EC2 Instance
//! Connect works: a fresh Ed25519 key per session, pushed with SendSSHPublicKey (EC2
//! accepts it for 60 s), then an SSH connection that authenticates with it. No key is
//! stored anywhere; a leaked one is useless a minute later.
//!
//! Host keys: trust on first use, per instance id. The key the instance presents on the
//! first connection is pinned ([`InstanceStore::pin_host_key`]); every later connection
//! to that instance must present the same key, or it is refused (a typed error, logged).
//! An instance id is never reused by EC2, so a pin never outlives its machine. The window
//! is the first connection: an attacker already inside the VPC path at that moment could
//! be pinned instead — the same trust `ssh` gives a new host, never "accept anything".

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

/// Where and as whom to connect.
pub struct Target<'a> {
    pub instance_id: &'a str,
    /// `host:port`.
    pub address: &'a str,
    pub user: &'a str,
}

/// Checks the server's key against the instance's pin, pinning it on first use.
struct HostKeyCheck {
    store: Arc<dyn InstanceStore>,
    instance_id: String,
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
        if presented.is_empty() {
            *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some("no plain host key presented".into());
            return Ok(false);
        }
        match self.store.pin_host_key(&self.instance_id, &presented).await {
            Ok(pinned) if pinned == presented => Ok(true),
            Ok(_) => {
                tracing::error!(instance_id = self.instance_id, "SSH HOST KEY CHANGED for this instance: connection refused");
                *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some("the instance's host key changed since first use".into());
                Ok(false)
            }
            Err(e) => {
                *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("host key pin unavailable: {e}"));
                Ok(false)
            }
        }
    }
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
        let check = HostKeyCheck { store, instance_id: t.instance_id.to_string(), refused: refused.clone() };
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
                    Some(why) => BackendError::engine(495, &format!("SSH host key refused: {why}")),
                    None => ssh_err("connect", e),
                });
            }
            Ok(Ok(v)) => v,
        };
        if !auth.success() {
            return Err(BackendError::engine(401, "SSH: the instance refused the pushed key"));
        }
        Ok(Session { handle })
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
        let script = format!(
            "echo \"{PGID_MARKER}$$\" >&2; exec timeout -s KILL {} \"$@\"",
            (deadline + REMOTE_BACKSTOP).as_secs()
        );
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
            End::Exited(code) => {
                out.exit_code = code;
                Ok(out)
            }
            End::TimedOut | End::Stopped => {
                out.timed_out = matches!(end, End::TimedOut);
                out.interrupted = matches!(end, End::Stopped);
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
            ch.exec(true, format!("kill -KILL -{pgid}")).await?;
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
        let _ = self.handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
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
    fn every_key_is_new() {
        let a = ephemeral_key().unwrap().public_key().to_openssh().unwrap();
        let b = ephemeral_key().unwrap().public_key().to_openssh().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("ssh-ed25519 ") && a.len() >= 80, "EC2 Instance Connect wants a real OpenSSH key: {a}");
    }
}
