//! X5: agent URLs must be http(s) and must not resolve to loopback, link-local, private,
//! or metadata addresses — unless an explicit dev/test flag allows loopback (only).

use std::net::IpAddr;

/// Why a URL was refused (safe to show: it names no resolved address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub &'static str);

/// Where a URL points: an address literal or a name to resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

/// Scheme, host and port of an http(s) URL, read by the WHATWG URL parser — the one the
/// HTTP client that later connects uses (reqwest is built on the same `url` crate), so
/// the host judged here is the host connected to (a hand-written split once read
/// `http://169.254.169.254\.x.example/` as a name under example while the client went to
/// the metadata address). Forms only some parsers accept are refused outright.
pub fn parse(url: &str) -> Result<(&'static str, Host, u16), Refused> {
    if url.chars().any(|c| c == '\\' || c.is_whitespace() || c.is_control()) {
        return Err(Refused("the URL has characters URLs do not carry (backslash, space or control)"));
    }
    let u = url::Url::parse(url).map_err(|_| Refused("the URL is not a valid http(s) URL"))?;
    let scheme = match u.scheme() {
        "http" => "http",
        "https" => "https",
        _ => return Err(Refused("the URL must start with http:// or https://")),
    };
    if !u.username().is_empty() || u.password().is_some() {
        return Err(Refused("the URL must not carry credentials"));
    }
    let host = match u.host() {
        Some(url::Host::Ipv4(v4)) => Host::Ip(IpAddr::V4(v4)),
        Some(url::Host::Ipv6(v6)) => Host::Ip(IpAddr::V6(v6)),
        Some(url::Host::Domain(d)) if !d.is_empty() => Host::Name(d.to_string()),
        _ => return Err(Refused("the URL has no host")),
    };
    let port = u.port_or_known_default().ok_or(Refused("the URL has no port"))?;
    Ok((scheme, host, port))
}

fn forbidden(ip: IpAddr, allow_loopback: bool) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                return (!allow_loopback).then_some("the URL resolves to a loopback address");
            }
            // RFC 1918, shared (CGNAT) 100.64/10, IETF protocol 192.0.0/24, benchmarking 198.18/15.
            if v4.is_private()
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0], o[1], o[2]) == (192, 0, 0)
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
            {
                return Some("the URL resolves to a private address");
            }
            if v4.is_link_local() {
                return Some("the URL resolves to a link-local or metadata address");
            }
            if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() || o[0] == 0 || o[0] >= 240 {
                return Some("the URL resolves to a non-routable address");
            }
            None
        }
        IpAddr::V6(v6) => {
            // IPv4 carried inside IPv6 is judged as the IPv4 address it reaches:
            // mapped ::ffff:a.b.c.d, compatible ::a.b.c.d, NAT64 64:ff9b::/96, 6to4 2002::/16.
            let seg = v6.segments();
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden(IpAddr::V4(v4), allow_loopback);
            }
            let embedded = |hi: u16, lo: u16| IpAddr::V4(std::net::Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8));
            if seg[..6] == [0, 0, 0, 0, 0, 0] && !v6.is_loopback() && !v6.is_unspecified() {
                return forbidden(embedded(seg[6], seg[7]), allow_loopback);
            }
            if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return forbidden(embedded(seg[6], seg[7]), allow_loopback);
            }
            if seg[0] == 0x2002 {
                return forbidden(embedded(seg[1], seg[2]), allow_loopback);
            }
            let seg0 = seg[0];
            if v6.is_loopback() {
                return (!allow_loopback).then_some("the URL resolves to a loopback address");
            }
            // Unique local fc00::/7 and the old site-local fec0::/10.
            if (seg0 & 0xfe00) == 0xfc00 || (seg0 & 0xffc0) == 0xfec0 {
                return Some("the URL resolves to a private address");
            }
            if (seg0 & 0xffc0) == 0xfe80 || v6.segments() == [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254] {
                return Some("the URL resolves to a link-local or metadata address");
            }
            if v6.is_unspecified() || v6.is_multicast() {
                return Some("the URL resolves to a non-routable address");
            }
            None
        }
    }
}

