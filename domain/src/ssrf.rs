//! X5: agent URLs must be http(s) and must not resolve to loopback, link-local, private,
//! or metadata addresses — unless an explicit dev/test flag allows loopback (only).

use std::net::IpAddr;

/// Why a URL was refused (safe to show: it names no resolved address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub &'static str);

/// Scheme, host and port of an http(s) URL.
pub fn parse(url: &str) -> Result<(&str, String, u16), Refused> {
    let (scheme, rest) = url.split_once("://").ok_or(Refused("the URL must start with http:// or https://"))?;
    let default_port = match scheme {
        "http" => 80,
        "https" => 443,
        _ => return Err(Refused("the URL must start with http:// or https://")),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err(Refused("the URL must not carry credentials"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or(Refused("malformed IPv6 host"))?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(Refused("the URL has no host"));
    }
    let port = match port {
        Some(p) => p.parse().map_err(|_| Refused("the URL's port is not a number"))?,
        None => default_port,
    };
    Ok((scheme, host, port))
}

fn forbidden(ip: IpAddr, allow_loopback: bool) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                return (!allow_loopback).then_some("the URL resolves to a loopback address");
            }
            if v4.is_private() || (o[0] == 100 && (64..128).contains(&o[1])) {
                return Some("the URL resolves to a private address");
            }
            if v4.is_link_local() {
                return Some("the URL resolves to a link-local or metadata address");
            }
            if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() || o[0] == 0 {
                return Some("the URL resolves to a non-routable address");
            }
            None
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden(IpAddr::V4(v4), allow_loopback);
            }
            let seg0 = v6.segments()[0];
            if v6.is_loopback() {
                return (!allow_loopback).then_some("the URL resolves to a loopback address");
            }
            if (seg0 & 0xfe00) == 0xfc00 {
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

/// Checks a URL and every address its host resolves to.
pub async fn check(url: &str, allow_loopback: bool) -> Result<(), Refused> {
    let (_, host, port) = parse(url)?;
    let addrs: Vec<IpAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|_| Refused("the URL's host does not resolve"))?
            .map(|a| a.ip())
            .collect(),
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
        ] {
            assert!(check(url, allow).await.is_err(), "{url} (allow_loopback={allow}) must be refused");
        }
        assert!(check("http://127.0.0.1:8000/a2a", true).await.is_ok());
        assert!(check("http://[::1]:8000", true).await.is_ok());
        assert!(check("https://93.184.216.34/", false).await.is_ok(), "a public address literal passes (no traffic is sent)");
    }
}
