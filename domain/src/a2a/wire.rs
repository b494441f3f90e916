//! Messages, parts and tasks rendered in one generation or the other.
//!
//! The canonical form (what the queue stores) is v0.3: parts carry `kind`
//! (`text` | `file` | `data`), roles are `user`/`agent`, messages and tasks carry
//! `kind`. v1.0 differs in exactly these places: a part is one of `text`, `raw` (bytes,
//! base64 in JSON), `url` or `data`, beside `mediaType`, `filename` and `metadata`; roles
//! are `ROLE_USER`/`ROLE_AGENT`; task states are `TASK_STATE_*`; `SendMessage` answers
//! `{"message": …}` or `{"task": …}` instead of a bare object with a `kind`.
//!
//! Requests are checked strictly ([`part_to_v03`] fails with the field at fault); replies
//! from agents are converted leniently (what cannot be recognised passes through as is:
//! the caller sees what the agent said rather than nothing).

use serde_json::{Map, Value};

use super::normalize::RpcError;
use super::{AgentVersion, Operation};

/// A part of a request, in any generation's shape, as a canonical v0.3 part. `at` is its
/// path in the request (for the error).
pub fn part_to_v03(p: &Value, at: &str) -> Result<Value, RpcError> {
    let Some(obj) = p.as_object() else {
        return Err(RpcError::invalid_params(at, format!("{at} must be an object (a part)")));
    };
    let mut out = Map::new();
    if let Some(m) = obj.get("metadata") {
        out.insert("metadata".into(), m.clone());
    }
    // `kind` (v0.3) or `type` (early v0.2 senders); absent in v1.0.
    let kind = obj.get("kind").or_else(|| obj.get("type"));
    let kind = match kind {
        Some(Value::String(k)) => Some(k.as_str()),
        Some(_) => return Err(RpcError::invalid_params(&format!("{at}.kind"), format!("{at}.kind must be a string"))),
        None => None,
    };
    let media = str_field(obj, "mediaType", at)?.or(str_field(obj, "mimeType", at)?);
    let name = str_field(obj, "filename", at)?.or(str_field(obj, "name", at)?);
    match kind {
        Some("text") | None if obj.contains_key("text") => {
            let text = str_field(obj, "text", at)?.unwrap_or_default();
            out.insert("kind".into(), "text".into());
            out.insert("text".into(), text.into());
        }
        Some("file") => {
            let file = obj
                .get("file")
                .and_then(Value::as_object)
                .ok_or_else(|| RpcError::invalid_params(&format!("{at}.file"), format!("{at}.file must be an object")))?;
            if !(file.get("bytes").is_some_and(Value::is_string) || file.get("uri").is_some_and(Value::is_string)) {
                return Err(RpcError::invalid_params(
                    &format!("{at}.file"),
                    format!("{at}.file needs `bytes` (base64) or `uri`, as a string"),
                ));
            }
            out.insert("kind".into(), "file".into());
            out.insert("file".into(), Value::Object(file.clone()));
        }
        Some("data") => {
            let data = obj
                .get("data")
                .filter(|d| d.is_object())
                .ok_or_else(|| RpcError::invalid_params(&format!("{at}.data"), format!("{at}.data must be an object")))?;
            out.insert("kind".into(), "data".into());
            out.insert("data".into(), data.clone());
        }
        None if obj.contains_key("raw") || obj.contains_key("url") => {
            let mut file = Map::new();
            match (obj.get("raw"), obj.get("url")) {
                (Some(Value::String(b)), None) => {
                    file.insert("bytes".into(), b.clone().into());
                }
                (None, Some(Value::String(u))) => {
                    file.insert("uri".into(), u.clone().into());
                }
                _ => {
                    return Err(RpcError::invalid_params(at, format!("{at} must carry one of `raw` or `url`, as a string")));
                }
            }
            if let Some(m) = media {
                file.insert("mimeType".into(), m.into());
            }
            if let Some(n) = name {
                file.insert("name".into(), n.into());
            }
            out.insert("kind".into(), "file".into());
            out.insert("file".into(), Value::Object(file));
        }
        None if obj.contains_key("data") => {
            // v1.0 data may be any JSON value; v0.3 wants an object. A value that is not one
            // is wrapped, and the wrapping marked, so a v1.0 agent gets the value as sent.
            let data = match &obj["data"] {
                Value::Object(_) => obj["data"].clone(),
                other => {
                    // A metadata that is not an object is left as sent (the value stays
                    // wrapped), but null is no metadata at all.
                    if out.get("metadata") == Some(&Value::Null) {
                        out.remove("metadata");
                    }
                    if let Value::Object(m) = out.entry("metadata").or_insert_with(|| Value::Object(Map::new())) {
                        m.insert(WRAPPED.into(), true.into());
                    }
                    serde_json::json!({ "value": other })
                }
            };
            out.insert("kind".into(), "data".into());
            out.insert("data".into(), data);
        }
        Some("text") => {
            return Err(RpcError::invalid_params(&format!("{at}.text"), format!("{at}.text must be a string")));
        }
        Some(other) => {
            return Err(RpcError::invalid_params(
                &format!("{at}.kind"),
                format!("{at}.kind {other:?} is not a part kind (text, file or data)"),
            ));
        }
        None => {
            return Err(RpcError::invalid_params(at, format!("{at} has no content: it needs `text`, `file`/`raw`/`url` or `data`")));
        }
    }
    Ok(Value::Object(out))
}

