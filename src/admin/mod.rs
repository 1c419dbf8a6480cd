//! The admin listener: `GET /metrics` for Prometheus, and the bearer-protected
//! `/admin/` API (absent `admin.token` => `/admin/` answers 404).

mod handlers;

use crate::error::Refusal;
use crate::metrics;
use crate::ratelimit::Limiter;
use crate::state::SharedState;
use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::sync::Arc;

pub struct AdminApp {
    pub state: SharedState,
    pub limiter: Arc<Limiter>,
}

/// Largest request body the admin API reads.
const MAX_BODY: usize = 64 * 1024;

pub type Answer = Response<Vec<u8>>;

pub fn json_answer(status: u16, body: &serde_json::Value) -> Answer {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, bytes.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(bytes)
        .unwrap_or_default()
}

/// `{"error": code, "message": ...}` with any status.
pub fn error(status: u16, code: &str, message: impl AsRef<str>) -> Answer {
    json_answer(
        status,
        &serde_json::json!({ "error": code, "message": message.as_ref() }),
    )
}

fn refusal(r: &Refusal) -> Answer {
    let mut answer = error(r.status(), r.code(), r.message());
    if let Some(challenge) = r.challenge() {
        answer.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static(challenge),
        );
    }
    answer
}

/// Compares without leaking, through timing, how much of the token matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Box<Answer>> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(Box::new(error(
                        413,
                        "bad_request",
                        "the request body is too large",
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(_) => {
                return Err(Box::new(error(
                    400,
                    "bad_request",
                    "cannot read the request body",
                )))
            }
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Answer {
        let id = session
            .req_header()
            .headers
            .get(crate::proxy::respond::REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
            .map_or_else(crate::proxy::new_request_id, str::to_string);
        let mut answer = self.handle(session).await;
        if let Ok(v) = http::HeaderValue::from_str(&id) {
            answer
                .headers_mut()
                .insert(crate::proxy::respond::REQUEST_ID, v);
        }
        answer
    }
}

impl AdminApp {
    async fn handle(&self, session: &mut ServerSession) -> Answer {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let query = req.uri.query().map(str::to_string);
        let method = req.method.clone();
        if path == "/metrics" {
            let body = metrics::render();
            return Response::builder()
                .status(StatusCode::OK)
                .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                .header(http::header::CONTENT_LENGTH, body.len())
                .body(body)
                .unwrap_or_default();
        }
        if !(path == "/admin" || path.starts_with("/admin/")) {
            return refusal(&Refusal::NoRoute);
        }
        let state = self.state.load_full();
        let Some(expected) = state.config.admin.token.as_deref() else {
            return refusal(&Refusal::NoRoute);
        };
        let given = req
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| crate::auth::bearer_token(Some(v.as_bytes())))
            .unwrap_or("");
        if given.is_empty() {
            return refusal(&Refusal::MissingToken);
        }
        if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            return refusal(&Refusal::InvalidToken("wrong admin token".into()));
        }
        let body = match read_body(session).await {
            Ok(b) => b,
            Err(answer) => return *answer,
        };
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(2).collect();
        let api = handlers::Api {
            state: &state,
            limiter: &self.limiter,
        };
        match (&method, segments.as_slice()) {
            (&Method::POST, ["tokens"]) => api.issue(&body).await,
            (&Method::DELETE, ["tokens", key]) => api.revoke(key).await,
            (&Method::POST, ["tokens", key, "block"]) => api.block(key, true).await,
            (&Method::POST, ["tokens", key, "unblock"]) => api.block(key, false).await,
            (&Method::POST, ["tokens", key, "keep-alive"]) => api.keep_alive(key, &body).await,
            (&Method::GET, ["quota", key]) => api.quota(key).await,
            (&Method::GET, ["stats", "top"]) => api.top(query.as_deref()).await,
            (&Method::GET, ["stats", "unique"]) => api.unique().await,
            _ => refusal(&Refusal::NoRoute),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq_compares() {
        assert!(super::constant_time_eq(b"abc", b"abc"));
        assert!(!super::constant_time_eq(b"abc", b"abd"));
        assert!(!super::constant_time_eq(b"abc", b"abcd"));
    }
}
