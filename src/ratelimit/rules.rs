//! `limits.rules`: limits keyed by what a request says about its caller —
//! the client address, the token's key or org, the route, a header, a claim —
//! joined with `+`. A rule's key is computed per request; a request that
//! lacks a part of it (no such header, no token) skips the rule rather than
//! sharing one bucket with every other such request.
//!
//! A client address counts IPv4 whole and IPv6 by its prefix
//! (`limits.client_ipv6_prefix`, /64 by default), so one holder of a /64
//! cannot step around a per-IP rule by changing its interface id.
//!
//! Keys are hashed (SHA-256, truncated) before they are used as limiter keys
//! or Redis key names: raw header values and api keys never appear in Redis,
//! in headers or in logs, and every rule key has the same short length.

use crate::config::{KeyExpr, KeyPart};
use pingora::http::RequestHeader;
use sha2::{Digest, Sha256};
use std::net::IpAddr;

/// What the limiter knows of a verified token: its key and the claims
/// limits look at (the token itself never reaches the limiter).
#[derive(Debug, Clone, Copy)]
pub struct Token<'a> {
    /// The rate-limit key (`api_key` claim by default).
    pub key: &'a str,
    /// The `rate_limit` claim.
    pub rate_limit: Option<u64>,
    pub tier: Option<&'a str>,
    pub org: Option<&'a str>,
    /// Claims kept for rule keys (`claim:<name>`): (name, value).
    pub claims: &'a [(String, String)],
}

impl<'a> Token<'a> {
    pub fn claim(&self, name: &str) -> Option<&'a str> {
        self.claims
            .iter()
            .find(|(c, _)| c == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What a request offers a rule's key.
pub struct Caller<'a> {
    /// `None` where no request is at hand (the admin quota view).
    pub client_ip: Option<IpAddr>,
    pub token: Option<Token<'a>>,
    pub route: &'a str,
    pub request: Option<&'a RequestHeader>,
}

/// The bytes of a client address as a rule counts it: IPv4 whole, IPv6 by
/// its first `v6_prefix` bits (one holder of a /64 is one client).
fn client_bytes(ip: IpAddr, v6_prefix: u8) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => {
            let bits = u32::from(v6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            let mut out = (u128::from(v6) & mask).to_be_bytes().to_vec();
            out.push(v6_prefix);
            out
        }
    }
}

/// The limiter key of `rule` for this caller: `None` when a part is missing.
/// `v6_prefix`: `limits.client_ipv6_prefix`.
pub fn key_of(rule: &str, expr: &KeyExpr, caller: &Caller<'_>, v6_prefix: u8) -> Option<String> {
    let mut hash = Sha256::new();
    hash.update(rule.as_bytes());
    let mut ip_text = itoa::Buffer::new();
    for part in &expr.0 {
        // Each part is length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        let value: std::borrow::Cow<'_, [u8]> = match part {
            KeyPart::ClientIp => client_bytes(caller.client_ip?, v6_prefix).into(),
            KeyPart::ApiKey => caller.token?.key.as_bytes().into(),
            KeyPart::Org => caller.token?.org?.as_bytes().into(),
            KeyPart::Route => caller.route.as_bytes().into(),
            KeyPart::Header(name) => caller.request?.headers.get(name)?.as_bytes().into(),
            KeyPart::Claim(claim) => caller.token?.claim(claim)?.as_bytes().into(),
        };
        hash.update(ip_text.format(value.len()).as_bytes());
        hash.update(b":");
        hash.update(&value);
    }
    let digest = hash.finalize();
    let mut key = String::with_capacity(2 + 32);
    key.push_str("r:");
    for b in &digest[..16] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        key.push(HEX[usize::from(b >> 4)] as char);
        key.push(HEX[usize::from(b & 0xf)] as char);
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/x", None).unwrap();
        for (k, v) in headers {
            r.insert_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn keys_are_hashed_per_rule_and_skip_missing_parts() {
        let req = request(&[("x-tenant", "acme")]);
        let caller = Caller {
            client_ip: Some("192.0.2.1".parse().unwrap()),
            token: None,
            route: "public",
            request: Some(&req),
        };
        let by_ip = KeyExpr::parse("client_ip").unwrap();
        let a = key_of("per-ip", &by_ip, &caller, 64).unwrap();
        assert_eq!(a.len(), 34);
        assert!(a.starts_with("r:") && !a.contains("192"));
        assert_ne!(a, key_of("other-rule", &by_ip, &caller, 64).unwrap());
        let other_ip = Caller {
            client_ip: Some("192.0.2.2".parse().unwrap()),
            ..caller
        };
        assert_ne!(a, key_of("per-ip", &by_ip, &other_ip, 64).unwrap());
        let tenant = KeyExpr::parse("header:X-Tenant+route").unwrap();
        assert!(key_of("t", &tenant, &other_ip, 64).is_some());
        assert_eq!(
            key_of("t", &KeyExpr::parse("api_key").unwrap(), &other_ip, 64),
            None
        );
        let no_header = request(&[]);
        let bare = Caller {
            request: Some(&no_header),
            ..other_ip
        };
        assert_eq!(key_of("t", &tenant, &bare, 64), None);
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_prefix() {
        let by_ip = KeyExpr::parse("client_ip").unwrap();
        let key = |ip: &str, prefix| {
            let caller = Caller {
                client_ip: Some(ip.parse().unwrap()),
                token: None,
                route: "r",
                request: None,
            };
            key_of("per-ip", &by_ip, &caller, prefix).unwrap()
        };
        // One /64: one client, whatever its interface id.
        assert_eq!(key("2001:db8:1:2::1", 64), key("2001:db8:1:2:ffff::9", 64));
        assert_ne!(key("2001:db8:1:2::1", 64), key("2001:db8:1:3::1", 64));
        // /128: every address its own; /48: the whole site.
        assert_ne!(key("2001:db8:1:2::1", 128), key("2001:db8:1:2::2", 128));
        assert_eq!(key("2001:db8:1:2::1", 48), key("2001:db8:1:7::2", 48));
        // IPv4 is not touched, and never meets an IPv6 key.
        assert_ne!(key("192.0.2.1", 64), key("192.0.2.2", 64));
        assert_ne!(key("::ffff:192.0.2.1", 128), key("192.0.2.1", 128));
    }
}