fn str_field(obj: &Map<String, Value>, key: &str, at: &str) -> Result<Option<String>, RpcError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(RpcError::invalid_params(&format!("{at}.{key}"), format!("{at}.{key} must be a string"))),
    }
}

/// The metadata key that marks a v1.0 `data` value that is not an object, wrapped as
/// `{"value": …}` for v0.3 (whose `data` must be an object): unwrapped again for v1.0.
pub const WRAPPED: &str = "molecule.wrapped";

/// Whether a canonical part is in the relay's wrapped form: marked [`WRAPPED`] true, its
/// `data` the object `{"value": …}` alone.
pub(crate) fn relay_wrapped(p: &Value) -> bool {
    p.get("metadata").and_then(|m| m.get(WRAPPED)) == Some(&Value::Bool(true))
        && p.get("data").and_then(Value::as_object).is_some_and(|d| d.len() == 1 && d.contains_key("value"))
}

/// A canonical (v0.3) part in v1.0's shape.
pub fn part_to_v10(p: &Value) -> Value {
    let Some(obj) = p.as_object() else { return p.clone() };
    let mut out = Map::new();
    if let Some(m) = obj.get("metadata") {
        out.insert("metadata".into(), m.clone());
    }
    match obj.get("kind").and_then(Value::as_str) {
        Some("text") => {
            out.insert("text".into(), obj.get("text").cloned().unwrap_or_default());
        }
        Some("file") => {
            let file = obj.get("file").and_then(Value::as_object).cloned().unwrap_or_default();
            if let Some(b) = file.get("bytes") {
                out.insert("raw".into(), b.clone());
            } else if let Some(u) = file.get("uri") {
                out.insert("url".into(), u.clone());
            }
            if let Some(m) = file.get("mimeType") {
                out.insert("mediaType".into(), m.clone());
            }
            if let Some(n) = file.get("name") {
                out.insert("filename".into(), n.clone());
            }
        }
        Some("data") => {
            let data = obj.get("data").cloned().unwrap_or_default();
            match (relay_wrapped(p), data) {
                (true, Value::Object(mut d)) => {
                    out.insert("data".into(), d.remove("value").unwrap_or_default());
                    if let Some(Value::Object(m)) = out.get_mut("metadata") {
                        m.remove(WRAPPED);
                        if m.is_empty() {
                            out.remove("metadata");
                        }
                    }
                }
                (_, data) => {
                    out.insert("data".into(), data);
                }
            }
        }
        // Already v1.0 (or unknown): as is.
        _ => return p.clone(),
    }
    Value::Object(out)
}

