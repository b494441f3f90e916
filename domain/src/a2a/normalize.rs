//! J5a: a caller's JSON-RPC body, whatever its generation, as one canonical request — or
//! a JSON-RPC error that names the field at fault (seed 003: a v0.2 `content` string once
//! reached a v0.3 agent, was refused there, and the sender never knew).
//!
//! Accepted: v0.2 (`params.message.content`, a string or a list of parts), v0.3
//! (`message/send` with `parts`), v1.0 (`SendMessage`, parts without `kind`, `ROLE_*`),
//! the streaming variants of both, `tasks/get`/`GetTask`, `tasks/cancel`/`CancelTask`, and
//! a bare `{method, params}` without the `jsonrpc` envelope (legacy senders). A missing
//! `messageId` is filled in, a missing role is `user`. The relay's own parameters
//! (`params.expires_in_seconds`, `params.idempotency_key`) are taken out of the request.

use serde_json::{Map, Value};

use super::wire::{WRAPPED, message_to, part_to_v03, relay_wrapped};
use super::{AgentVersion, Generation, Operation};

/// A JSON-RPC error for the caller (answered with HTTP 400).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RpcError {
    /// -32700 parse error, -32600 invalid request, -32601 method not found, -32602 invalid params.
    pub code: i64,
    pub message: String,
    /// The field at fault, as a path (`params.message.parts`).
    pub field: Option<String>,
}

impl RpcError {
    pub fn parse(message: impl Into<String>) -> Self {
        RpcError { code: -32700, message: message.into(), field: None }
    }
    pub fn invalid_request(field: &str, message: impl Into<String>) -> Self {
        RpcError { code: -32600, message: message.into(), field: Some(field.to_string()) }
    }
    pub fn method_not_found(message: impl Into<String>) -> Self {
        RpcError { code: -32601, message: message.into(), field: Some("method".into()) }
    }
    pub fn invalid_params(field: &str, message: impl Into<String>) -> Self {
        RpcError { code: -32602, message: message.into(), field: Some(field.to_string()) }
    }

    /// The JSON-RPC error response (`id` is the request's, or null when it could not be read).
    pub fn to_response(&self, id: &Value) -> Value {
        let mut error = serde_json::json!({ "code": self.code, "message": self.message });
        if let Some(f) = &self.field {
            error["data"] = serde_json::json!({ "field": f });
        }
        serde_json::json!({ "jsonrpc": "2.0", "id": id, "error": error })
    }
}

/// A request the relay accepted, in canonical (v0.3) form.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalized {
    /// The caller's JSON-RPC id (string, number or null; generated when absent): replies
    /// are answered under it.
    pub id: Value,
    /// The method as the caller sent it.
    pub method: String,
    pub operation: Operation,
    pub generation: Generation,
    /// Canonical params: v0.3 shapes, the relay's own parameters removed.
    pub params: Value,
    /// `params.expires_in_seconds` (absent, null or 0: no TTL).
    pub expires_in_seconds: Option<i64>,
    /// `params.idempotency_key`.
    pub idempotency_key: Option<String>,
}

/// Longest TTL a caller may ask for (30 days).
pub const MAX_EXPIRES_IN_SECONDS: i64 = 30 * 24 * 3600;
/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY: usize = 200;

/// The id of a body for an error response, when it can be read at all.
pub fn request_id(body: &[u8]) -> Value {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("id").cloned())
        .filter(|id| id.is_string() || id.is_number())
        .unwrap_or(Value::Null)
}