/// Checks one address (what a connection is about to be made to).
pub fn check_ip(ip: IpAddr, allow_loopback: bool) -> Result<(), Refused> {
    match forbidden(ip, allow_loopback) {
        Some(why) => Err(Refused(why)),
        None => Ok(()),
    }
}

/// The longest a host name may take to resolve (a black-holed DNS name would otherwise
/// hold its caller for the system resolver's whole retry schedule).
pub const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Lookups in flight at once. The system resolver runs on blocking threads that a
/// timeout does not free (a black-holed name holds one for the resolver's whole retry
/// schedule): bounded here, so callers who send such names cannot use up the threads
/// everything else needs.
const MAX_LOOKUPS: usize = 32;

/// Resolves a name within [`RESOLVE_TIMEOUT`] (waiting for a free lookup included).
pub async fn resolve(name: &str, port: u16) -> Result<Vec<std::net::SocketAddr>, Refused> {
    static LOOKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_LOOKUPS);
    let lookup = async {
        let permit = LOOKUPS.acquire().await.map_err(|_| Refused("the URL's host does not resolve"))?;
        let name = name.to_string();
        // The permit goes with the blocking lookup, however long it takes, not with the caller.
        let task = tokio::spawn(async move {
            let r = tokio::net::lookup_host((name.as_str(), port)).await.map(|a| a.collect::<Vec<_>>());
            drop(permit);
            r
        });
        match task.await {
            Ok(Ok(a)) => Ok(a),
            _ => Err(Refused("the URL's host does not resolve")),
        }
    };
    match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
        Err(_) => Err(Refused("the URL's host did not resolve in time")),
        Ok(r) => r,
    }
}

/// Checks a URL and every address its host resolves to.
pub async fn check(url: &str, allow_loopback: bool) -> Result<(), Refused> {
    let (_, host, port) = parse(url)?;
    let addrs: Vec<IpAddr> = match host {
        Host::Ip(ip) => vec![ip],
        Host::Name(name) => resolve(&name, port).await?.into_iter().map(|a| a.ip()).collect(),
    };
    if addrs.is_empty() {
        return Err(Refused("the URL's host does not resolve"));
    }
    for ip in addrs {
        if let Some(why) = forbidden(ip, allow_loopback) {
            return Err(Refused(why));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_internal_targets_and_allows_loopback_only_when_asked() {
        for (url, allow) in [
            ("http://127.0.0.1:8000/", false),
            ("http://[::1]:80/", false),
            ("http://10.1.2.3/", true),
            ("http://172.16.0.1/", true),
            ("http://192.168.1.1/", true),
            ("http://100.64.0.1/", true),
            ("http://169.254.169.254/latest/meta-data", true),
            ("http://[fe80::1]/", true),
            ("http://[fd00:ec2::254]/", true),
            ("http://[::ffff:10.0.0.1]/", true),
            ("http://0.0.0.0/", true),
            ("ftp://example.com/", true),
            ("http://user:pw@127.0.0.1/", true),
            ("127.0.0.1:80", true),
            ("http://:80/", true),
            ("http://127.0.0.1:notaport/", true),
            // The host reqwest would connect to is the metadata address.
            ("http://169.254.169.254\\.x.example.com/", true),
            ("http://2852039166/", true),          // 169.254.169.254 in decimal
            ("http://0x7f.1/", false),             // 127.0.0.1
            ("http://[::a9fe:a9fe]/", true),       // IPv4-compatible 169.254.169.254
            ("http://[64:ff9b::a00:1]/", true),    // NAT64 10.0.0.1
            ("http://[2002:a9fe:a9fe::1]/", true), // 6to4 169.254.169.254
            ("http://[fec0::1]/", true),
            ("http://192.0.0.8/", true),
            ("http://198.18.0.1/", true),
            ("http://240.0.0.1/", true),
            ("http://exa mple.com/", true),
        ] {
            assert!(check(url, allow).await.is_err(), "{url} (allow_loopback={allow}) must be refused");
        }
        assert!(check("http://127.0.0.1:8000/a2a", true).await.is_ok());
        assert!(check("http://[::1]:8000", true).await.is_ok());
        assert!(check("https://93.184.216.34/", false).await.is_ok(), "a public address literal passes (no traffic is sent)");
    }
}
