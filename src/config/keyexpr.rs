//! Rule key expressions (`limits.rules[].key`): what a rule's key is made
//! of. The config owns the type; the limiter (`ratelimit::rules`) computes
//! a request's key from it.

use http::HeaderName;

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
}