pub fn normalize(body: &[u8]) -> Result<Normalized, RpcError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(RpcError::parse("the body is empty: send a JSON-RPC request"));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| RpcError::parse(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(mut req) = v else {
        return Err(RpcError::invalid_request("", "the body must be a JSON-RPC request object (batches are not relayed)"));
    };
    match req.get("jsonrpc") {
        None => {} // a bare {method, params} (legacy senders)
        Some(Value::String(s)) if s == "2.0" => {}
        Some(_) => return Err(RpcError::invalid_request("jsonrpc", "jsonrpc must be \"2.0\"")),
    }
    let id = match req.remove("id") {
        None | Some(Value::Null) => Value::String(uuid::Uuid::new_v4().to_string()),
        Some(id @ (Value::String(_) | Value::Number(_))) => id,
        Some(_) => return Err(RpcError::invalid_request("id", "id must be a string or a number")),
    };
    let method = match req.remove("method") {
        Some(Value::String(m)) => m,
        Some(_) => return Err(RpcError::invalid_request("method", "method must be a string")),
        None => return Err(RpcError::invalid_request("method", "method is missing")),
    };
    let (operation, mut generation) = Operation::of_method(&method).ok_or_else(|| {
        RpcError::method_not_found(format!(
            "method {method:?} is not relayed: send message/send (v0.3) or SendMessage (v1.0), or tasks/get, tasks/cancel, GetTask, CancelTask"
        ))
    })?;
    let mut params = match req.remove("params") {
        Some(Value::Object(p)) => p,
        Some(_) => return Err(RpcError::invalid_params("params", "params must be an object")),
        None => return Err(RpcError::invalid_params("params", "params is missing")),
    };
    let expires_in_seconds = take_expires_in(&mut params)?;
    let idempotency_key = take_idempotency_key(&mut params)?;

    let params = match operation {
        Operation::SendMessage => {
            let (message, was_v02) = canonical_message(params.remove("message"))?;
            if was_v02 {
                generation = Generation::V02;
            }
            params.insert("message".into(), message);
            if let Some(c) = params.remove("configuration") {
                params.insert("configuration".into(), configuration_to(&c, AgentVersion::V03)?);
            }
            Value::Object(params)
        }
        Operation::GetTask | Operation::CancelTask => {
            match params.get("id") {
                Some(Value::String(s)) if !s.is_empty() => {}
                _ => return Err(RpcError::invalid_params("params.id", "params.id must be the task's id (a string)")),
            }
            Value::Object(params)
        }
    };
    // PostgreSQL stores no NUL in text or jsonb (it refuses the row): say which field has
    // one, as for any other bad field, instead of failing the insert.
    let with_nul = match (&id, &idempotency_key) {
        (Value::String(s), _) if s.contains('\0') => Some("id".to_string()),
        (_, Some(k)) if k.contains('\0') => Some("params.idempotency_key".to_string()),
        _ => first_nul(&params, "params"),
    };
    if let Some(field) = with_nul {
        return Err(RpcError::invalid_params(&field, format!("{field} contains a NUL character (\\u0000), which cannot be relayed")));
    }
    Ok(Normalized { id, method, operation, generation, params, expires_in_seconds, idempotency_key })
}

/// The path of the first string (or object key) in `v` that holds a NUL character. The
/// path is kept as borrowed segments and written out only for a hit: a body of a million
/// items under a long key must cost a walk, not a million copies of the key.
fn first_nul(v: &Value, root: &str) -> Option<String> {
    enum Seg<'a> {
        Key(&'a str),
        Index(usize),
    }
    fn walk<'a>(v: &'a Value, path: &mut Vec<Seg<'a>>) -> bool {
        match v {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
                path.push(Seg::Index(i));
                let hit = walk(item, path);
                if !hit {
                    path.pop();
                }
                hit
            }),
            Value::Object(fields) => fields.iter().any(|(k, item)| {
                if k.contains('\0') {
                    return true;
                }
                path.push(Seg::Key(k));
                let hit = walk(item, path);
                if !hit {
                    path.pop();
                }
                hit
            }),
            _ => false,
        }
    }
    let mut path = Vec::new();
    if !walk(v, &mut path) {
        return None;
    }
    let mut out = root.to_string();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    Some(out)
}

