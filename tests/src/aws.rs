//! What the EC2 tests run against, all on 127.0.0.1 (NOTES: never a private address):
//!
//! - [`Moto`]: moto's AWS API server (EC2 and EC2 Instance Connect), one per test;
//! - [`AwsProxy`]: a recording proxy in front of it. It keeps every call (action and
//!   parameters), injects faults on demand (an error status, an unreadable answer), can
//!   stand in a console text of the test's choosing, and plays EC2 Instance Connect's
//!   part: the key a SendSSHPublicKey pushes lands in the local sshd's authorized_keys;
//! - [`Sshd`]: an OpenSSH server on a free loopback port, as the user [`SSH_USER`], with
//!   its own host key (which a test can rotate).

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{Proc, eventually, free_port};

/// The OS user the instances' SSH logins use (created on first use).
pub const SSH_USER: &str = "molecule-ssh";

/// moto's server: `MOLECULE_MOTO_SERVER`, or the virtualenv `tests/run.sh` installs.
fn moto_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MOLECULE_MOTO_SERVER") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/molecule-moto/bin/moto_server")
}

pub struct Moto {
    pub url: String,
    _proc: Proc,
}

impl Moto {
    pub async fn start() -> Moto {
        let bin = moto_server_bin();
        assert!(bin.exists(), "{} is missing: tests/run.sh installs moto", bin.display());
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let proc = Proc::spawn(cmd, "moto");
        let addr = format!("127.0.0.1:{port}");
        eventually(Duration::from_secs(30), "moto to answer", || async {
            crate::http_get(&addr, "/moto-api/").await.ok().filter(|(s, _)| *s == 200).map(|_| ())
        })
        .await;
        Moto { url: format!("http://{addr}"), _proc: proc }
    }
}

/// One call that reached the proxy.
#[derive(Clone, Debug)]
pub struct Call {
    pub action: String,
    /// Query parameters (EC2) or top-level JSON fields (EC2 Instance Connect).
    pub params: HashMap<String, String>,
    /// What the caller got.
    pub status: u16,
}

impl Call {
    /// Values of the numbered parameters `prefix.1`, `prefix.2`, … in order.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        (1..).map_while(|i| self.params.get(&format!("{prefix}.{i}")).cloned()).collect()
    }

    /// The `key = value` tags of the RunInstances tag specification for `resource`.
    pub fn tags(&self, resource: &str) -> HashMap<String, String> {
        for s in 1.. {
            let Some(kind) = self.params.get(&format!("TagSpecification.{s}.ResourceType")) else { break };
            if kind == resource {
                return (1..)
                    .map_while(|t| {
                        let k = self.params.get(&format!("TagSpecification.{s}.Tag.{t}.Key"))?;
                        let v = self.params.get(&format!("TagSpecification.{s}.Tag.{t}.Value")).cloned().unwrap_or_default();
                        Some((k.clone(), v))
                    })
                    .collect();
            }
        }
        HashMap::new()
    }
}

/// A fault the proxy answers instead of moto.
#[derive(Clone, Debug)]
pub enum Fault {
    /// This HTTP status with an AWS error body (code `InternalError`).
    Status(u16),
    /// 200 with a body that is not the protocol's.
    Garbage,
    /// An AWS error of this status, code and message.
    Error(u16, &'static str, String),
    /// The call goes through to moto after this long.
    Delay(Duration),
}

#[derive(Default)]
struct ProxyState {
    upstream: String,
    /// Every request as it arrives (action names), before any fault or answer.
    arrived: Mutex<Vec<String>>,
    calls: Mutex<Vec<Call>>,
    faults: Mutex<HashMap<String, VecDeque<Fault>>>,
    authorized_keys: Option<PathBuf>,
    console: Mutex<Option<Vec<u8>>>,
}

pub struct AwsProxy {
    pub url: String,
    state: Arc<ProxyState>,
}

impl AwsProxy {
    /// A proxy to `upstream`; keys pushed with SendSSHPublicKey are appended to
    /// `authorized_keys` when given.
    pub async fn start(upstream: &str, authorized_keys: Option<PathBuf>) -> AwsProxy {
        let state = Arc::new(ProxyState { upstream: upstream.trim_end_matches('/').to_string(), authorized_keys, ..Default::default() });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let st = state.clone();
        let app = axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let st = st.clone();
            async move { handle(st, method, uri, headers, body).await }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        AwsProxy { url, state }
    }

