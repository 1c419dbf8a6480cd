//! `limits.rules`: limits keyed by what a request says about its caller —
//! the client address, the token's key or org, the route, a header, a claim —
//! joined with `+`. A rule's key is computed per request; a request that
//! lacks a part of it (no such header, no token) skips the rule rather than
//! sharing one bucket with every other such request.
//!
//! Keys are hashed (SHA-256, truncated) before they are used as limiter keys
//! or Redis key names: raw header values and api keys never appear in Redis,
//! in headers or in logs, and every rule key has the same short length.

use crate::auth::Identity;
use http::HeaderName;
use pingora::http::RequestHeader;
use sha2::{Digest, Sha256};
use std::net::IpAddr;

/// One part of a rule's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    ClientIp,
    ApiKey,
    Org,
    Route,
    Header(HeaderName),
    Claim(String),
}

/// `client_ip`, `api_key+route`, `header:X-Tenant`, `claim:sub`...
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyExpr(pub Vec<KeyPart>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyExprError {
    #[error("an empty key part in {0:?}")]
    Empty(String),
    #[error(
        "{part:?} is not a key part (client_ip, api_key, org, route, header:<Name>, claim:<name>)"
    )]
    Unknown { part: String },
    #[error("{0:?} is not a header name")]
    BadHeader(String),
    #[error("{0:?} appears twice")]
    Repeated(String),
}

impl KeyExpr {
    pub fn parse(text: &str) -> Result<KeyExpr, KeyExprError> {
        let mut parts = Vec::new();
        for raw in text.split('+').map(str::trim) {
            if raw.is_empty() {
                return Err(KeyExprError::Empty(text.into()));
            }
            let part = match raw {
                "client_ip" => KeyPart::ClientIp,
                "api_key" => KeyPart::ApiKey,
                "org" => KeyPart::Org,
                "route" => KeyPart::Route,
                _ => match raw.split_once(':') {
                    Some(("header", name)) => KeyPart::Header(
                        HeaderName::from_bytes(name.as_bytes())
                            .map_err(|_| KeyExprError::BadHeader(name.into()))?,
                    ),
                    Some(("claim", name)) if !name.is_empty() => KeyPart::Claim(name.into()),
                    _ => return Err(KeyExprError::Unknown { part: raw.into() }),
                },
            };
            if parts.contains(&part) {
                return Err(KeyExprError::Repeated(raw.into()));
            }
            parts.push(part);
        }
        Ok(KeyExpr(parts))
    }

    /// The claims a verifier must keep for this key (its `claim:` parts).
    pub fn claims(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|p| match p {
            KeyPart::Claim(c) => Some(c.as_str()),
            _ => None,
        })
    }

    /// Whether the key needs a verified token (then a route without auth
    /// never has one, and the rule is skipped there).
    pub fn needs_token(&self) -> bool {
        self.0
            .iter()
            .any(|p| matches!(p, KeyPart::ApiKey | KeyPart::Org | KeyPart::Claim(_)))
    }
}

/// What a request offers a rule's key.
pub struct Caller<'a> {
    /// `None` where no request is at hand (the admin quota view).
    pub client_ip: Option<IpAddr>,
    pub identity: Option<&'a Identity>,
    pub route: &'a str,
    pub request: Option<&'a RequestHeader>,
}

/// The limiter key of `rule` for this caller: `None` when a part is missing.
pub fn key_of(rule: &str, expr: &KeyExpr, caller: &Caller<'_>) -> Option<String> {
    let mut hash = Sha256::new();
    hash.update(rule.as_bytes());
    let mut ip_text = itoa::Buffer::new();
    for part in &expr.0 {
        // Each part is length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        let value: std::borrow::Cow<'_, [u8]> = match part {
            KeyPart::ClientIp => match caller.client_ip? {
                IpAddr::V4(v4) => std::borrow::Cow::Owned(v4.octets().to_vec()),
                IpAddr::V6(v6) => std::borrow::Cow::Owned(v6.octets().to_vec()),
            },
            KeyPart::ApiKey => caller.identity?.key.as_bytes().into(),
            KeyPart::Org => caller.identity?.org.as_deref()?.as_bytes().into(),
            KeyPart::Route => caller.route.as_bytes().into(),
            KeyPart::Header(name) => caller.request?.headers.get(name)?.as_bytes().into(),
            KeyPart::Claim(claim) => caller.identity?.forwarded(claim)?.as_bytes().into(),
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

    #[test]
    fn parses_key_expressions() {
        assert_eq!(KeyExpr::parse("client_ip").unwrap().0, [KeyPart::ClientIp]);
        let e = KeyExpr::parse("api_key + route + header:X-Tenant + claim:sub").unwrap();
        assert_eq!(e.0.len(), 4);
        assert!(e.needs_token());
        assert_eq!(e.claims().collect::<Vec<_>>(), ["sub"]);
        assert!(!KeyExpr::parse("client_ip+route").unwrap().needs_token());
        for bad in [
            "",
            "ip",
            "client_ip+",
            "header:",
            "header:bad name",
            "claim:",
            "route+route",
        ] {
            assert!(KeyExpr::parse(bad).is_err(), "{bad}");
        }
    }

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
            identity: None,
            route: "public",
            request: Some(&req),
        };
        let by_ip = KeyExpr::parse("client_ip").unwrap();
        let a = key_of("per-ip", &by_ip, &caller).unwrap();
        assert_eq!(a.len(), 34);
        assert!(a.starts_with("r:") && !a.contains("192"));
        assert_ne!(a, key_of("other-rule", &by_ip, &caller).unwrap());
        let other_ip = Caller {
            client_ip: Some("192.0.2.2".parse().unwrap()),
            ..caller
        };
        assert_ne!(a, key_of("per-ip", &by_ip, &other_ip).unwrap());
        let tenant = KeyExpr::parse("header:X-Tenant+route").unwrap();
        assert!(key_of("t", &tenant, &other_ip).is_some());
        assert_eq!(
            key_of("t", &KeyExpr::parse("api_key").unwrap(), &other_ip),
            None
        );
        let no_header = request(&[]);
        let bare = Caller {
            request: Some(&no_header),
            ..other_ip
        };
        assert_eq!(key_of("t", &tenant, &bare), None);
    }
}