fn take_expires_in(params: &mut Map<String, Value>) -> Result<Option<i64>, RpcError> {
    const F: &str = "params.expires_in_seconds";
    match params.remove("expires_in_seconds") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(0) => Ok(None),
            Some(s) if s < 0 => Err(RpcError::invalid_params(F, format!("{F} must not be negative"))),
            Some(s) if s > MAX_EXPIRES_IN_SECONDS => {
                Err(RpcError::invalid_params(F, format!("{F} must be at most {MAX_EXPIRES_IN_SECONDS} (30 days)")))
            }
            Some(s) => Ok(Some(s)),
            None => Err(RpcError::invalid_params(F, format!("{F} must be a whole number of seconds"))),
        },
        Some(_) => Err(RpcError::invalid_params(F, format!("{F} must be a number of seconds"))),
    }
}

fn take_idempotency_key(params: &mut Map<String, Value>) -> Result<Option<String>, RpcError> {
    const F: &str = "params.idempotency_key";
    match params.remove("idempotency_key") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(k)) => check_idempotency_key(&k).map(Some).map_err(|m| RpcError::invalid_params(F, m)),
        Some(_) => Err(RpcError::invalid_params(F, format!("{F} must be a string"))),
    }
}

/// An idempotency key (from params or the `Idempotency-Key` header): 1–200 printable
/// characters.
pub fn check_idempotency_key(k: &str) -> Result<String, String> {
    if k.is_empty() || k.chars().count() > MAX_IDEMPOTENCY_KEY || k.chars().any(char::is_control) {
        return Err(format!("an idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters"));
    }
    Ok(k.to_string())
}

/// The canonical message, and whether it was v0.2-shaped (`content`).
fn canonical_message(m: Option<Value>) -> Result<(Value, bool), RpcError> {
    const M: &str = "params.message";
    let mut msg = match m {
        Some(Value::Object(o)) => o,
        Some(_) => return Err(RpcError::invalid_params(M, format!("{M} must be an object"))),
        None => return Err(RpcError::invalid_params(M, format!("{M} is missing"))),
    };
    let content = msg.remove("content");
    let (parts, was_v02) = match (msg.remove("parts"), content) {
        // Parts discriminated by `type` rather than `kind` are A2A v0.2's.
        (Some(Value::Array(parts)), _) => {
            let v02 = parts.iter().any(|p| p.get("type").is_some() && p.get("kind").is_none());
            (parts, v02)
        }
        (Some(_), _) => return Err(RpcError::invalid_params("params.message.parts", "params.message.parts must be a list of parts")),
        (None, Some(Value::String(text))) => (vec![serde_json::json!({ "kind": "text", "text": text })], true),
        (None, Some(Value::Array(items))) => {
            // Older senders put a list of parts (or of strings) under `content`.
            let parts = items
                .into_iter()
                .map(|i| match i {
                    Value::String(text) => serde_json::json!({ "kind": "text", "text": text }),
                    other => other,
                })
                .collect();
            (parts, true)
        }
        (None, Some(other)) => {
            return Err(RpcError::invalid_params(
                "params.message.content",
                format!("params.message.content must be a string or a list of parts, not {}", type_name(&other)),
            ));
        }
        (None, None) => {
            return Err(RpcError::invalid_params(
                "params.message.parts",
                "params.message has neither `parts` (v0.3, v1.0) nor `content` (v0.2)",
            ));
        }
    };
    if parts.is_empty() {
        return Err(RpcError::invalid_params("params.message.parts", "params.message.parts is empty"));
    }
    let parts = parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let at = format!("params.message.parts[{i}]");
            // The relay's own mark (wire::WRAPPED), in another form than the relay's:
            // it would be taken for the relay's. In the relay's form (a part the relay
            // wrapped, sent on by an agent) it means what it says, and is kept.
            if p.get("metadata").and_then(|m| m.get(WRAPPED)).is_some() && !relay_wrapped(p) {
                return Err(RpcError::invalid_params(
                    &format!("{at}.metadata"),
                    format!("{at}.metadata key {WRAPPED:?} is reserved by the relay"),
                ));
            }
            part_to_v03(p, &at)
        })
        .collect::<Result<Vec<_>, _>>()?;
    msg.insert("parts".into(), Value::Array(parts));
    match msg.get("messageId") {
        None | Some(Value::Null) => {
            msg.insert("messageId".into(), uuid::Uuid::new_v4().to_string().into());
        }
        Some(Value::String(s)) if s.is_empty() => {
            msg.insert("messageId".into(), uuid::Uuid::new_v4().to_string().into());
        }
        Some(Value::String(_)) => {}
        Some(_) => return Err(RpcError::invalid_params("params.message.messageId", "params.message.messageId must be a string")),
    }
    let role = match msg.get("role") {
        None | Some(Value::Null) => "user",
        Some(Value::String(r)) => match r.as_str() {
            "user" | "ROLE_USER" => "user",
            "agent" | "ROLE_AGENT" => "agent",
            _ => return Err(RpcError::invalid_params("params.message.role", "params.message.role must be user or agent")),
        },
        Some(_) => return Err(RpcError::invalid_params("params.message.role", "params.message.role must be a string")),
    };
    msg.insert("role".into(), role.into());
    for key in ["contextId", "taskId"] {
        if msg.get(key).is_some_and(|v| !v.is_string() && !v.is_null()) {
            return Err(RpcError::invalid_params(&format!("{M}.{key}"), format!("{M}.{key} must be a string")));
        }
    }
    if msg.get("metadata").is_some_and(|v| !v.is_object() && !v.is_null()) {
        return Err(RpcError::invalid_params("params.message.metadata", "params.message.metadata must be an object"));
    }
    msg.insert("kind".into(), "message".into());
    Ok((Value::Object(msg), was_v02))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// `params.configuration` in a generation: v0.3's `blocking` is v1.0's
