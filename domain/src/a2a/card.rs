//! Which generation an agent card announces. A v1.0 card lists `supportedInterfaces`
//! with a `protocolVersion` per interface; a v0.3 card has one top-level
//! `protocolVersion` (a2a-sdk 0.3 serves it at `/.well-known/agent.json` and
//! `/.well-known/agent-card.json`; 1.x at the latter only).

use serde_json::Value;

use super::AgentVersion;

/// Where an agent's card is read from, in order, relative to the agent URL's origin.
pub const CARD_PATHS: [&str; 2] = ["/.well-known/agent-card.json", "/.well-known/agent.json"];

/// The generation the card announces; None when it names none we speak. A card offering
/// both prefers 1.0 only when one of its JSON-RPC interfaces says so.
pub fn version_of(card: &Value) -> Option<AgentVersion> {
    let jsonrpc_1x = card
        .get("supportedInterfaces")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|i| i.get("protocolBinding").and_then(Value::as_str).is_none_or(|b| b.eq_ignore_ascii_case("JSONRPC")))
        .filter_map(|i| i.get("protocolVersion").and_then(Value::as_str))
        .any(|v| v.starts_with("1."));
    if jsonrpc_1x {
        return Some(AgentVersion::V10);
    }
    match card.get("protocolVersion").and_then(Value::as_str) {
        Some(v) if v.starts_with("1.") => Some(AgentVersion::V10),
        Some(v) if v.starts_with("0.3") => Some(AgentVersion::V03),
        _ => None,
    }
}

/// The origin (`scheme://authority`) of an agent URL, where its card lives.
pub fn origin(url: &str) -> Option<&str> {
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some(&url[..scheme.len() + 3 + end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cards_of_both_sdk_generations_are_told_apart() {
        // What a2a-sdk 1.3 serves (tests/a2a_agents/agent_v10.py).
        let v10 = json!({"name": "echo-v10", "supportedInterfaces": [
            {"url": "http://127.0.0.1:9/", "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}]});
        // What a2a-sdk 0.3.26 serves (tests/a2a_agents/agent_v03.py).
        let v03 = json!({"name": "echo-v03", "protocolVersion": "0.3.0", "preferredTransport": "JSONRPC",
            "url": "http://127.0.0.1:9/"});
        assert_eq!(version_of(&v10), Some(AgentVersion::V10));
        assert_eq!(version_of(&v03), Some(AgentVersion::V03));
        assert_eq!(version_of(&json!({"name": "x"})), None);
        let grpc_only = json!({"supportedInterfaces": [{"protocolBinding": "GRPC", "protocolVersion": "1.0"}],
            "protocolVersion": "0.3.0"});
        assert_eq!(version_of(&grpc_only), Some(AgentVersion::V03));
    }

    #[test]
    fn origin_drops_path_and_query() {
        assert_eq!(origin("http://127.0.0.1:8000/a2a?x=1"), Some("http://127.0.0.1:8000"));
        assert_eq!(origin("https://agent.example"), Some("https://agent.example"));
        assert_eq!(origin("agent.example"), None);
    }
}
