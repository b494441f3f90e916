//! The A2A relay end to end (A9–A12b, J5a, J6, S6, X5): the real API and worker pools over
//! a real PostgreSQL, delivering to real agents on 127.0.0.1 — a2a-sdk 0.3.x and 1.x
//! servers (tests/a2a_agents/, in the virtualenvs tests/run.sh makes), the reference echo
//! agent in poll mode, and for dead-agent recovery a workspace on the Docker engine.

use molecule_backends::Backend;
use molecule_backends::docker::{DockerBackend, DockerConfig, container_name};
use molecule_domain::{WorkspaceId, tokens};
use molecule_jobs::{JobKind, Runtime};
use molecule_tests::{Proc, Resp, bin_path, eventually, free_port, http_full, http_get};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Relay {
    db: PgPool,
    addr: String,
    org: String,
    rt: Option<Runtime>,
}

impl Relay {
    /// API (loopback agent URLs allowed: every agent here is on 127.0.0.1) and worker pools
    /// for those kinds (None: all of them; empty: none).
    async fn start(backend: Arc<dyn Backend>, pools: Option<&[JobKind]>) -> Relay {
        let p = molecule_tests::Platform::start(backend, pools.unwrap_or(&JobKind::ALL)).await;
        Relay { db: p.db, addr: p.addr, org: p.org, rt: p.rt }
    }

    async fn api_only() -> Relay {
        Relay::start(Arc::new(molecule_backends::NoBackend), Some(&[])).await
    }

    async fn req(&self, method: &str, path: &str, bearer: &str, body: Option<&Value>, headers: &[(&str, &str)]) -> Resp {
        let body = body.map(Value::to_string);
        http_full(&self.addr, method, path, Some(bearer), body.as_deref(), headers, Duration::from_secs(30)).await
    }

    /// An `external` workspace in `mode` and a token for its agent (A12b).
    async fn external(&self, name: &str, mode: &str) -> (String, String) {
        let r = self
            .req("POST", "/workspaces", &self.org, Some(&json!({"name": name, "runtime": "external", "delivery_mode": mode})), &[])
            .await;
        assert_eq!(r.status, 202, "{}", r.body);
        let ws = r.json()["workspace"]["id"].as_str().unwrap().to_string();
        let t = self.req("POST", &format!("/workspaces/{ws}/tokens"), &self.org, None, &[]).await;
        assert_eq!(t.status, 201, "{}", t.body);
        (ws, t.json()["token"].as_str().unwrap().to_string())
    }

    /// Registers an agent; returns the registration answer (with the inbound secret).
    async fn register(&self, token: &str, body: Value) -> Value {
        let r = self.req("POST", "/registry/register", token, Some(&body), &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    }

    async fn send(&self, bearer: &str, target: &str, body: &Value) -> Resp {
        self.req("POST", &format!("/workspaces/{target}/a2a"), bearer, Some(body), &[]).await
    }

    /// Sends and expects it queued (202); returns the queue_id.
    async fn queue(&self, bearer: &str, target: &str, body: &Value) -> String {
        let r = self.send(bearer, target, body).await;
        assert_eq!(r.status, 202, "{}", r.body);
        r.json()["queue_id"].as_str().unwrap().to_string()
    }

    async fn lookup(&self, bearer: &str, ws: &str, queue_id: &str) -> Resp {
        self.req("GET", &format!("/workspaces/{ws}/a2a/queue/{queue_id}"), bearer, None, &[]).await
    }

    /// Waits for a delivery to reach one of `statuses`.
    async fn wait_for(&self, ws: &str, queue_id: &str, statuses: &[&str], within: Duration) -> Value {
        eventually(within, &format!("delivery {queue_id} to be one of {statuses:?}"), || async {
            let v = self.lookup(&self.org, ws, queue_id).await.json();
            statuses.contains(&v["status"].as_str().unwrap_or("")).then_some(v)
        })
        .await
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string())).fetch_one(&self.db).await.unwrap()
    }

    async fn stop(mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown().await;
        }
    }
}

fn message_send(text: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": "req-1", "method": "message/send",
           "params": {"message": {"kind": "message", "role": "user", "messageId": format!("m-{text}"), "parts": [{"kind": "text", "text": text}]}}})
}

/// A real a2a-sdk agent server (`generation`: "v03" or "v10") on `port`, refusing callers
/// without `secret`.
fn sdk_agent(generation: &str, port: u16, secret: &str) -> Proc {
    let venv = std::env::var(format!("MOLECULE_A2A_{}", generation.to_uppercase()))
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/molecule-a2a").join(generation));
    let python = venv.join("bin/python");
    assert!(python.exists(), "{} is missing: tests/run.sh makes the a2a-sdk virtualenvs", python.display());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("a2a_agents/agent_{generation}.py"));
    let mut cmd = Command::new(python);
    cmd.arg(script).arg(port.to_string()).env("INBOUND_SECRET", secret);
    Proc::spawn(cmd, &format!("a2a-agent-{generation}"))
}

async fn wait_listening(port: u16) {
    let addr = format!("127.0.0.1:{port}");
    eventually(Duration::from_secs(60), &format!("an agent listening on {addr}"), || async {
        matches!(http_get(&addr, "/.well-known/agent-card.json").await, Ok((200, _))).then_some(())
    })
    .await
}

/// The JSON the test agents put in their reply's text: what they received.
fn seen_by_agent(reply_text: &str) -> Value {
    serde_json::from_str(reply_text).unwrap_or_else(|e| panic!("agent reply is not its JSON record ({e}): {reply_text}"))
}

// ---------------------------------------------------------------------------------------
// J5a: the corpus, replayed through the real route.