    /// The next `n` calls of `action` get `fault`.
    pub fn fail(&self, action: &str, n: usize, fault: Fault) {
        let mut f = self.state.faults.lock().unwrap();
        let q = f.entry(action.to_string()).or_default();
        q.extend(std::iter::repeat_n(fault, n));
    }

    /// Drops the faults not yet used (the SDK retries some failures, not others).
    pub fn clear_faults(&self) {
        self.state.faults.lock().unwrap().clear();
    }

    /// GetConsoleOutput answers with this text (base64-encoded, as EC2 does).
    pub fn set_console(&self, text: Vec<u8>) {
        *self.state.console.lock().unwrap() = Some(text);
    }

    /// How many calls of `action` have arrived (answered or not yet).
    pub fn arrived(&self, action: &str) -> usize {
        self.state.arrived.lock().unwrap().iter().filter(|a| *a == action).count()
    }

    pub fn calls(&self, action: &str) -> Vec<Call> {
        self.state.calls.lock().unwrap().iter().filter(|c| c.action == action).cloned().collect()
    }
}

fn aws_error(status: u16, code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
         <Message>{message}</Message></Error></Errors><RequestID>test</RequestID></Response>"
    );
    (StatusCode::from_u16(status).unwrap(), [("content-type", "text/xml")], body).into_response()
}

async fn handle(st: Arc<ProxyState>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let (action, params) = match headers.get("x-amz-target").and_then(|v| v.to_str().ok()) {
        Some(target) => {
            let action = target.rsplit('.').next().unwrap_or(target).to_string();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let params = json
                .as_object()
                .map(|o| o.iter().filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string()))).collect())
                .unwrap_or_default();
            (action, params)
        }
        None => {
            let mut params: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
            if let Some(q) = uri.query() {
                params.extend(url::form_urlencoded::parse(q.as_bytes()).into_owned());
            }
            (params.get("Action").cloned().unwrap_or_default(), params)
        }
    };
    st.arrived.lock().unwrap().push(action.clone());
    let record = |status: u16| {
        st.calls.lock().unwrap().push(Call { action: action.clone(), params: params.clone(), status });
    };
    let fault = st.faults.lock().unwrap().get_mut(&action).and_then(|q| q.pop_front());
    match fault {
        Some(Fault::Status(code)) => {
            record(code);
            return aws_error(code, "InternalError", "injected by the test proxy");
        }
        Some(Fault::Error(status, code, message)) => {
            record(status);
            return aws_error(status, code, &message);
        }
        Some(Fault::Garbage) => {
            record(200);
            return (StatusCode::OK, [("content-type", "text/xml")], "this is { not an EC2 answer").into_response();
        }
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        None => {}
    }
    if action == "SendSSHPublicKey" {
        if let (Some(path), Some(key)) = (&st.authorized_keys, params.get("SSHPublicKey")) {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).create(true).open(path).unwrap();
            writeln!(f, "{key}").unwrap();
        }
    }
    if action == "GetConsoleOutput" {
        if let Some(text) = st.console.lock().unwrap().clone() {
            record(200);
            let id = params.get("InstanceId").cloned().unwrap_or_default();
            let body = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<GetConsoleOutputResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">\
                 <requestId>test</requestId><instanceId>{id}</instanceId><timestamp>2026-11-30T00:00:00.000Z</timestamp>\
                 <output>{}</output></GetConsoleOutputResponse>",
                base64::engine::general_purpose::STANDARD.encode(text)
            );
            return (StatusCode::OK, [("content-type", "text/xml")], body).into_response();
        }
    }
    let url = format!("{}{}", st.upstream, uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let mut req = reqwest::Client::new().request(reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap(), url);
    for (k, v) in headers.iter() {
        if k != "host" && k != "content-length" {
            req = req.header(k.as_str(), v.as_bytes());
        }
    }
    match req.body(body.to_vec()).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            record(status);
            let ct = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("text/xml").to_string();
            let bytes = r.bytes().await.unwrap_or_default();
            (StatusCode::from_u16(status).unwrap(), [("content-type", ct)], bytes).into_response()
        }
        Err(e) => {
            record(502);
            (StatusCode::BAD_GATEWAY, format!("proxy: {e}")).into_response()
        }
    }
}

