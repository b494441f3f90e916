//! The reference agent (runtime `echo`): a real workspace runtime for local installs and
//! tests, without any registry. It reads its token from `/configs/.auth_token`, registers
//! with the platform (A12, speaking A2A 0.3), heartbeats, and echoes the text of every
//! A2A message it gets:
//!
//! - push mode (default): answers JSON-RPC `message/send` on its URL with an echo — only
//!   to callers presenting the platform inbound secret;
//! - poll mode (`DELIVERY_MODE=poll`, no URL needed): reads its inbox
//!   (`GET /workspaces/{id}/activity?type=a2a_receive&since_id=…`) in order, keeps its
//!   cursor in `CONFIG_DIR/.a2a_cursor`, and sends each echo back to the sending
//!   workspace as an A2A message (`POST /workspaces/{source}/a2a`, with an idempotency key
//!   per inbox row, so a restart that reads a row again never replies twice).
//!
//! Env: PLATFORM_URL (http only), AGENT_PORT (8000), AGENT_URL (default
//! http://127.0.0.1:AGENT_PORT), HEARTBEAT_SECS (10), CONFIG_DIR (/configs),
//! DELIVERY_MODE (push | poll), POLL_INTERVAL_MS (200).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Agent {
    inbound_secret: String,
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_string())
}

fn read_secret(dir: &str, name: &str) -> Result<String, String> {
    std::fs::read_to_string(format!("{dir}/{name}")).map(|s| s.trim().to_string()).map_err(|e| format!("{dir}/{name}: {e}"))
}

/// One HTTP/1.1 POST with a JSON body to an http:// URL: (status, body).
async fn post_json(url: &str, bearer: &str, body: &Value) -> Result<(u16, String), String> {
    request("POST", url, bearer, Some(body)).await
}

/// One HTTP/1.1 request (JSON body or none) to an http:// URL: (status, body).
async fn request(method: &str, url: &str, bearer: &str, body: Option<&Value>) -> Result<(u16, String), String> {
    let rest = url.strip_prefix("http://").ok_or("PLATFORM_URL must be http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let payload = body.map(Value::to_string).unwrap_or_default();
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(authority))
        .await
        .map_err(|_| "connect timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let content_type = if body.is_some() { "Content-Type: application/json\r\n" } else { "" };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {bearer}\r\n{content_type}\
         Content-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    );
    s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .map_err(|_| "read timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

async fn a2a(State(agent): State<Arc<Agent>>, headers: HeaderMap, body: Json<Value>) -> (StatusCode, Json<Value>) {
    let presented = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    if presented != agent.inbound_secret {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "unauthorized"})));
    }
    let id = body.get("id").cloned().unwrap_or(Value::Null);
    let method = body.get("method").and_then(Value::as_str).unwrap_or("");
    if method != "message/send" {
        return (StatusCode::OK, Json(json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "method not found"}})));
    }
    let text = text_of(&body);
    let reply = json!({
        "role": "agent",
        "parts": [{"kind": "text", "text": text}],
        "messageId": format!("echo-{}", std::process::id()),
        "kind": "message",
    });
    (StatusCode::OK, Json(json!({"jsonrpc": "2.0", "id": id, "result": reply})))
}