/// `!returnImmediately`, `pushNotificationConfig` is `taskPushNotificationConfig`.
fn configuration_to(c: &Value, to: AgentVersion) -> Result<Value, RpcError> {
    let Some(obj) = c.as_object() else {
        return Err(RpcError::invalid_params("params.configuration", "params.configuration must be an object"));
    };
    let mut out = obj.clone();
    match to {
        AgentVersion::V03 => {
            if let Some(r) = out.remove("returnImmediately") {
                out.insert("blocking".into(), Value::Bool(!r.as_bool().unwrap_or(false)));
            }
            if let Some(p) = out.remove("taskPushNotificationConfig") {
                out.insert("pushNotificationConfig".into(), p);
            }
        }
        AgentVersion::V10 => {
            if let Some(b) = out.remove("blocking") {
                out.insert("returnImmediately".into(), Value::Bool(!b.as_bool().unwrap_or(true)));
            }
            if let Some(p) = out.remove("pushNotificationConfig") {
                out.insert("taskPushNotificationConfig".into(), p);
            }
        }
    }
    Ok(Value::Object(out))
}

/// The canonical request rendered for an agent of generation `to`: the JSON-RPC body to
/// POST (plus, for v1.0, the `A2A-Version: 1.0` header the sender adds).
pub fn render_request(id: &Value, operation: Operation, params: &Value, to: AgentVersion) -> Value {
    let params = match (operation, to) {
        (_, AgentVersion::V03) => params.clone(),
        (Operation::SendMessage, AgentVersion::V10) => {
            let mut p = params.as_object().cloned().unwrap_or_default();
            if let Some(m) = p.get("message") {
                p.insert("message".into(), message_to(m, AgentVersion::V10));
            }
            if let Some(c) = p.get("configuration") {
                if let Ok(c) = configuration_to(c, AgentVersion::V10) {
                    p.insert("configuration".into(), c);
                }
            }
            Value::Object(p)
        }
        (_, AgentVersion::V10) => params.clone(),
    };
    serde_json::json!({ "jsonrpc": "2.0", "id": id, "method": operation.method(to), "params": params })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn norm(v: Value) -> Result<Normalized, RpcError> {
        normalize(v.to_string().as_bytes())
    }

    #[test]
    fn v02_content_string_becomes_a_text_part_with_a_message_id() {
        let n = norm(json!({"jsonrpc": "2.0", "id": 1, "method": "message/send",
            "params": {"message": {"role": "user", "content": "hello"}}}))
        .unwrap();
        assert_eq!(n.generation, Generation::V02);
        let m = &n.params["message"];
        assert_eq!(m["parts"], json!([{"kind": "text", "text": "hello"}]));
        assert!(m.get("content").is_none());
        assert!(!m["messageId"].as_str().unwrap().is_empty());
        assert_eq!(m["kind"], "message");
    }

    #[test]
    fn v10_send_message_is_accepted_and_rendered_back_for_both_generations() {
        let n = norm(json!({"jsonrpc": "2.0", "id": "a", "method": "SendMessage",
            "params": {"message": {"messageId": "m1", "role": "ROLE_USER", "parts": [{"text": "hi"}]},
                       "configuration": {"returnImmediately": false}}}))
        .unwrap();
        assert_eq!((n.operation, n.generation), (Operation::SendMessage, Generation::V10));
        assert_eq!(n.params["message"]["parts"], json!([{"kind": "text", "text": "hi"}]));
        assert_eq!(n.params["configuration"], json!({"blocking": true}));
        let v03 = render_request(&n.id, n.operation, &n.params, AgentVersion::V03);
        assert_eq!(v03["method"], "message/send");
        assert_eq!(v03["params"]["message"]["role"], "user");
        let v10 = render_request(&n.id, n.operation, &n.params, AgentVersion::V10);
        assert_eq!(v10["method"], "SendMessage");
        assert_eq!(v10["params"]["message"], json!({"messageId": "m1", "role": "ROLE_USER", "parts": [{"text": "hi"}]}));
        assert_eq!(v10["params"]["configuration"], json!({"returnImmediately": false}));
    }

    #[test]
    fn relay_parameters_are_taken_out_and_checked() {
        let n = norm(json!({"method": "message/send", "params": {"expires_in_seconds": 5, "idempotency_key": "k1",
            "message": {"parts": [{"kind": "text", "text": "x"}]}}}))
        .unwrap();
        assert_eq!((n.expires_in_seconds, n.idempotency_key.as_deref()), (Some(5), Some("k1")));
        assert!(n.params.get("expires_in_seconds").is_none() && n.params.get("idempotency_key").is_none());
        let msg = json!({"parts": [{"kind": "text", "text": "x"}]});
        for bad in [json!(-1), json!("5"), json!(1.5), json!(MAX_EXPIRES_IN_SECONDS + 1)] {
            let e = norm(json!({"method": "message/send", "params": {"expires_in_seconds": bad, "message": msg}})).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("params.expires_in_seconds"), "{bad}");
        }
        let zero = norm(json!({"method": "message/send", "params": {"expires_in_seconds": 0, "message": msg}})).unwrap();
        assert_eq!(zero.expires_in_seconds, None);
        assert!(norm(json!({"method": "message/send", "params": {"idempotency_key": "", "message": msg}})).is_err());
    }

    #[test]
    fn requests_that_are_not_relayed_say_why() {
        let e = norm(json!({"jsonrpc": "2.0", "id": 1, "method": "tasks/list", "params": {}})).unwrap_err();
        assert_eq!(e.code, -32601);
        let e = norm(json!({"jsonrpc": "1.0", "method": "message/send", "params": {}})).unwrap_err();
        assert_eq!((e.code, e.field.as_deref()), (-32600, Some("jsonrpc")));
        let e = norm(json!({"jsonrpc": "2.0", "id": true, "method": "message/send", "params": {}})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("id"));
        let e = norm(json!([{"jsonrpc": "2.0"}])).unwrap_err();
        assert_eq!(e.code, -32600);
        let e = norm(json!({"method": "tasks/get", "params": {}})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("params.id"));
        let e = normalize(b"  ").unwrap_err();
        assert_eq!(e.code, -32700);
        assert_eq!(e.to_response(&Value::Null)["error"]["code"], -32700);
    }

    #[test]
    fn the_relays_metadata_mark_is_reserved() {
        let send =
            |part: Value| norm(json!({"method": "message/send", "params": {"message": {"parts": [{"kind": "text", "text": "ok"}, part]}}}));
        for part in [
            json!({"kind": "data", "data": {"value": [1], "other": 2}, "metadata": {super::WRAPPED: true}}),
            json!({"kind": "data", "data": {"value": [1]}, "metadata": {super::WRAPPED: false}}),
            json!({"kind": "text", "text": "x", "metadata": {super::WRAPPED: true}}),
        ] {
            let e = send(part.clone()).unwrap_err();
            assert_eq!((e.code, e.field.as_deref()), (-32602, Some("params.message.parts[1].metadata")), "{part}");
        }
        // A part the relay wrapped, sent on by an agent: kept, and unwrapped for v1.0.
        let relayed = json!({"kind": "data", "data": {"value": 5}, "metadata": {super::WRAPPED: true}});
        let n = send(relayed.clone()).unwrap();
        assert_eq!(n.params["message"]["parts"][1], relayed);
        let v10 = render_request(&n.id, n.operation, &n.params, AgentVersion::V10);
        assert_eq!(v10["params"]["message"]["parts"][1], json!({"data": 5}));
        // Marked by the relay itself: a v1.0 value that is not an object.
        let n = norm(json!({"method": "SendMessage", "params": {"message": {"parts": [{"data": [1]}]}}})).unwrap();
        assert_eq!(n.params["message"]["parts"][0]["metadata"][super::WRAPPED], true);
    }

    #[test]
    fn a_nul_anywhere_is_named_not_stored() {
        // PostgreSQL refuses NUL in text and jsonb: the caller hears which field has one.
        let text = |t: &str| json!({"method": "message/send", "params": {"message": {"parts": [{"kind": "text", "text": "ok"}, {"kind": "text", "text": t}]}}});
        let e = norm(text("a\u{0}b")).unwrap_err();
        assert_eq!((e.code, e.field.as_deref()), (-32602, Some("params.message.parts[1].text")));
        assert!(norm(text("a\u{1}b")).is_ok(), "other control characters are stored as they are");
        let e = norm(json!({"id": "x\u{0}", "method": "message/send", "params": {"message": {"parts": [{"kind": "text", "text": "ok"}]}}}))
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("id"));
        let e = norm(json!({"method": "message/send", "params": {"idempotency_key": "k\u{0}", "message": {"parts": [{"kind": "text", "text": "ok"}]}}})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("params.idempotency_key"));
        let e = norm(json!({"method": "message/send", "params": {"message": {"metadata": {"a\u{0}": 1}, "parts": [{"kind": "text", "text": "ok"}]}}})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("params.message.metadata"));
    }

    #[test]
    fn the_nul_check_walks_a_wide_body_without_copying_its_paths() {
        // A million items under a 2 MiB key: a path written per item would copy 2 TB.
        let key = "k".repeat(2 << 20);
        let body = format!(
            r#"{{"method": "message/send", "params": {{"message": {{"parts": [{{"kind": "text", "text": "ok"}}]}}, "{key}": [{}0]}}}}"#,
            "0,".repeat(1_000_000)
        );
        let t0 = std::time::Instant::now();
        assert!(normalize(body.as_bytes()).is_ok());
        assert!(t0.elapsed() < std::time::Duration::from_secs(20), "{:?}", t0.elapsed());
    }
}