/// A part from an agent's reply in v0.3's shape; unrecognised parts pass through.
fn part_to_v03_lenient(p: &Value) -> Value {
    part_to_v03(p, "part").unwrap_or_else(|_| p.clone())
}

fn role_v03(r: &str) -> String {
    match r {
        "ROLE_USER" => "user".into(),
        "ROLE_AGENT" => "agent".into(),
        other => other.strip_prefix("ROLE_").map(str::to_lowercase).unwrap_or_else(|| other.to_string()),
    }
}

fn role_v10(r: &str) -> String {
    if r.starts_with("ROLE_") { r.to_string() } else { format!("ROLE_{}", r.to_uppercase()) }
}

fn state_v03(s: &str) -> String {
    match s.strip_prefix("TASK_STATE_") {
        Some("UNSPECIFIED") => "unknown".into(),
        Some(rest) => rest.to_lowercase().replace('_', "-"),
        None => s.to_string(),
    }
}

fn state_v10(s: &str) -> String {
    if s.starts_with("TASK_STATE_") {
        return s.to_string();
    }
    match s {
        "unknown" => "TASK_STATE_UNSPECIFIED".into(),
        other => format!("TASK_STATE_{}", other.to_uppercase().replace('-', "_")),
    }
}

fn map_array(v: Option<&Value>, f: impl Fn(&Value) -> Value) -> Option<Value> {
    v.and_then(Value::as_array).map(|a| Value::Array(a.iter().map(f).collect()))
}

/// A message (either generation) in `to`'s shape.
pub fn message_to(m: &Value, to: AgentVersion) -> Value {
    let Some(obj) = m.as_object() else { return m.clone() };
    let mut out = obj.clone();
    match to {
        AgentVersion::V03 => {
            out.insert("kind".into(), "message".into());
            if let Some(r) = obj.get("role").and_then(Value::as_str) {
                out.insert("role".into(), role_v03(r).into());
            }
            if let Some(parts) = map_array(obj.get("parts"), part_to_v03_lenient) {
                out.insert("parts".into(), parts);
            }
        }
        AgentVersion::V10 => {
            out.remove("kind");
            if let Some(r) = obj.get("role").and_then(Value::as_str) {
                out.insert("role".into(), role_v10(r).into());
            }
            let parts = map_array(obj.get("parts"), |p| part_to_v10(&part_to_v03_lenient(p)));
            if let Some(parts) = parts {
                out.insert("parts".into(), parts);
            }
        }
    }
    Value::Object(out)
}

/// A task (either generation) in `to`'s shape: states, its status message, artifacts'
/// parts and history.
pub fn task_to(t: &Value, to: AgentVersion) -> Value {
    let Some(obj) = t.as_object() else { return t.clone() };
    let mut out = obj.clone();
    match to {
        AgentVersion::V03 => out.insert("kind".into(), "task".into()),
        AgentVersion::V10 => out.remove("kind"),
    };
    if let Some(status) = obj.get("status").and_then(Value::as_object) {
        let mut s = status.clone();
        if let Some(state) = status.get("state").and_then(Value::as_str) {
            let state = match to {
                AgentVersion::V03 => state_v03(state),
                AgentVersion::V10 => state_v10(state),
            };
            s.insert("state".into(), state.into());
        }
        if let Some(m) = status.get("message") {
            s.insert("message".into(), message_to(m, to));
        }
        out.insert("status".into(), Value::Object(s));
    }
    if let Some(history) = map_array(obj.get("history"), |m| message_to(m, to)) {
        out.insert("history".into(), history);
    }
    let artifacts = map_array(obj.get("artifacts"), |a| {
        let Some(a) = a.as_object() else { return a.clone() };
        let mut a = a.clone();
        let parts = map_array(a.get("parts"), |p| match to {
            AgentVersion::V03 => part_to_v03_lenient(p),
            AgentVersion::V10 => part_to_v10(&part_to_v03_lenient(p)),
        });
        if let Some(parts) = parts {
            a.insert("parts".into(), parts);
        }
        Value::Object(a)
    });
    if let Some(artifacts) = artifacts {
        out.insert("artifacts".into(), artifacts);
    }
    Value::Object(out)
}

