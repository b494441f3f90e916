//! The reference agent (runtime `echo`): a real workspace runtime for local installs and
//! tests, without any registry. It reads its token from `/configs/.auth_token`, registers
//! with the platform (A12), heartbeats, and answers A2A JSON-RPC `message/send` with an
//! echo of the text it got — only to callers presenting the platform inbound secret.
//!
//! Env: PLATFORM_URL (http only), AGENT_PORT (8000), AGENT_URL (default
//! http://127.0.0.1:AGENT_PORT), HEARTBEAT_SECS (10), CONFIG_DIR (/configs).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
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
    let rest = url.strip_prefix("http://").ok_or("PLATFORM_URL must be http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let payload = body.to_string();
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(authority))
        .await
        .map_err(|_| "connect timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {bearer}\r\nContent-Type: application/json\r\n\
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
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if presented != agent.inbound_secret {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "unauthorized"})));
    }
    let id = body.get("id").cloned().unwrap_or(Value::Null);
    let method = body.get("method").and_then(Value::as_str).unwrap_or("");
    if method != "message/send" {
        return (
            StatusCode::OK,
            Json(json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "method not found"}})),
        );
    }
    let text: String = body["params"]["message"]["parts"]
        .as_array()
        .map(|parts| parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join(""))
        .unwrap_or_default();
    let reply = json!({
        "role": "agent",
        "parts": [{"kind": "text", "text": text}],
        "messageId": format!("echo-{}", std::process::id()),
        "kind": "message",
    });
    (StatusCode::OK, Json(json!({"jsonrpc": "2.0", "id": id, "result": reply})))
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
    let inbound_secret = read_secret(&dir, ".platform_inbound_secret")?;
    let port: u16 = env("AGENT_PORT", "8000").parse().map_err(|_| "AGENT_PORT is not a port")?;
    let url = env("AGENT_URL", &format!("http://127.0.0.1:{port}"));
    let beat = Duration::from_secs(env("HEARTBEAT_SECS", "10").parse().unwrap_or(10));

    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await.map_err(|e| format!("listen on {port}: {e}"))?;
    let app = Router::new()
        .route("/", post(a2a))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(Arc::new(Agent { inbound_secret }));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    // PID 1 in its container: exit promptly on SIGTERM so a stop takes no grace timeout.
    tokio::spawn(async {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            term.recv().await;
            eprintln!("echo-agent: SIGTERM, exiting");
            std::process::exit(0);
        }
    });
    eprintln!("echo-agent: listening on {port}, registering at {platform}");

    let base = platform.trim_end_matches('/').to_string();
    let card = json!({"url": url, "delivery_mode": "push", "agent_card": {"name": "echo", "skills": ["echo"]}});
    loop {
        match post_json(&format!("{base}/registry/register"), &token, &card).await {
            Ok((200, _)) => break,
            Ok((status, body)) => eprintln!("echo-agent: register answered {status}: {body}"),
            Err(e) => eprintln!("echo-agent: register failed: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!("echo-agent: registered");
    loop {
        tokio::time::sleep(beat).await;
        match post_json(&format!("{base}/registry/heartbeat"), &token, &json!({})).await {
            Ok((200, _)) => {}
            Ok((status, _)) => eprintln!("echo-agent: heartbeat answered {status}"),
            Err(e) => eprintln!("echo-agent: heartbeat failed: {e}"),
        }
    }
}
