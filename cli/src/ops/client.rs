//! The operator commands' HTTP client: one bearer token, JSON in and out, and every way a
//! call can go wrong turned into one [`Failure`] with one clear line and an exit code.

use serde_json::Value;
use std::time::Duration;
use url::Url;

/// Exit status of the operator commands (also in their `--help`).
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_UNREACHABLE: u8 = 3;

/// Why an operator command did not do what it was asked.
#[derive(Debug)]
pub enum Failure {
    /// Bad or missing input the API was never asked about (no token, say).
    Usage(String),
    /// The API answered with an error body (`{"error": code, "detail": sentence}`).
    Api { status: u16, code: String, detail: String },
    /// The workspace (or a stop job) ended failed: the reason, as the API gave it.
    Failed(String),
    /// No answer from the API (refused, unresolvable, timed out, cut off).
    Unreachable(String),
    /// `--wait` gave up at `--timeout`.
    TimedOut(String),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => EXIT_USAGE,
            Failure::Api { .. } | Failure::Failed(_) => EXIT_FAILED,
            Failure::Unreachable(_) | Failure::TimedOut(_) => EXIT_UNREACHABLE,
        }
    }

    /// Worth polling again while waiting: the API is briefly away or its database is.
    pub fn transient(&self) -> bool {
        match self {
            Failure::Unreachable(_) => true,
            Failure::Api { status, .. } => matches!(status, 502..=504),
            _ => false,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Usage(m) | Failure::Failed(m) | Failure::Unreachable(m) | Failure::TimedOut(m) => f.write_str(m),
            Failure::Api { status, code, detail } => write!(f, "{detail} (HTTP {status}, {code})"),
        }
    }
}

/// Seconds one request may take, answer included (the API answers in milliseconds).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: String,
}

impl Client {
    pub fn new(base: Url, token: String) -> Result<Client, Failure> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("molecule-cli/", env!("CARGO_PKG_VERSION")))
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| Failure::Usage(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Client { http, base, token })
    }

    /// `base` + path segments (each percent-encoded: an id can never change the route) +
    /// query pairs.
    pub fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Url {
        let mut u = self.base.clone();
        {
            let mut path = u.path_segments_mut().expect("an http(s) URL has a path");
            path.pop_if_empty();
            for s in segments {
                path.push(s);
            }
        }
        if !query.is_empty() {
            let mut q = u.query_pairs_mut();
            for (k, v) in query {
                q.append_pair(k, v);
            }
        }
        u
    }

    pub async fn get(&self, segments: &[&str], query: &[(&str, String)]) -> Result<Value, Failure> {
        self.send(reqwest::Method::GET, self.url(segments, query), None).await
    }

    pub async fn post(&self, segments: &[&str], body: Option<&Value>) -> Result<Value, Failure> {
        self.send(reqwest::Method::POST, self.url(segments, &[]), body).await
    }

    pub async fn delete(&self, segments: &[&str]) -> Result<Value, Failure> {
        self.send(reqwest::Method::DELETE, self.url(segments, &[]), None).await
    }

    async fn send(&self, method: reqwest::Method, url: Url, body: Option<&Value>) -> Result<Value, Failure> {
        let mut req = self.http.request(method, url.clone()).bearer_auth(&self.token).header("accept", "application/json");
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req.send().await.map_err(|e| self.transport(&e))?;
        let status = res.status();
        let bytes = res.bytes().await.map_err(|e| self.transport(&e))?;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes).map_err(|_| Failure::Api {
                status: status.as_u16(),
                code: "not_json".into(),
                detail: format!("{url} answered with something that is not JSON: is --url the Molecule API?"),
            });
        }
        Err(api_error(status.as_u16(), &bytes))
    }

    /// A request that got no answer: one line naming the API's URL and the cause.
    fn transport(&self, e: &reqwest::Error) -> Failure {
        let base = self.base.as_str().trim_end_matches('/');
        if e.is_timeout() {
            return Failure::Unreachable(format!("the API at {base} did not answer within {} s", REQUEST_TIMEOUT.as_secs()));
        }
        let cause = root_cause(e);
        if e.is_connect() {
            Failure::Unreachable(format!(
                "cannot reach the API at {base}: {cause}; is `molecule serve` (or `molecule api`) running there? Set --url or MOLECULE_URL"
            ))
        } else {
            Failure::Unreachable(format!("the API at {base} did not answer: {cause}"))
        }
    }
}

/// The API's error body as one line; a body that is not one (a proxy's page) as its
/// status and a short excerpt.
pub fn api_error(status: u16, body: &[u8]) -> Failure {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        let code = v["error"].as_str();
        let detail = v["detail"].as_str().or_else(|| v["message"].as_str());
        if let (Some(code), Some(detail)) = (code, detail.or(code)) {
            return Failure::Api { status, code: code.to_string(), detail: one_line(detail, 300) };
        }
    }
    let text = String::from_utf8_lossy(body);
    let detail = if text.trim().is_empty() { "the API answered with an empty error".to_string() } else { one_line(&text, 200) };
    Failure::Api { status, code: "http_error".into(), detail }
}

/// The innermost cause (`Connection refused (os error 111)`, `failed to lookup address …`).
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Control characters (newlines included) as spaces, cut at `max` characters with `…`.
pub fn one_line(s: &str, max: usize) -> String {
    let flat: String = s.trim().chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if flat.chars().count() > max {
        let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    } else {
        flat
    }
}

/// `--url`: an http(s) URL with a host.
pub fn parse_api_url(s: &str) -> Result<Url, String> {
    let u = Url::parse(s.trim()).map_err(|e| format!("{s:?} is not a URL ({e}); expected e.g. http://127.0.0.1:8080"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(format!("{s:?}: expected an http:// or https:// URL with a host"));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(format!("{s:?}: the API's base URL takes no query or fragment"));
    }
    // Credentials in a URL end up in messages and shell history: the token goes in --token.
    if !u.username().is_empty() || u.password().is_some() {
        return Err("the API's URL must not carry a user or password (give the token with --token or MOLECULE_TOKEN)".into());
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_with_credentials_is_refused_without_echoing_them() {
        let e = parse_api_url("http://admin:hunter2@127.0.0.1:8080").unwrap_err();
        assert!(!e.contains("hunter2") && e.contains("--token"), "{e}");
    }

    #[test]
    fn ids_are_path_segments_and_a_base_path_is_kept() {
        let c = Client::new(parse_api_url("http://h:1/prefix/").unwrap(), "t".into()).unwrap();
        assert_eq!(c.url(&["jobs", "../queues"], &[]).as_str(), "http://h:1/prefix/jobs/..%2Fqueues");
        let c = Client::new(parse_api_url("http://h:1").unwrap(), "t".into()).unwrap();
        assert_eq!(
            c.url(&["jobs"], &[("status", "dead".into()), ("kind", "a&b".into())]).as_str(),
            "http://h:1/jobs?status=dead&kind=a%26b"
        );
    }

    #[test]
    fn error_bodies_become_one_line() {
        let f = api_error(401, br#"{"error":"unauthorized","detail":"invalid or revoked token"}"#);
        assert_eq!(f.to_string(), "invalid or revoked token (HTTP 401, unauthorized)");
        assert_eq!(f.exit_code(), EXIT_FAILED);
        let f = api_error(502, b"<html>\n<body>Bad gateway</body>\n</html>");
        assert_eq!(f.to_string(), "<html> <body>Bad gateway</body> </html> (HTTP 502, http_error)");
        assert!(f.transient());
        assert!(parse_api_url("ftp://x").is_err() && parse_api_url("127.0.0.1:8080").is_err());
    }
}
