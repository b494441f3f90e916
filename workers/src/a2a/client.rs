//! The HTTP client that calls agents (J6), with X5 enforced at delivery time, on the
//! address actually connected to: a host name is resolved by our resolver, which hands
//! the connector only addresses that pass the SSRF rules — so there is no window between
//! a check and the connection for DNS to answer differently (rebinding). Before each
//! request the URL's host is checked as it resolves now, so a name that moved to a
//! private address is refused even while a pooled connection to its old address is open.
//! Redirects are not followed, proxies from the environment are not used.
//!
//! Timeouts (seed 002: a client without them let an edge's timeout fire first): connect
//! 10 s (TCP and TLS together), response headers 60 s, no whole-request timeout (agents
//! may think for minutes while streaming their answer), 60 s between body reads.

use molecule_domain::ssrf::{self, Host, Refused};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const HEADERS_TIMEOUT: Duration = Duration::from_secs(60);
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The most of an agent's answer read (the A2A request cap).
pub const MAX_RESPONSE_BYTES: usize = molecule_domain::a2a::BODY_LIMIT;

/// Resolves with the system resolver and keeps only the addresses X5 allows.
struct CheckedResolver {
    allow_loopback: bool,
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_loopback = self.allow_loopback;
        let host = name.as_str().to_string();
        Box::pin(async move {
            // Not resolving is a transport failure (it may later), not a refusal.
            let addrs: Vec<SocketAddr> = ssrf::resolve(&host, 0)
                .await
                .map_err(|r| Box::new(std::io::Error::other(r.to_string())) as Box<dyn std::error::Error + Send + Sync>)?;
            if addrs.is_empty() {
                return Err(Box::new(Refused("the URL's host does not resolve")) as _);
            }
            // Every address must pass, as at registration: a name that resolves to one
            // public and one private address is refused, not half-used.
            for a in &addrs {
                ssrf::check_ip(a.ip(), allow_loopback).map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// What went wrong calling an agent.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// X5 refused the address: never retried.
    #[error("the agent's URL is refused: {0}")]
    Refused(Refused),
    /// Connect, TLS, reset, header timeout…: worth retrying.
    #[error("{0}")]
    Transport(String),
}

/// An agent's answer: HTTP status and body (at most [`MAX_RESPONSE_BYTES`]).
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

#[derive(Clone)]
pub struct AgentClient {
    http: reqwest::Client,
    allow_loopback: bool,
}

impl AgentClient {
    /// Fails only when the TLS backend cannot be set up; then no agent can be called, and
    /// the process must not start its pools with a client that lacks these rules.
    pub fn new(allow_loopback: bool) -> Result<AgentClient, String> {
        let http = reqwest::Client::builder()
            .dns_resolver(Arc::new(CheckedResolver { allow_loopback }))
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot build the agent HTTP client: {e}"))?;
        Ok(AgentClient { http, allow_loopback })
    }

    /// X5 before each request, on what the URL's host is now: an address literal, or
    /// every address its name resolves to at this moment — a pooled connection made
    /// while the name pointed elsewhere is not a reason to send. (New connections are
    /// checked again by the resolver, on the addresses they use.) `trusted`: the URL the
    /// platform itself assigned to the workspace (a loopback port on its own engine).
    async fn check_target(&self, url: &str, trusted: bool) -> Result<(), CallError> {
        let (_, host, port) = ssrf::parse(url).map_err(CallError::Refused)?;
        if trusted {
            return Ok(());
        }
        match host {
            // An address literal is connected to as is (the resolver is not asked).
            Host::Ip(ip) => ssrf::check_ip(ip, self.allow_loopback).map_err(CallError::Refused),
            Host::Name(name) => {
                // A name that does not resolve now may later: a transport failure.
                let addrs = ssrf::resolve(&name, port).await.map_err(|r| CallError::Transport(r.to_string()))?;
                for a in &addrs {
                    ssrf::check_ip(a.ip(), self.allow_loopback).map_err(CallError::Refused)?;
                }
                Ok(())
            }
        }
    }

    /// POSTs a JSON body with `bearer`, and extra headers.
    pub async fn post(&self, url: &str, trusted: bool, bearer: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Result<Answer, CallError> {
        self.check_target(url, trusted).await?;
        let mut req = self
            .http
            .post(url)
            .bearer_auth(bearer)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.answer(req, HEADERS_TIMEOUT).await
    }

    /// GETs a small JSON document (an agent card), 10 s in all.
    pub async fn get(&self, url: &str, trusted: bool) -> Result<Answer, CallError> {
        self.check_target(url, trusted).await?;
        let req = self.http.get(url).header(reqwest::header::ACCEPT, "application/json");
        tokio::time::timeout(Duration::from_secs(10), self.answer(req, Duration::from_secs(10)))
            .await
            .unwrap_or_else(|_| Err(CallError::Transport("no answer within 10 s".into())))
    }

    async fn answer(&self, req: reqwest::RequestBuilder, headers_within: Duration) -> Result<Answer, CallError> {
        let mut resp = match tokio::time::timeout(headers_within, req.send()).await {
            Err(_) => return Err(CallError::Transport(format!("no response headers within {} s", headers_within.as_secs()))),
            Ok(Err(e)) => return Err(classify(&e)),
            Ok(Ok(r)) => r,
        };
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    let room = MAX_RESPONSE_BYTES.saturating_sub(body.len());
                    body.extend_from_slice(&c[..c.len().min(room)]);
                    if body.len() >= MAX_RESPONSE_BYTES {
                        break; // the rest is not read: the answer is over the cap
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(CallError::Transport(format!("reading the answer failed: {}", describe(&e)))),
            }
        }
        Ok(Answer { status, body })
    }
}

/// A refusal by our resolver surfaces somewhere in reqwest's error chain.
fn classify(e: &reqwest::Error) -> CallError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Refused>() {
            return CallError::Refused(r.clone());
        }
        source = s.source();
    }
    CallError::Transport(describe(e))
}

/// A transport error in a sentence, without the URL (which may carry a token in its query).
fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_connect() {
        "could not connect to the agent"
    } else if e.is_timeout() {
        "the agent timed out"
    } else if e.is_body() || e.is_decode() {
        "the agent's answer broke off"
    } else {
        "the request to the agent failed"
    };
    // The innermost cause says why (connection refused, reset…).
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut last = None;
    while let Some(c) = cause {
        last = Some(c.to_string());
        cause = c.source();
    }
    match last {
        Some(l) if !l.is_empty() && l != e.to_string() => format!("{what}: {l}"),
        _ => what.to_string(),
    }
}