fn corpus(dir: &str) -> Vec<(String, Value)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("a2a_corpus").join(dir);
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_stem().unwrap().to_string_lossy().to_string(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The body to send: an entry without its `_` metadata (a batch sits under `_body`).
fn body_of(entry: &Value) -> Value {
    if let Some(b) = entry.get("_body") {
        return b.clone();
    }
    let mut o = entry.as_object().unwrap().clone();
    o.retain(|k, _| !k.starts_with('_'));
    Value::Object(o)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_corpus_replays_through_the_route() {
    let relay = Relay::api_only().await;
    let (target, _) = relay.external("target", "push").await;
    let valid = corpus("valid");
    let invalid = corpus("invalid");

    // Coverage: both sides of every bridge, and metadata on every entry.
    for prefix in ["v0_2", "v0_3", "v1_0"] {
        assert!(valid.iter().any(|(n, _)| n.starts_with(prefix)), "the corpus has no valid {prefix} entry");
    }
    for (name, e) in valid.iter().chain(&invalid) {
        for key in ["_comment", "_added", "_source"] {
            assert!(e[key].as_str().is_some_and(|s| !s.is_empty()), "{name} lacks {key}");
        }
    }

    for (name, entry) in &valid {
        let r = relay.send(&relay.org, &target, &body_of(entry)).await;
        assert_eq!(r.status, 202, "valid/{name}: {}", r.body);
        let qid: uuid::Uuid = r.json()["queue_id"].as_str().unwrap().parse().unwrap();
        let (body, generation): (Value, String) = sqlx::query_as("SELECT body, caller_generation FROM a2a_queue WHERE queue_id = $1")
            .bind(qid)
            .fetch_one(&relay.db)
            .await
            .unwrap();
        let expected_generation = if name.starts_with("v0_2") {
            "0.2"
        } else if name.starts_with("v1_0") {
            "1.0"
        } else {
            "0.3"
        };
        assert_eq!(generation, expected_generation, "valid/{name}");
        let m = &body["params"]["message"];
        let parts = m["parts"].as_array().unwrap_or_else(|| panic!("valid/{name}: no parts in {body}"));
        assert!(!parts.is_empty(), "valid/{name}");
        assert!(parts.iter().all(|p| p["kind"].is_string()), "valid/{name}: canonical parts carry a kind: {body}");
        assert!(m["messageId"].as_str().is_some_and(|s| !s.is_empty()), "valid/{name}");
        assert!(m.get("content").is_none(), "valid/{name}: content left in {body}");
        assert!(body["params"].get("expires_in_seconds").is_none() && body["params"].get("idempotency_key").is_none());
        assert!(["message/send", "tasks/get", "tasks/cancel"].contains(&body["method"].as_str().unwrap()), "valid/{name}");
    }
    let queued = relay.count("SELECT count(*) FROM a2a_queue").await;
    assert_eq!(queued, valid.len() as i64);

    for (name, entry) in &invalid {
        let r = relay.send(&relay.org, &target, &body_of(entry)).await;
        assert_eq!(r.status as i64, entry["_expect_status"].as_i64().unwrap(), "invalid/{name}: {}", r.body);
        let err = &r.json()["error"];
        let want = entry["_expect_error"].as_str().unwrap();
        assert!(err["message"].as_str().unwrap_or("").contains(want), "invalid/{name}: {err} does not say {want:?}");
        assert!(err["code"].as_i64().is_some_and(|c| (-32700..=-32600).contains(&c)), "invalid/{name}: a JSON-RPC code: {err}");
    }
    // Bodies that are not JSON at all.
    for raw in ["{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"message/se", "not json", "", "   \n"] {
        let r =
            http_full(&relay.addr, "POST", &format!("/workspaces/{target}/a2a"), Some(&relay.org), Some(raw), &[], Duration::from_secs(10))
                .await;
        assert_eq!(r.status, 400, "{raw:?}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], -32700, "{raw:?}: {}", r.body);
    }
    assert_eq!(relay.count("SELECT count(*) FROM a2a_queue").await, queued, "nothing invalid was queued");
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------
// Both generations of the SDK, each receiving what it speaks.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sdk_generation_receives_the_generation_it_speaks() {
    let relay = Relay::start(Arc::new(molecule_backends::NoBackend), Some(&[JobKind::A2aDispatch])).await;
    let (caller, caller_token) = relay.external("caller", "poll").await;
    let (w03, t03) = relay.external("agent-03", "push").await;
    let (w10, t10) = relay.external("agent-10", "push").await;
    let (p03, p10) = (free_port(), free_port());
    // The 0.3 agent says its version; the 1.x agent's is learned from its card.
    let r03 = relay.register(&t03, json!({"url": format!("http://127.0.0.1:{p03}/"), "a2a_version": "0.3"})).await;
    let r10 = relay.register(&t10, json!({"url": format!("http://127.0.0.1:{p10}/")})).await;
    assert_eq!(r10["a2a_version"], Value::Null, "unknown until the card is read");
    let _a03 = sdk_agent("v03", p03, r03["platform_inbound_secret"].as_str().unwrap());
    let _a10 = sdk_agent("v10", p10, r10["platform_inbound_secret"].as_str().unwrap());
    wait_listening(p03).await;
    wait_listening(p10).await;

    // v0.2 (a content string) → the 0.3 agent: the SDK's own validation accepts it.
    let v02 = json!({"jsonrpc": "2.0", "id": 41, "method": "message/send",
                     "params": {"message": {"role": "user", "content": "hello from v0.2"}}});
    let q1 = relay.queue(&caller_token, &w03, &v02).await;
    // v0.3 → the 1.x agent (SendMessage, ROLE_USER, no kind, A2A-Version: 1.0).
    let q2 = relay.queue(&caller_token, &w10, &message_send("hello from v0.3")).await;
    // v1.0 → the 0.3 agent, and the reply comes back in v1.0.
    let v10 = json!({"jsonrpc": "2.0", "id": "x", "method": "SendMessage",
                     "params": {"message": {"messageId": "mid-10", "role": "ROLE_USER", "parts": [{"text": "hello from v1.0"}]}}});
    let q3 = relay.queue(&caller_token, &w03, &v10).await;

    let d1 = relay.wait_for(&w03, &q1, &["completed", "failed"], Duration::from_secs(30)).await;
    assert_eq!(d1["status"], "completed", "{d1}");
    assert_eq!(d1["agent_version"], "0.3");
    // The caller wrote v0.2: it reads a v0.3 reply, under its own request id.
    let reply = &d1["response"];
    assert_eq!(reply["id"], 41);
    assert_eq!((reply["result"]["kind"].as_str(), reply["result"]["role"].as_str()), (Some("message"), Some("agent")), "{reply}");
    let seen = seen_by_agent(reply["result"]["parts"][0]["text"].as_str().unwrap());
    assert_eq!(seen, json!({"sdk": "0.3", "role": "user", "kinds": ["text"], "text": "hello from v0.2", "message_id": seen["message_id"]}));
    assert!(seen["message_id"].as_str().is_some_and(|s| !s.is_empty()), "a messageId was filled in");

    let d2 = relay.wait_for(&w10, &q2, &["completed", "failed"], Duration::from_secs(30)).await;
    assert_eq!(d2["status"], "completed", "{d2}");
    assert_eq!(d2["agent_version"], "1.0");
    // The 1.x agent answered in v1.0; the v0.3 caller reads it in v0.3.
    let reply = &d2["response"]["result"];
    assert_eq!(
        (reply["kind"].as_str(), reply["role"].as_str(), reply["parts"][0]["kind"].as_str()),
        (Some("message"), Some("agent"), Some("text")),
        "{reply}"
    );
    let seen = seen_by_agent(reply["parts"][0]["text"].as_str().unwrap());
    assert_eq!(seen["sdk"], "1.x");
    assert_eq!(seen["role"], "ROLE_USER");
    assert_eq!(seen["kinds"], json!(["text"]));
    assert_eq!(seen["text"], "hello from v0.3");
    assert_eq!(seen["message_id"], "m-hello from v0.3");
    assert_eq!(seen["a2a_version_header"], "1.0");
    let (version, source): (String, String) =
        sqlx::query_as("SELECT a2a_version::text, a2a_version_source FROM workspaces WHERE id = $1::uuid")
            .bind(&w10)
            .fetch_one(&relay.db)
            .await
            .unwrap();
    assert_eq!((version.as_str(), source.as_str()), ("1.0", "card"));

    let d3 = relay.wait_for(&w03, &q3, &["completed", "failed"], Duration::from_secs(30)).await;
    assert_eq!(d3["status"], "completed", "{d3}");
    let reply = &d3["response"]["result"]["message"];
    assert_eq!(reply["role"], "ROLE_AGENT", "a v1.0 caller reads a v1.0 reply: {}", d3["response"]);
    assert!(reply["parts"][0].get("kind").is_none() && reply["parts"][0]["text"].is_string());
    assert_eq!(seen_by_agent(reply["parts"][0]["text"].as_str().unwrap())["message_id"], "mid-10");

    // A default the relay guessed (no card seen) is dropped when the agent does not know
    // the method: the next attempt reads the card and delivers in v1.0.
    sqlx::query("UPDATE workspaces SET a2a_version = '0.3', a2a_version_source = 'default' WHERE id = $1::uuid")
        .bind(&w10)
        .execute(&relay.db)
        .await
        .unwrap();
    let q4 = relay.queue(&caller_token, &w10, &message_send("after a wrong guess")).await;
    let d4 = relay.wait_for(&w10, &q4, &["completed", "failed"], Duration::from_secs(30)).await;
    assert_eq!(
        (d4["status"].as_str(), d4["agent_version"].as_str(), d4["attempts"].as_i64()),
        (Some("completed"), Some("1.0"), Some(2)),
        "{d4}"
    );

    // The caller (a workspace token), the target and the org all read it; the activity
    // record of the delivery is on the target, with the caller as source.
    assert_eq!(relay.lookup(&caller_token, &w03, &q1).await.status, 200);
    assert_eq!(relay.lookup(&caller_token, &caller, &q1).await.status, 200, "through the caller's own id too");
    assert_eq!(relay.lookup(&t03, &w03, &q1).await.status, 200);
    let act = relay.req("GET", &format!("/workspaces/{w03}/activity?type=a2a_dispatch"), &relay.org, None, &[]).await.json();
    assert_eq!(act["items"].as_array().unwrap().len(), 2, "{act}");
    assert_eq!(act["items"][0]["source_id"], caller);
    assert_eq!(act["items"][0]["status"], "200");
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------
// Poll mode: the reference echo agent reads its inbox with since_id.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_agent_in_poll_mode_reads_a_thousand_messages_in_order() {
    const N: usize = 1000;
    let relay = Relay::api_only().await;
    let (sender, sender_token) = relay.external("sender", "poll").await;
    let (echo, echo_token) = relay.external("echo", "poll").await;
    let dir = molecule_tests::temp_dir("echo-poll");
    std::fs::write(dir.join(".auth_token"), &echo_token).unwrap();
    let mut cmd = Command::new(bin_path("molecule-agent"));
    cmd.env("PLATFORM_URL", format!("http://{}", relay.addr))
        .env("CONFIG_DIR", &dir)
        .env("DELIVERY_MODE", "poll")
        .env("POLL_INTERVAL_MS", "50");
    let _agent = Proc::spawn(cmd, "echo-agent-poll");

    // The agent reads while messages keep arriving.
    let started = Instant::now();
    for i in 0..N {
        let body = json!({"jsonrpc": "2.0", "id": i, "method": "message/send",
                          "params": {"message": {"role": "user", "parts": [{"kind": "text", "text": format!("msg-{i:04}")}]}}});
        let r = relay.send(&sender_token, &echo, &body).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["delivery_mode"], "poll");
    }
    eprintln!("{N} messages sent in {:?}", started.elapsed());

    // The echoes come back into the sender's inbox: read them the way an agent would.
    let mut texts: Vec<String> = Vec::new();
    let mut cursor = 0i64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while texts.len() < N {
        assert!(Instant::now() < deadline, "only {} of {N} echoes after 120 s", texts.len());
        let page = relay
            .req("GET", &format!("/workspaces/{sender}/activity?type=a2a_receive&since_id={cursor}&limit=1000"), &sender_token, None, &[])
            .await;
        assert_eq!(page.status, 200, "{}", page.body);
        let page = page.json();
        for item in page["items"].as_array().unwrap() {
            assert_eq!(item["source_id"], echo.as_str());
            assert!(item["id"].as_i64().unwrap() > cursor, "ascending, strictly after the cursor");
            cursor = item["id"].as_i64().unwrap();
            texts.push(item["request_body"]["params"]["message"]["parts"][0]["text"].as_str().unwrap().to_string());
        }
        if page["items"].as_array().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let expected: Vec<String> = (0..N).map(|i| format!("msg-{i:04}")).collect();
    assert_eq!(texts, expected, "every message echoed once, in order");
    // Nothing more trickles in (no doubles).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rest = relay.req("GET", &format!("/workspaces/{sender}/activity?since_id={cursor}"), &sender_token, None, &[]).await.json();
    assert_eq!(rest["items"], json!([]), "no reply twice");
    // The agent's own inbox: the N messages in the order they were sent.
    let inbox = relay.req("GET", &format!("/workspaces/{echo}/activity?since_id=0&limit=1000"), &echo_token, None, &[]).await.json();
    let got: Vec<&str> = inbox["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["request_body"]["params"]["message"]["parts"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(got, expected.iter().map(String::as_str).collect::<Vec<_>>());
    eprintln!("{N} messages read and echoed in {:?}", started.elapsed());
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------
// J6: a 502 from a dead agent restarts it; from a live agent it is only recorded.

/// Answers every request with 502, like an edge whose origin is gone.
async fn bad_gateway() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = s.read(&mut buf).await;
                let body = "error code: 502";
                let _ = s
                    .write_all(
                        format!("HTTP/1.1 502 Bad Gateway\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes(),
                    )
                    .await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_502_from_a_dead_agent_restarts_it_and_from_a_live_one_is_recorded() {
    let backend = DockerBackend::connect(DockerConfig::local()).await.expect("a Docker engine (tests/run.sh starts one)");
    // No restart pool: the restart jobs this queues stay waiting, to be counted.
    let relay = Relay::start(Arc::new(backend), Some(&[JobKind::Provision, JobKind::Stop, JobKind::A2aDispatch])).await;
    let r = relay.req("POST", "/workspaces", &relay.org, Some(&json!({"name": "dies", "runtime": "echo"})), &[]).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let ws = r.json()["workspace"]["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(30), "the echo workspace online", || async {
        (relay.req("GET", &format!("/workspaces/{ws}"), &relay.org, None, &[]).await.json()["status"] == "online").then_some(())
    })
    .await;
    // Its agent now sits behind something answering 502 (a second token, so the
    // container's own keeps working).
    let t = relay.req("POST", &format!("/workspaces/{ws}/tokens"), &relay.org, Some(&json!({"keep_existing": true})), &[]).await;
    let token = t.json()["token"].as_str().unwrap().to_string();
    let port = bad_gateway().await;
    relay.register(&token, json!({"url": format!("http://127.0.0.1:{port}/"), "a2a_version": "0.3"})).await;

    // Alive: the 502 is recorded as is; nothing restarts.
    let q = relay.queue(&relay.org, &ws, &message_send("are you there")).await;
    let d = relay.wait_for(&ws, &q, &["completed", "failed"], Duration::from_secs(30)).await;
    assert_eq!(
        (d["status"].as_str(), d["response_status"].as_i64(), d["restarting"].as_bool()),
        (Some("failed"), Some(502), Some(false)),
        "{d}"
    );
    let restarts = format!("SELECT count(*) FROM apalis.jobs WHERE job_type = 'restart' AND workspace_id = '{ws}'");
    assert_eq!(relay.count(&restarts).await, 0);
    assert_eq!(relay.req("GET", &format!("/workspaces/{ws}"), &relay.org, None, &[]).await.json()["status"], "online");

    // Dead: its container is gone. Two messages, one restart.
    let (ok, _) = {
        let out = Command::new("docker").args(["rm", "-f", &container_name(ws.parse::<WorkspaceId>().unwrap())]).output().unwrap();
        (out.status.success(), ())
    };
    assert!(ok, "removed the container out of band");
    let q1 = relay.queue(&relay.org, &ws, &message_send("hello?")).await;
    let q2 = relay.queue(&relay.org, &ws, &message_send("anyone?")).await;
    for q in [&q1, &q2] {
        let d = relay.wait_for(&ws, q, &["completed", "failed"], Duration::from_secs(30)).await;
        assert_eq!(d["status"], "failed", "{d}");
        assert_eq!(d["restarting"], true, "{d}");
        assert_eq!(d["retry_after"], 15, "{d}");
        assert_eq!(d["response_status"], 502, "{d}");
    }
    assert_eq!(relay.req("GET", &format!("/workspaces/{ws}"), &relay.org, None, &[]).await.json()["status"], "offline");
    assert_eq!(relay.count(&restarts).await, 1, "one restart for two messages");
    let events = relay.req("GET", &format!("/workspaces/{ws}/events"), &relay.org, None, &[]).await.json();
    assert!(events.as_array().unwrap().iter().any(|e| e["event_type"] == "WORKSPACE_OFFLINE"), "{events}");

    let del = relay.req("DELETE", &format!("/workspaces/{ws}"), &relay.org, None, &[]).await;
    assert_eq!(del.status, 202);
    for j in del.json()["job_ids"].as_array().cloned().unwrap_or_default() {
        let j = j.as_str().unwrap().to_string();
        eventually(Duration::from_secs(30), "the stop job", || async {
            (relay.req("GET", &format!("/jobs/{j}"), &relay.org, None, &[]).await.json()["status"] == "succeeded").then_some(())
        })
        .await;
    }
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------
// Transport failures: backoff, TTL, and delivery once the agent is back.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_retry_with_backoff_then_expire_or_deliver_once_back() {
    let relay = Relay::start(Arc::new(molecule_backends::NoBackend), Some(&[JobKind::A2aDispatch])).await;
    let (ws, token) = relay.external("flaky", "push").await;
    let port = free_port(); // nothing listens here yet
    let reg = relay.register(&token, json!({"url": format!("http://127.0.0.1:{port}/"), "a2a_version": "0.3"})).await;

    // With a TTL of 5 s: retried with backoff, then expired.
    let mut ttl = message_send("short-lived");
    ttl["params"]["expires_in_seconds"] = json!(5);
    let q_ttl = relay.queue(&relay.org, &ws, &ttl).await;
    // Without one: waits for the agent.
    let q_wait = relay.queue(&relay.org, &ws, &message_send("patient")).await;

    let d = relay.wait_for(&ws, &q_ttl, &["expired", "completed", "failed"], Duration::from_secs(30)).await;
    assert_eq!(d["status"], "expired", "{d}");
    let attempts = d["attempts"].as_i64().unwrap();
    assert!(attempts >= 2, "retried before it expired: {d}");
    assert!(d["last_error"].as_str().unwrap().contains("connect"), "{d}");
    // Backoff, not a spin: attempts within 5 s at a 2 s base are few, and spaced.
    assert!(attempts <= 4, "{attempts} attempts in 5 s is not backing off");
    let log: Value = sqlx::query_scalar("SELECT attempt_log FROM apalis.jobs WHERE id = $1")
        .bind(d["job_id"].as_str().unwrap())
        .fetch_one(&relay.db)
        .await
        .unwrap();
    let failed_1: chrono::DateTime<chrono::Utc> = serde_json::from_value(log[0]["failed_at"].clone()).unwrap();
    let started_2: chrono::DateTime<chrono::Utc> = serde_json::from_value(log[1]["started_at"].clone()).unwrap();
    assert!(started_2 - failed_1 >= chrono::Duration::milliseconds(1000), "second attempt waited: {log}");
    // The sweep writes it down; the job itself ends expired.
    molecule_workers::sweeps::a2a_ttl::expire_all(&relay.db).await.unwrap();
    let stored: String =
        sqlx::query_scalar("SELECT status FROM a2a_queue WHERE queue_id = $1::uuid").bind(&q_ttl).fetch_one(&relay.db).await.unwrap();
    assert_eq!(stored, "expired");
    let job = d["job_id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(30), "the dispatch job to end expired", || async {
        (relay.req("GET", &format!("/jobs/{job}"), &relay.org, None, &[]).await.json()["status"] == "expired").then_some(())
    })
    .await;

    // The agent comes back: the patient message is delivered, once.
    let w = relay.lookup(&relay.org, &ws, &q_wait).await.json();
    assert!(w["attempts"].as_i64().unwrap() >= 2 && w["status"] != "completed", "{w}");
    let _agent = sdk_agent("v03", port, reg["platform_inbound_secret"].as_str().unwrap());
    let d = relay.wait_for(&ws, &q_wait, &["completed", "failed", "expired"], Duration::from_secs(90)).await;
    assert_eq!(d["status"], "completed", "{d}");
    assert_eq!(seen_by_agent(d["response"]["result"]["parts"][0]["text"].as_str().unwrap())["text"], "patient");
    let delivered = relay.count(&format!("SELECT count(*) FROM activity_logs WHERE queue_id = '{q_wait}' AND status = '200'")).await;
    let failed =
        relay.count(&format!("SELECT count(*) FROM activity_logs WHERE queue_id = '{q_wait}' AND status = 'transport_error'")).await;
    assert_eq!(delivered, 1);
    assert!(failed >= 1);
    relay.stop().await;
}

/// The relay as production runs it: loopback agent URLs refused (X5) by the API and by the
/// dispatcher alike, except the one the platform assigned (trusted). Dispatch pool only.
async fn strict_relay() -> Relay {
    let (db, _) = molecule_tests::fresh_db().await;
    let addr = molecule_tests::start_api(db.clone(), molecule_tests::strict_auth()).await;
    let mut c = db.acquire().await.unwrap();
    let (_, org) = tokens::create_org(&mut c, "platform").await.unwrap();
    drop(c);
    let deps = molecule_workers::Deps {
        agents: molecule_workers::a2a::AgentClient::new(false).expect("agent client"),
        ..molecule_workers::Deps::minimal(db.clone(), Arc::new(molecule_backends::NoBackend)).unwrap()
    };
    let concurrency = [(JobKind::A2aDispatch, JobKind::A2aDispatch.default_concurrency())].into_iter().collect();
    let specs = molecule_workers::handlers::pool_specs(&deps, &concurrency);
    let cfg =
        molecule_jobs::RuntimeConfig { poll_interval: Duration::from_millis(200), grace: Duration::from_secs(5), ..Default::default() };
    let rt = Runtime::start(db.clone(), cfg, specs);
    Relay { db, addr, org, rt: Some(rt) }
}

/// J6 with X5 as in production: a restart writes the new `assigned_url` (and `provisioning`)
/// before the new agent registers, so `url` still names the old instance — untrusted, on
/// loopback. A message sent then waits for the new agent instead of failing as refused; a
/// workspace online with its registration current and an untrusted loopback URL is still
/// refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_while_its_workspace_restarts_waits_for_the_new_agent() {
    let relay = strict_relay().await;
    // A container workspace; no provision pool runs, so its row is set up as a start would.
    let r = relay.req("POST", "/workspaces", &relay.org, Some(&json!({"name": "restarts", "runtime": "echo"})), &[]).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let ws = r.json()["workspace"]["id"].as_str().unwrap().to_string();
    let t = relay.req("POST", &format!("/workspaces/{ws}/tokens"), &relay.org, None, &[]).await;
    assert_eq!(t.status, 201, "{}", t.body);
    let token = t.json()["token"].as_str().unwrap().to_string();
    let assign = |url: String| {
        let db = relay.db.clone();
        let ws = ws.clone();
        async move {
            sqlx::query("UPDATE workspaces SET assigned_url = $2 WHERE id = $1::uuid").bind(ws).bind(url).execute(&db).await.unwrap();
        }
    };
    let first = free_port();
    let first_url = format!("http://127.0.0.1:{first}");
    assign(first_url.clone()).await;
    let reg = relay.register(&token, json!({"url": first_url, "a2a_version": "0.3"})).await;
    assert_eq!(reg["status"], "online", "{reg}");
    let secret = reg["platform_inbound_secret"].as_str().unwrap().to_string();
    let mut agent = sdk_agent("v03", first, &secret);
    wait_listening(first).await;
    let q = relay.queue(&relay.org, &ws, &message_send("before")).await;
    assert_eq!(relay.wait_for(&ws, &q, &["completed", "failed"], Duration::from_secs(30)).await["status"], "completed");

    // The restart: the old agent is stopped, the new assignment written, not registered yet.
    agent.kill9();
    let second = free_port();
    let second_url = format!("http://127.0.0.1:{second}");
    sqlx::query("UPDATE workspaces SET assigned_url = $2, status = 'provisioning' WHERE id = $1::uuid")
        .bind(&ws)
        .bind(&second_url)
        .execute(&relay.db)
        .await
        .unwrap();
    let q = relay.queue(&relay.org, &ws, &message_send("during the restart")).await;
    let d = eventually(Duration::from_secs(30), "a second attempt or an ending", || async {
        let v = relay.lookup(&relay.org, &ws, &q).await.json();
        (v["attempts"].as_i64().unwrap_or(0) >= 2 || !matches!(v["status"].as_str(), Some("queued" | "dispatched"))).then_some(v)
    })
    .await;
    assert!(matches!(d["status"].as_str(), Some("queued" | "dispatched")), "waits for the new agent: {d}");
    assert!(!d["last_error"].as_str().unwrap_or("").contains("refused"), "{d}");

    // The new agent comes up and registers its assigned URL: the message reaches it.
    let _agent = sdk_agent("v03", second, &secret);
    wait_listening(second).await;
    let reg = relay.register(&token, json!({"url": second_url, "a2a_version": "0.3"})).await;
    assert_eq!(reg["status"], "online", "{reg}");
    let d = relay.wait_for(&ws, &q, &["completed", "failed", "expired"], Duration::from_secs(60)).await;
    assert_eq!(d["status"], "completed", "{d}");
    assert_eq!(seen_by_agent(d["response"]["result"]["parts"][0]["text"].as_str().unwrap())["text"], "during the restart");
    let refused = relay.count(&format!("SELECT count(*) FROM activity_logs WHERE queue_id = '{q}' AND status = 'refused'")).await;
    assert_eq!(refused, 0);

    // Online, registration current, and a URL the platform did not assign on loopback:
    // refused at once, as before.
    sqlx::query("UPDATE workspaces SET url = $2 WHERE id = $1::uuid").bind(&ws).bind(&first_url).execute(&relay.db).await.unwrap();
    let q = relay.queue(&relay.org, &ws, &message_send("to a url nobody assigned")).await;
    let d = relay.wait_for(&ws, &q, &["completed", "failed"], Duration::from_secs(30)).await;
    assert_eq!(d["status"], "failed", "{d}");
    assert!(d["last_error"].as_str().unwrap().contains("refused"), "{d}");
    assert_eq!(d["attempts"], 1, "{d}");
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------
// Idempotency: one row, one delivery.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_twice_is_one_row_and_one_delivery() {
    let relay = Relay::start(Arc::new(molecule_backends::NoBackend), Some(&[JobKind::A2aDispatch])).await;
    let (ws, token) = relay.external("agent", "push").await;
    let (other, other_token) = relay.external("other-caller", "poll").await;
    let port = free_port();
    let reg = relay.register(&token, json!({"url": format!("http://127.0.0.1:{port}/"), "a2a_version": "0.3"})).await;
    let _agent = sdk_agent("v03", port, reg["platform_inbound_secret"].as_str().unwrap());
    wait_listening(port).await;

    let mut with_key = message_send("once");
    with_key["params"]["idempotency_key"] = json!("order-7");
    let a = relay.send(&relay.org, &ws, &with_key).await;
    // The same key as a header, the second time.
    let b = relay
        .req("POST", &format!("/workspaces/{ws}/a2a"), &relay.org, Some(&message_send("once")), &[("Idempotency-Key", "order-7")])
        .await;
    assert_eq!((a.status, b.status), (202, 202), "{} / {}", a.body, b.body);
    let (a, b) = (a.json(), b.json());
    assert_eq!(a["queue_id"], b["queue_id"]);
    assert_eq!((a["duplicate"].as_bool(), b["duplicate"].as_bool()), (Some(false), Some(true)));
    let qid = a["queue_id"].as_str().unwrap();
    relay.wait_for(&ws, qid, &["completed"], Duration::from_secs(30)).await;
    // A third time after delivery: still the same row, nothing sent again.
    let c = relay.send(&relay.org, &ws, &with_key).await.json();
    assert_eq!(c["queue_id"], a["queue_id"]);
    assert_eq!(c["status"], "completed");
    assert_eq!(relay.count(&format!("SELECT count(*) FROM a2a_queue WHERE workspace_id = '{ws}'")).await, 1);
    assert_eq!(relay.count("SELECT count(*) FROM apalis.jobs WHERE job_type = 'a2a_dispatch'").await, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(relay.count(&format!("SELECT count(*) FROM activity_logs WHERE queue_id = '{qid}'")).await, 1, "one delivery");
    // Another caller with the same key is another message (keys are per caller).
    let d = relay.send(&other_token, &ws, &with_key).await.json();
    assert_ne!(d["queue_id"], a["queue_id"]);
    assert_eq!(d["duplicate"], false);
    // Params and header that disagree are refused.
    let mut k2 = message_send("x");
    k2["params"]["idempotency_key"] = json!("k-a");
    let r = relay.req("POST", &format!("/workspaces/{ws}/a2a"), &relay.org, Some(&k2), &[("Idempotency-Key", "k-b")]).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let _ = other;
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------
// A10 lookup: caller, target, same org; nobody else, and nothing leaks.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_is_visible_to_caller_target_and_org_and_the_same_404_to_anyone_else() {
    let relay = Relay::api_only().await;
    let (caller, caller_token) = relay.external("caller", "poll").await;
    let (target, target_token) = relay.external("target", "push").await;
    let (_bystander, bystander_token) = relay.external("bystander", "poll").await;
    let q = relay.queue(&caller_token, &target, &message_send("private")).await;
    let mut c = relay.db.acquire().await.unwrap();
    let (_, other_org) = tokens::create_org(&mut c, "other").await.unwrap();
    drop(c);

    let ok = |r: Resp| {
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    let v = ok(relay.lookup(&caller_token, &target, &q).await);
    assert_eq!((v["caller_id"].as_str(), v["status"].as_str()), (Some(caller.as_str()), Some("queued")));
    ok(relay.lookup(&caller_token, &caller, &q).await);
    ok(relay.lookup(&target_token, &target, &q).await);
    ok(relay.lookup(&relay.org, &target, &q).await);

    let unknown = uuid::Uuid::new_v4().to_string();
    let denied = [
        relay.lookup(&bystander_token, &target, &q).await,
        relay.lookup(&other_org, &target, &q).await,
        relay.lookup(&relay.org, &target, &unknown).await,
        relay.lookup(&caller_token, &target, &unknown).await,
    ];
    let bodies: Vec<String> = denied
        .iter()
        .map(|r| {
            assert_eq!(r.status, 404, "{}", r.body);
            r.body.clone()
        })
        .collect();
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "every refusal reads the same: {bodies:?}");
    assert_eq!(relay.lookup(&relay.org, &target, "not-a-uuid").await.status, 400);
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------
// X5 at delivery: DNS that changes after registration.

/// A name in /etc/hosts for the length of a test (the system resolver reads the file on
/// every lookup). Removed on drop.
struct HostsName {
    name: String,
}

impl HostsName {
    fn new(ip: &str) -> HostsName {
        let h = HostsName { name: format!("a2a-rebind-{}.test", uuid::Uuid::new_v4().simple()) };
        h.point(ip);
        h
    }

    fn point(&self, ip: &str) {
        self.rewrite(Some(ip));
    }

    fn rewrite(&self, ip: Option<&str>) {
        let current = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        let mut lines: Vec<String> = current.lines().filter(|l| !l.ends_with(&format!(" {}", self.name))).map(str::to_string).collect();
        if let Some(ip) = ip {
            lines.push(format!("{ip} {}", self.name));
        }
        // Written in place: /etc/hosts may be a bind mount, which a rename cannot replace.
        std::fs::write("/etc/hosts", lines.join("\n") + "\n").expect("tests run as root and may edit /etc/hosts");
    }
}

impl Drop for HostsName {
    fn drop(&mut self) {
        self.rewrite(None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_that_resolves_to_a_private_or_metadata_address_at_delivery_is_refused() {
    let relay = Relay::start(Arc::new(molecule_backends::NoBackend), Some(&[JobKind::A2aDispatch])).await;
    let (ws, token) = relay.external("rebinding", "push").await;
    let host = HostsName::new("127.0.0.1");
    let port = free_port();
    // Registration resolves the name to loopback (allowed here): accepted.
    let reg = relay.register(&token, json!({"url": format!("http://{}:{port}/", host.name), "a2a_version": "0.3"})).await;
    let _agent = sdk_agent("v03", port, reg["platform_inbound_secret"].as_str().unwrap());
    wait_listening(port).await;
    let q = relay.queue(&relay.org, &ws, &message_send("via a name")).await;
    assert_eq!(relay.wait_for(&ws, &q, &["completed", "failed"], Duration::from_secs(30)).await["status"], "completed");

    for (ip, why) in [("10.255.0.7", "private"), ("169.254.169.254", "metadata")] {
        host.point(ip);
        let q = relay.queue(&relay.org, &ws, &message_send("after the name moved")).await;
        let d = relay.wait_for(&ws, &q, &["completed", "failed"], Duration::from_secs(30)).await;
        assert_eq!(d["status"], "failed", "{ip}: {d}");
        let err = d["last_error"].as_str().unwrap();
        assert!(err.contains("refused") && err.contains(why), "{ip}: {err}");
        assert!(!err.contains(ip), "the error names no resolved address: {err}");
        assert_eq!(d["attempts"], 1, "a refusal is not retried: {d}");
    }
    drop(host);
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------
// The API's edges: caller identity, activity filters, tokens, registration, body cap.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_identity_comes_from_the_bearer_and_a_disagreeing_header_is_refused() {
    let relay = Relay::api_only().await;
    let (inbox, inbox_token) = relay.external("inbox", "poll").await;
    let (caller, caller_token) = relay.external("caller", "poll").await;
    let (other, _) = relay.external("other", "poll").await;
    let path = format!("/workspaces/{inbox}/a2a");
    let body = message_send("who am i");

    assert_eq!(relay.send(&caller_token, &inbox, &body).await.status, 200);
    let r = relay.req("POST", &path, &caller_token, Some(&body), &[("X-Workspace-ID", &other)]).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(relay.req("POST", &path, &caller_token, Some(&body), &[("X-Workspace-ID", &caller)]).await.status, 200);
    // An org token may speak for a workspace of its org, or for nobody (the canvas).
    assert_eq!(relay.req("POST", &path, &relay.org, Some(&body), &[("X-Workspace-ID", &other)]).await.status, 200);
    assert_eq!(relay.send(&relay.org, &inbox, &body).await.status, 200);
    let r = relay.req("POST", &path, &relay.org, Some(&body), &[("X-Workspace-ID", &uuid::Uuid::new_v4().to_string())]).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(relay.req("POST", &path, &relay.org, Some(&body), &[("X-Workspace-ID", "nope")]).await.status, 400);

    let rows = relay.req("GET", &format!("/workspaces/{inbox}/activity?since_id=0"), &inbox_token, None, &[]).await.json();
    let sources: Vec<Value> = rows["items"].as_array().unwrap().iter().map(|i| i["source_id"].clone()).collect();
    assert_eq!(sources, vec![json!(caller), json!(caller), json!(other), Value::Null]);
    // A poll inbox row holds the request in the agent's generation, ready to read.
    assert_eq!(rows["items"][0]["request_body"]["method"], "message/send");
    assert_eq!(rows["items"][0]["type"], "a2a_receive");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_inboxes_honour_idempotency_keys_and_ttls() {
    let relay = Relay::api_only().await;
    let (inbox, inbox_token) = relay.external("inbox", "poll").await;
    let (_, caller_token) = relay.external("caller", "poll").await;
    let mut keyed = message_send("once");
    keyed["params"]["idempotency_key"] = json!("k-1");
    let a = relay.send(&caller_token, &inbox, &keyed).await.json();
    let b = relay.send(&caller_token, &inbox, &keyed).await.json();
    assert_eq!(a["activity_id"], b["activity_id"]);
    assert_eq!((a["duplicate"].as_bool(), b["duplicate"].as_bool()), (Some(false), Some(true)));
    // Another sender's same key is its own message.
    let c = relay.send(&relay.org, &inbox, &keyed).await.json();
    assert_ne!(c["activity_id"], a["activity_id"]);

    let mut short = message_send("short-lived");
    short["params"]["expires_in_seconds"] = json!(1);
    relay.send(&caller_token, &inbox, &short).await;
    let listed = || async {
        let v = relay.req("GET", &format!("/workspaces/{inbox}/activity?since_id=0"), &inbox_token, None, &[]).await.json();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["request_body"]["params"]["message"]["parts"][0]["text"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(listed().await, vec!["once", "once", "short-lived"]);
    eventually(Duration::from_secs(10), "the short-lived message to leave the inbox", || async {
        (listed().await == vec!["once", "once"]).then_some(())
    })
    .await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_filters_and_cursors() {
    let relay = Relay::api_only().await;
    let (a, a_token) = relay.external("a", "poll").await;
    let (b, b_token) = relay.external("b", "poll").await;
    for i in 0..5 {
        relay.send(&b_token, &a, &message_send(&format!("a{i}"))).await;
    }
    relay.send(&relay.org, &a, &message_send("from the canvas")).await;
    relay.send(&a_token, &b, &message_send("to b")).await;
    let get = |q: String, t: String| {
        let relay = &relay;
        let a = a.clone();
        async move { relay.req("GET", &format!("/workspaces/{a}/activity{q}"), &t, None, &[]).await }
    };
    let newest = get(String::new(), a_token.clone()).await.json();
    let ids: Vec<i64> = newest["items"].as_array().unwrap().iter().map(|i| i["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), 6);
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first without since_id: {ids:?}");
    let after = get(format!("?since_id={}", ids[3]), a_token.clone()).await.json();
    let asc: Vec<i64> = after["items"].as_array().unwrap().iter().map(|i| i["id"].as_i64().unwrap()).collect();
    assert_eq!(asc, vec![ids[2], ids[1], ids[0]], "strictly after, ascending");
    assert_eq!(after["last_id"], ids[0]);
    let from_b = get(format!("?source={b}&limit=2"), relay.org.clone()).await.json();
    assert_eq!(from_b["items"].as_array().unwrap().len(), 2);
    assert_eq!(get("?type=a2a_dispatch".into(), a_token.clone()).await.json()["items"], json!([]));
    assert_eq!(get("?since_secs=60".into(), a_token.clone()).await.json()["items"].as_array().unwrap().len(), 6);
    assert_eq!(get("?since_secs=999999999".into(), a_token.clone()).await.status, 200, "clamped to 30 days");

    // b's row as a cursor on a, an unknown one: the same 410.
    let b_rows = relay.req("GET", &format!("/workspaces/{b}/activity"), &b_token, None, &[]).await.json();
    let b_id = b_rows["items"][0]["id"].as_i64().unwrap();
    let gone = [get(format!("?since_id={b_id}"), a_token.clone()).await, get("?since_id=999999".into(), a_token.clone()).await];
    assert!(gone.iter().all(|r| r.status == 410), "{} / {}", gone[0].body, gone[1].body);
    assert_eq!(gone[0].body, gone[1].body);
    for bad in ["?since_secs=0", "?since_secs=-5", "?since_secs=abc", "?limit=0", "?limit=1001", "?since_id=-1", "?nope=1"] {
        assert_eq!(get(bad.into(), a_token.clone()).await.status, 400, "{bad}");
    }
    // A workspace token reads only its own activity.
    assert_eq!(relay.req("GET", &format!("/workspaces/{a}/activity"), &b_token, None, &[]).await.status, 404);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_tokens_rotate_unless_asked_not_to() {
    let relay = Relay::api_only().await;
    let (ws, first) = relay.external("ext", "poll").await;
    let beat = |t: String| {
        let relay = &relay;
        async move { relay.req("POST", "/registry/heartbeat", &t, None, &[]).await.status }
    };
    assert_eq!(beat(first.clone()).await, 200);
    let kept = relay.req("POST", &format!("/workspaces/{ws}/tokens"), &relay.org, Some(&json!({"keep_existing": true})), &[]).await.json();
    assert_eq!(kept["revoked"], 0);
    let second = kept["token"].as_str().unwrap().to_string();
    assert_eq!((beat(first.clone()).await, beat(second.clone()).await), (200, 200));
    let rotated = relay.req("POST", &format!("/workspaces/{ws}/tokens"), &relay.org, None, &[]).await;
    assert_eq!(rotated.status, 201);
    let rotated = rotated.json();
    assert_eq!(rotated["revoked"], 2);
    assert_eq!((beat(first).await, beat(second.clone()).await), (401, 401));
    assert_eq!(beat(rotated["token"].as_str().unwrap().to_string()).await, 200);
    // Only org tokens mint; other orgs' workspaces do not exist; bad bodies are 400.
    assert_eq!(relay.req("POST", &format!("/workspaces/{ws}/tokens"), rotated["token"].as_str().unwrap(), None, &[]).await.status, 403);
    let mut c = relay.db.acquire().await.unwrap();
    let (_, other_org) = tokens::create_org(&mut c, "other").await.unwrap();
    drop(c);
    assert_eq!(relay.req("POST", &format!("/workspaces/{ws}/tokens"), &other_org, None, &[]).await.status, 404);
    assert_eq!(relay.req("POST", &format!("/workspaces/{ws}/tokens"), &relay.org, Some(&json!({"keep": 1})), &[]).await.status, 400);
    // The token text never reaches the events.
    let ev = relay.req("GET", &format!("/workspaces/{ws}/events"), &relay.org, None, &[]).await.body;
    assert!(ev.contains("WORKSPACE_TOKEN_ISSUED") && !ev.contains("mol_ws_"), "{ev}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_takes_an_a2a_version_and_bodies_up_to_4_mib() {
    let relay = Relay::api_only().await;
    let (ws, token) = relay.external("v", "push").await;
    let url = format!("http://127.0.0.1:{}/", free_port());
    let r = relay.req("POST", "/registry/register", &token, Some(&json!({"url": url, "a2a_version": "2.0"})), &[]).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(relay.register(&token, json!({"url": url, "a2a_version": "1.0"})).await["a2a_version"], "1.0");
    // A card that announces 0.3, with no explicit version: the card decides.
    let card = json!({"name": "x", "protocolVersion": "0.3.0"});
    assert_eq!(relay.register(&token, json!({"url": url, "agent_card": card})).await["a2a_version"], "0.3");
    // The explicit version wins over the card.
    let v10_card = json!({"supportedInterfaces": [{"url": url, "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}]});
    assert_eq!(relay.register(&token, json!({"url": url, "a2a_version": "0.3", "agent_card": v10_card})).await["a2a_version"], "0.3");

    // 3 MiB of text passes the A2A route's 4 MiB cap (the other routes stop at 1 MiB).
    let sized = |n: usize| {
        let mut m = message_send("big");
        m["params"]["message"]["parts"][0]["text"] = json!("x".repeat(n));
        m
    };
    let big = sized(3 << 20);
    let r = relay.send(&relay.org, &ws, &big).await;
    assert_eq!(r.status, 202, "{}", &r.body[..r.body.len().min(300)]);
    let too_big = sized(5 << 20);
    let r = relay.send(&relay.org, &ws, &too_big).await;
    assert_eq!(r.status, 413, "{}", &r.body[..r.body.len().min(200)]);
    // Not JSON → 415; another org's workspace → 404; a removed one → 404.
    let r = http_full(
        &relay.addr,
        "POST",
        &format!("/workspaces/{ws}/a2a"),
        Some(&relay.org),
        Some("x"),
        &[("Content-Type", "text/plain")],
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(r.status, 415);
    let mut c = relay.db.acquire().await.unwrap();
    let (_, other_org) = tokens::create_org(&mut c, "other").await.unwrap();
    drop(c);
    assert_eq!(relay.send(&other_org, &ws, &message_send("x")).await.status, 404);
    assert_eq!(relay.req("DELETE", &format!("/workspaces/{ws}"), &relay.org, None, &[]).await.status, 202);
    assert_eq!(relay.send(&relay.org, &ws, &message_send("x")).await.status, 404);
    relay.stop().await;
}

/// A resolver that never answers, for the length of a test: /etc/resolv.conf points at a
/// UDP socket on loopback that reads nothing back. Restored on drop.
struct SilentDns {
    original: String,
    _socket: std::net::UdpSocket,
}

impl SilentDns {
    fn install() -> SilentDns {
        let socket = std::net::UdpSocket::bind("127.0.0.54:53").expect("tests run as root and may bind port 53");
        let original = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        std::fs::write("/etc/resolv.conf", "nameserver 127.0.0.54\noptions timeout:10 attempts:1\n").unwrap();
        SilentDns { original, _socket: socket }
    }
}

impl Drop for SilentDns {
    fn drop(&mut self) {
        let _ = std::fs::write("/etc/resolv.conf", &self.original);
    }
}

/// X5 resolves with a timeout and never under a lock: a registration with a black-holed
/// DNS name is refused within the timeout while other requests go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_dns_name_is_refused_in_time_without_blocking_anyone() {
    let relay = Relay::api_only().await;
    let (_, slow_token) = relay.external("black-holed", "push").await;
    let (_, fast_token) = relay.external("fine", "push").await;
    let dns = SilentDns::install();
    let started = Instant::now();
    let url = format!("http://blackhole-{}.example.com:8000/", uuid::Uuid::new_v4().simple());
    let body = json!({"url": url});
    let slow = relay.req("POST", "/registry/register", &slow_token, Some(&body), &[]);
    let others = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = Instant::now();
        let fine = relay.register(&fast_token, json!({"url": format!("http://127.0.0.1:{}/", free_port())})).await;
        let health = http_get(&relay.addr, "/healthz").await.unwrap().0;
        (fine, health, t.elapsed())
    };
    let (slow, (fine, health, others_took)) = tokio::join!(slow, others);
    let took = started.elapsed();
    drop(dns);
    assert_eq!(slow.status, 400, "{}", slow.body);
    assert!(slow.body.contains("did not resolve in time"), "{}", slow.body);
    assert!(took < Duration::from_secs(9), "refused within the 5 s timeout, not the resolver's 10 s or more: {took:?}");
    assert_eq!((fine["status"].as_str(), health), (Some("online"), 200));
    assert!(others_took < Duration::from_secs(2), "other requests went on meanwhile: {others_took:?}");
    relay.stop().await;
}
