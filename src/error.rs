//! Every answer tollgate makes itself instead of the upstream, with its
//! status, its stable error code and a sentence for humans. One renderer
//! (`proxy::respond`) turns these into the JSON body the README documents.

use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    BadRequest(Cow<'static, str>),
    HeadersTooLarge {
        max_bytes: usize,
    },
    MissingToken,
    InvalidToken(Cow<'static, str>),
    TokenExpired,
    /// `require_stored`: the key has no stored token (revoked, or never
    /// stored: Redis cannot tell the two apart).
    TokenNotStored,
    KeyBlocked,
    RouteForbidden,
    NoRoute,
    RateLimited {
        message: String,
        retry_after_secs: u64,
    },
    ConcurrencyLimited {
        limit: u64,
    },
    UpstreamUnavailable,
    LimiterUnavailable,
    UpstreamTimeout,
    AuthUnavailable,
    /// `require_stored`: the store cannot answer for a token it has not
    /// confirmed within `auth.jwt.store_cache`.
    TokenStoreUnavailable,
    /// Admin API: the key asked about has no stored token.
    NotFound(Cow<'static, str>),
    /// Admin API: the endpoint needs a part of the config that is absent.
    Unconfigured {
        code: &'static str,
        message: &'static str,
    },
    /// Admin API: Redis did not answer.
    RedisUnavailable,
    /// Admin API: a request body over the size it reads.
    BodyTooLarge,
    /// A path form `path_policy: strict` refuses (the sentence says which).
    BadPath(&'static str),
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::BadRequest(_) => 400,
            Refusal::HeadersTooLarge { .. } => 431,
            Refusal::MissingToken
            | Refusal::InvalidToken(_)
            | Refusal::TokenExpired
            | Refusal::TokenNotStored
            | Refusal::KeyBlocked => 401,
            Refusal::RouteForbidden => 403,
            Refusal::NoRoute => 404,
            Refusal::RateLimited { .. } | Refusal::ConcurrencyLimited { .. } => 429,
            Refusal::UpstreamUnavailable => 502,
            Refusal::LimiterUnavailable
            | Refusal::AuthUnavailable
            | Refusal::TokenStoreUnavailable => 503,
            Refusal::UpstreamTimeout => 504,
            Refusal::NotFound(_) => 404,
            Refusal::Unconfigured { .. } => 409,
            Refusal::RedisUnavailable => 503,
            Refusal::BodyTooLarge => 413,
            Refusal::BadPath(_) => 400,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Refusal::BadRequest(_) => "bad_request",
            Refusal::HeadersTooLarge { .. } => "headers_too_large",
            Refusal::MissingToken => "missing_token",
            Refusal::InvalidToken(_) => "invalid_token",
            Refusal::TokenExpired => "token_expired",
            // The SPEC's code for both: a revoked key is a missing one.
            Refusal::TokenNotStored | Refusal::KeyBlocked => "token_revoked",
            Refusal::RouteForbidden => "route_forbidden",
            Refusal::NoRoute => "no_route",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::ConcurrencyLimited { .. } => "concurrency_limited",
            Refusal::UpstreamUnavailable => "upstream_unavailable",
            Refusal::LimiterUnavailable => "limiter_unavailable",
            Refusal::UpstreamTimeout => "upstream_timeout",
            Refusal::AuthUnavailable => "auth_unavailable",
            Refusal::TokenStoreUnavailable => "token_store_unavailable",
            Refusal::NotFound(_) => "not_found",
            Refusal::Unconfigured { code, .. } => code,
            Refusal::RedisUnavailable => "redis_unavailable",
            Refusal::BodyTooLarge => "body_too_large",
            Refusal::BadPath(_) => "bad_path",
        }
    }

    pub fn message(&self) -> Cow<'_, str> {
        match self {
            Refusal::BadRequest(why) => Cow::Borrowed(why.as_ref()),
            Refusal::HeadersTooLarge { max_bytes } => Cow::Owned(format!(
                "the request line and headers are larger than {max_bytes} bytes"
            )),
            Refusal::MissingToken => "a bearer token is required".into(),
            Refusal::InvalidToken(why) => Cow::Borrowed(why.as_ref()),
            Refusal::TokenExpired => "the token has expired".into(),
            Refusal::TokenNotStored => {
                "the token is not in the token store (revoked, or never stored)".into()
            }
            Refusal::KeyBlocked => "the key is blocked".into(),
            Refusal::RouteForbidden => "the token does not allow this route".into(),
            Refusal::NoRoute => "no route matches this request".into(),
            Refusal::RateLimited { message, .. } => Cow::Borrowed(message.as_str()),
            Refusal::ConcurrencyLimited { limit } => {
                Cow::Owned(format!("limit of {limit} requests in flight exceeded"))
            }
            Refusal::UpstreamUnavailable => "the upstream is unavailable".into(),
            Refusal::LimiterUnavailable => "the rate limiter is unavailable".into(),
            Refusal::UpstreamTimeout => "the upstream did not answer in time".into(),
            Refusal::AuthUnavailable => "token verification is temporarily unavailable".into(),
            Refusal::TokenStoreUnavailable => {
                "the token store cannot be reached to check this token; try again shortly".into()
            }
            Refusal::NotFound(what) => Cow::Borrowed(what.as_ref()),
            Refusal::Unconfigured { message, .. } => Cow::Borrowed(message),
            Refusal::RedisUnavailable => "Redis did not answer".into(),
            Refusal::BodyTooLarge => "the request body is too large".into(),
            Refusal::BadPath(why) => Cow::Borrowed(why),
        }
    }

    /// The JSON body: `{"error": "<code>", "message": "<sentence>"}`.
    pub fn body(&self) -> Vec<u8> {
        serde_json::json!({ "error": self.code(), "message": self.message() })
            .to_string()
            .into_bytes()
    }

    /// The gRPC status for a gRPC client (status codes of gRPC's HTTP mapping).
    pub fn grpc_status(&self) -> u8 {
        match self.status() {
            400 | 431 => 3,  // INVALID_ARGUMENT
            401 => 16,       // UNAUTHENTICATED
            403 => 7,        // PERMISSION_DENIED
            404 => 12,       // UNIMPLEMENTED
            429 => 8,        // RESOURCE_EXHAUSTED
            502 | 503 => 14, // UNAVAILABLE
            504 => 4,        // DEADLINE_EXCEEDED
            _ => 13,         // INTERNAL
        }
    }

    pub fn is_auth_failure(&self) -> bool {
        self.status() == 401
    }

    /// The `WWW-Authenticate` challenge of a 401 (RFC 6750 §3): an error
    /// code only when a token was sent.
    pub fn challenge(&self) -> Option<&'static str> {
        match self {
            Refusal::MissingToken => Some("Bearer realm=\"tollgate\""),
            r if r.is_auth_failure() => Some("Bearer realm=\"tollgate\", error=\"invalid_token\""),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_the_spec_json() {
        let r = Refusal::NoRoute;
        let v: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(v["error"], "no_route");
        assert_eq!(v["message"], "no route matches this request");
        let r = Refusal::BadRequest("quote \" and \n newline".into());
        let v: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(v["message"], "quote \" and \n newline");
    }

    #[test]
    fn statuses_match_the_spec() {
        assert_eq!(Refusal::BadRequest("x".into()).status(), 400);
        assert_eq!(Refusal::TokenNotStored.status(), 401);
        assert_eq!(Refusal::TokenNotStored.code(), "token_revoked");
        assert_eq!(Refusal::TokenStoreUnavailable.status(), 503);
        assert_eq!(
            Refusal::TokenStoreUnavailable.code(),
            "token_store_unavailable"
        );
        assert_eq!(Refusal::TokenStoreUnavailable.grpc_status(), 14);
        assert_eq!(Refusal::RouteForbidden.status(), 403);
        assert_eq!(Refusal::UpstreamUnavailable.status(), 502);
        assert_eq!(Refusal::LimiterUnavailable.status(), 503);
        assert_eq!(Refusal::UpstreamTimeout.status(), 504);
    }
}