/// What an agent's `result` is.
enum ResultKind<'a> {
    Message(&'a Value),
    Task(&'a Value),
    Other,
}

fn classify(result: &Value) -> ResultKind<'_> {
    match result.get("kind").and_then(Value::as_str) {
        Some("message") => return ResultKind::Message(result),
        Some("task") => return ResultKind::Task(result),
        _ => {}
    }
    if let Some(m) = result.get("message").filter(|m| m.is_object()) {
        return ResultKind::Message(m);
    }
    if let Some(t) = result.get("task").filter(|t| t.is_object()) {
        return ResultKind::Task(t);
    }
    if result.get("id").is_some() && result.get("status").is_some() {
        return ResultKind::Task(result);
    }
    ResultKind::Other
}

/// An agent's JSON-RPC response rendered for a caller reading generation `to`, under the
/// caller's own request id. Errors pass through (the codes are the same in both
/// generations).
pub fn reply_to(response: &Value, op: Operation, to: AgentVersion, caller_id: &Value) -> Value {
    let mut out = Map::new();
    out.insert("jsonrpc".into(), "2.0".into());
    out.insert("id".into(), caller_id.clone());
    if let Some(e) = response.get("error") {
        out.insert("error".into(), e.clone());
        return Value::Object(out);
    }
    let Some(result) = response.get("result") else {
        return response.clone();
    };
    let rendered = match (classify(result), to) {
        (ResultKind::Message(m), AgentVersion::V03) => message_to(m, to),
        (ResultKind::Task(t), AgentVersion::V03) => task_to(t, to),
        (ResultKind::Message(m), AgentVersion::V10) => serde_json::json!({ "message": message_to(m, to) }),
        (ResultKind::Task(t), AgentVersion::V10) if op == Operation::SendMessage => {
            serde_json::json!({ "task": task_to(t, to) })
        }
        (ResultKind::Task(t), AgentVersion::V10) => task_to(t, to),
        (ResultKind::Other, _) => result.clone(),
    };
    out.insert("result".into(), rendered);
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parts_round_trip_between_generations() {
        for (v03, v10) in [
            (json!({"kind": "text", "text": "hi"}), json!({"text": "hi"})),
            (
                json!({"kind": "file", "file": {"bytes": "aGk=", "mimeType": "text/plain", "name": "a.txt"}}),
                json!({"raw": "aGk=", "mediaType": "text/plain", "filename": "a.txt"}),
            ),
            (json!({"kind": "file", "file": {"uri": "https://x.example/a.png"}}), json!({"url": "https://x.example/a.png"})),
            (json!({"kind": "data", "data": {"a": 1}, "metadata": {"m": true}}), json!({"data": {"a": 1}, "metadata": {"m": true}})),
        ] {
            assert_eq!(part_to_v10(&v03), v10, "v0.3 → v1.0 of {v03}");
            assert_eq!(part_to_v03(&v10, "p").unwrap(), v03, "v1.0 → v0.3 of {v10}");
            assert_eq!(part_to_v03(&v03, "p").unwrap(), v03, "v0.3 kept: {v03}");
        }
        // v1.0 data that is not an object: wrapped (and marked) for v0.3, as sent for v1.0.
        for value in [json!([1, 2]), json!(5), json!("s"), json!(null)] {
            let v10 = json!({"data": value});
            let v03 = part_to_v03(&v10, "p").unwrap();
            assert_eq!(v03, json!({"kind": "data", "data": {"value": value}, "metadata": {WRAPPED: true}}));
            assert_eq!(part_to_v10(&v03), v10, "{value} round trip");
            assert_eq!(part_to_v10(&part_to_v03(&v03, "p").unwrap()), v10, "{value} through v0.3 twice");
        }
        let with_meta = json!({"data": [1], "metadata": {"m": 1}});
        assert_eq!(part_to_v10(&part_to_v03(&with_meta, "p").unwrap()), with_meta);
        let null_meta = json!({"data": 5, "metadata": null});
        assert_eq!(part_to_v10(&part_to_v03(&null_meta, "p").unwrap()), json!({"data": 5}));
        // An object that only looks wrapped is left alone.
        let plain = json!({"kind": "data", "data": {"value": [1, 2]}});
        assert_eq!(part_to_v10(&plain), json!({"data": {"value": [1, 2]}}));
    }

    #[test]
    fn bad_parts_name_the_field() {
        let e = part_to_v03(&json!({"kind": "text", "text": 5}), "params.message.parts[0]").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("params.message.parts[0].text"));
        let e = part_to_v03(&json!({"kind": "video"}), "params.message.parts[1]").unwrap_err();
        assert!(e.message.contains("video"), "{}", e.message);
        let e = part_to_v03(&json!("text"), "params.message.parts[2]").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("params.message.parts[2]"));
        assert!(part_to_v03(&json!({"kind": "file", "file": {}}), "p").is_err());
        assert!(part_to_v03(&json!({}), "p").is_err());
    }

    #[test]
    fn replies_are_rendered_for_the_callers_generation() {
        let from_v10 = json!({"jsonrpc": "2.0", "id": 7, "result": {"message": {
            "messageId": "m", "role": "ROLE_AGENT", "parts": [{"text": "pong"}]}}});
        let for_v03 = reply_to(&from_v10, Operation::SendMessage, AgentVersion::V03, &json!("caller-1"));
        assert_eq!(for_v03["id"], "caller-1");
        assert_eq!(
            for_v03["result"],
            json!({"kind": "message", "messageId": "m", "role": "agent",
            "parts": [{"kind": "text", "text": "pong"}]})
        );

        let from_v03 = json!({"jsonrpc": "2.0", "id": 1, "result": {"kind": "task", "id": "t", "contextId": "c",
            "status": {"state": "input-required", "message": {"kind": "message", "role": "agent", "messageId": "x",
            "parts": [{"kind": "text", "text": "more?"}]}},
            "artifacts": [{"artifactId": "a", "parts": [{"kind": "data", "data": {"k": 1}}]}]}});
        let for_v10 = reply_to(&from_v03, Operation::SendMessage, AgentVersion::V10, &json!(1));
        let task = &for_v10["result"]["task"];
        assert_eq!(task["status"]["state"], "TASK_STATE_INPUT_REQUIRED");
        assert_eq!(task["status"]["message"]["role"], "ROLE_AGENT");
        assert_eq!(task["status"]["message"]["parts"], json!([{"text": "more?"}]));
        assert_eq!(task["artifacts"][0]["parts"], json!([{"data": {"k": 1}}]));
        assert!(task.get("kind").is_none());
        // GetTask answers a bare task in v1.0.
        let got = reply_to(&from_v03, Operation::GetTask, AgentVersion::V10, &json!(1));
        assert_eq!(got["result"]["id"], "t");

        let err = json!({"jsonrpc": "2.0", "id": 3, "error": {"code": -32601, "message": "Method not found"}});
        assert_eq!(reply_to(&err, Operation::SendMessage, AgentVersion::V03, &json!(9))["error"]["code"], -32601);
        assert_eq!(state_v03("TASK_STATE_UNSPECIFIED"), "unknown");
        assert_eq!(state_v10("canceled"), "TASK_STATE_CANCELED");
    }
}