/// The text parts of a JSON-RPC request's message, joined.
fn text_of(request: &Value) -> String {
    request["params"]["message"]["parts"]
        .as_array()
        .map(|parts| parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join(""))
        .unwrap_or_default()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("echo-agent: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), String> {
    let platform = env("PLATFORM_URL", "");
    if platform.is_empty() {
        return Err("PLATFORM_URL is not set".into());
    }
    let dir = env("CONFIG_DIR", "/configs");
    let token = read_secret(&dir, ".auth_token")?;
    let poll = env("DELIVERY_MODE", "push") == "poll";
    let base = platform.trim_end_matches('/').to_string();
    // PID 1 in its container: exit promptly on SIGTERM so a stop takes no grace timeout.
    tokio::spawn(async {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            term.recv().await;
            eprintln!("echo-agent: SIGTERM, exiting");
            std::process::exit(0);
        }
    });

    let card = json!({"name": "echo", "skills": ["echo"]});
    let registration = if poll {
        json!({"delivery_mode": "poll", "a2a_version": "0.3", "agent_card": card})
    } else {
        let inbound_secret = read_secret(&dir, ".platform_inbound_secret")?;
        let port: u16 = env("AGENT_PORT", "8000").parse().map_err(|_| "AGENT_PORT is not a port")?;
        let url = env("AGENT_URL", &format!("http://127.0.0.1:{port}"));
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await.map_err(|e| format!("listen on {port}: {e}"))?;
        let app =
            Router::new().route("/", post(a2a)).route("/healthz", get(|| async { "ok" })).with_state(Arc::new(Agent { inbound_secret }));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        eprintln!("echo-agent: listening on {port}");
        json!({"url": url, "delivery_mode": "push", "a2a_version": "0.3", "agent_card": card})
    };
    eprintln!("echo-agent: registering at {platform} ({})", if poll { "poll" } else { "push" });
    let workspace_id = loop {
        match post_json(&format!("{base}/registry/register"), &token, &registration).await {
            Ok((200, body)) => {
                let v: Value = serde_json::from_str(&body).unwrap_or_default();
                break v["workspace_id"].as_str().unwrap_or_default().to_string();
            }
            Ok((status, body)) => eprintln!("echo-agent: register answered {status}: {body}"),
            Err(e) => eprintln!("echo-agent: register failed: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    eprintln!("echo-agent: registered");
    let beat = Duration::from_secs(env("HEARTBEAT_SECS", "10").parse().unwrap_or(10));
    let heartbeat = {
        let (base, token) = (base.clone(), token.clone());
        async move {
            loop {
                tokio::time::sleep(beat).await;
                match post_json(&format!("{base}/registry/heartbeat"), &token, &json!({})).await {
                    Ok((200, _)) => {}
                    Ok((status, _)) => eprintln!("echo-agent: heartbeat answered {status}"),
                    Err(e) => eprintln!("echo-agent: heartbeat failed: {e}"),
                }
            }
        }
    };
    if poll {
        let every = Duration::from_millis(env("POLL_INTERVAL_MS", "200").parse().unwrap_or(200));
        tokio::join!(heartbeat, poll_inbox(&base, &token, &workspace_id, &dir, every));
    } else {
        heartbeat.await;
    }
    Ok(())
}

/// Poll mode: read the inbox after the cursor, echo each message back to its sender, move
/// the cursor on. Never returns.
async fn poll_inbox(base: &str, token: &str, ws: &str, dir: &str, every: Duration) {
    let cursor_file = format!("{dir}/.a2a_cursor");
    let mut cursor: i64 = std::fs::read_to_string(&cursor_file).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    loop {
        let url = format!("{base}/workspaces/{ws}/activity?type=a2a_receive&since_id={cursor}&limit=100");
        let page = match request("GET", &url, token, None).await {
            Ok((200, body)) => serde_json::from_str::<Value>(&body).unwrap_or_default(),
            Ok((410, _)) => {
                eprintln!("echo-agent: inbox cursor {cursor} is gone; reading from the start (replies are idempotent)");
                cursor = 0;
                continue;
            }
            Ok((status, body)) => {
                eprintln!("echo-agent: inbox answered {status}: {body}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => {
                eprintln!("echo-agent: inbox read failed: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let items = page["items"].as_array().cloned().unwrap_or_default();
        for item in &items {
            let id = item["id"].as_i64().unwrap_or(cursor);
            let text = text_of(&item["request_body"]);
            eprintln!("echo-agent: inbox {id}: {} bytes from {}", text.len(), item["source_id"].as_str().unwrap_or("the canvas"));
            if let Some(source) = item["source_id"].as_str() {
                let reply = json!({"jsonrpc": "2.0", "id": format!("echo-{id}"), "method": "message/send", "params": {
                    "idempotency_key": format!("echo-reply-{ws}-{id}"),
                    "message": {"role": "agent", "messageId": format!("echo-{ws}-{id}"), "parts": [{"kind": "text", "text": text}]}}});
                // A reply that cannot be sent now is tried again before the cursor moves on.
                loop {
                    match post_json(&format!("{base}/workspaces/{source}/a2a"), token, &reply).await {
                        Ok((200 | 202, _)) => break,
                        Ok((status, body)) if (400..500).contains(&status) && status != 429 => {
                            eprintln!("echo-agent: reply to {source} refused ({status}): {body}");
                            break;
                        }
                        Ok((status, _)) => eprintln!("echo-agent: reply to {source} answered {status}; retrying"),
                        Err(e) => eprintln!("echo-agent: reply to {source} failed: {e}; retrying"),
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            cursor = id;
            let _ = std::fs::write(&cursor_file, cursor.to_string());
        }
        if items.len() < 100 {
            tokio::time::sleep(every).await;
        }
    }
}