/// Creates [`SSH_USER`] when missing: a login shell, no password, not locked (sshd
/// without PAM refuses a locked account even with a key).
pub fn ensure_ssh_user() {
    let exists = || Command::new("id").arg("-u").arg(SSH_USER).output().map(|o| o.status.success()).unwrap_or(false);
    if !exists() {
        // Tests run in parallel: another may create it first.
        let _ = Command::new("useradd").args(["--system", "--create-home", "--shell", "/bin/sh", SSH_USER]).status();
        assert!(exists(), "could not create the user {SSH_USER} (tests/run.sh runs as root)");
    }
    let _ = Command::new("usermod").args(["-p", "*", SSH_USER]).status();
}

pub struct Sshd {
    /// `127.0.0.1:port`.
    pub addr: String,
    /// World-readable directory of its files (the user reads authorized_keys here).
    pub dir: PathBuf,
    pub authorized_keys: PathBuf,
    port: u16,
    proc: Option<Proc>,
}

impl Sshd {
    pub async fn start() -> Sshd {
        ensure_ssh_user();
        let dir = std::env::temp_dir().join(format!("molecule-sshd-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        set_mode(&dir, 0o755);
        let authorized_keys = dir.join("authorized_keys");
        std::fs::write(&authorized_keys, "").unwrap();
        set_mode(&authorized_keys, 0o644);
        std::fs::create_dir_all("/run/sshd").unwrap();
        let mut s = Sshd { addr: String::new(), dir, authorized_keys, port: free_port(), proc: None };
        s.addr = format!("127.0.0.1:{}", s.port);
        s.new_host_key();
        s.run().await;
        s
    }

    fn new_host_key(&self) {
        let key = self.dir.join("host_ed25519");
        let _ = std::fs::remove_file(&key);
        let _ = std::fs::remove_file(self.dir.join("host_ed25519.pub"));
        let st = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key).status().unwrap();
        assert!(st.success(), "ssh-keygen");
    }

    async fn run(&mut self) {
        let config = self.dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_ed25519\nPidFile {dir}/sshd.pid\n\
                 AuthorizedKeysFile {keys}\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nAllowUsers {SSH_USER}\nMaxStartups 100\n",
                port = self.port,
                dir = self.dir.display(),
                keys = self.authorized_keys.display(),
            ),
        )
        .unwrap();
        let mut cmd = Command::new("/usr/sbin/sshd");
        cmd.arg("-D").arg("-e").arg("-f").arg(&config);
        self.proc = Some(Proc::spawn(cmd, "sshd"));
        let addr = self.addr.clone();
        eventually(Duration::from_secs(10), "sshd to listen", || async { tokio::net::TcpStream::connect(&addr).await.ok().map(|_| ()) })
            .await;
    }

    /// Restarts with a new host key: what a man in the middle would present.
    pub async fn rotate_host_key(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
        self.new_host_key();
        self.run().await;
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn set_mode(p: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// What an instance's user-data says: the token, and each `KEY=value` of its env file.
pub struct UserData {
    pub token: String,
    pub inbound_secret: String,
    pub env: HashMap<String, String>,
}

impl UserData {
    /// Parses the user-data a RunInstances call carried (base64, as sent).
    pub fn from_call(call: &Call) -> UserData {
        let raw = call.params.get("UserData").expect("RunInstances carries user-data");
        let script = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(raw).unwrap()).unwrap();
        let unquote = |w: &str| w.trim_matches('\'').to_string();
        let grab = |file: &str| {
            let re = regex::Regex::new(&format!(r#"printf '%s' (\S+) > "\$CONFIG_DIR/{}""#, regex::escape(file))).unwrap();
            unquote(&re.captures(&script).unwrap_or_else(|| panic!("{file} in user-data")).get(1).unwrap().as_str().to_string())
        };
        let env_re = regex::Regex::new(r#"(?m)^\s*printf '%s\\n' '?([A-Z_]+)=([^'\n]*)'?$"#).unwrap();
        let env = env_re.captures_iter(&script).map(|c| (c[1].to_string(), c[2].to_string())).collect();
        UserData { token: grab(".auth_token"), inbound_secret: grab(".platform_inbound_secret"), env }
    }
}
