//! The admin listener: `GET /metrics` for Prometheus, and the bearer-protected
//! `/admin/` API (absent `admin.token` => `/admin/` answers 404). Every error
//! is a [`Refusal`], in the same JSON shape and with the same codes as the
//! proxy's own answers.

mod handlers;

use crate::error::Refusal;
use crate::metrics;
use crate::ratelimit::Limiter;
use crate::state::SharedState;
use async_trait::async_trait;
use http::{header, HeaderValue, Method, Response, StatusCode};
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

/// An answer with a body; built field by field, so it cannot fail.
fn answer(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Answer {
    let len = body.len();
    let mut answer = Response::new(body);
    *answer.status_mut() = status;
    let headers = answer.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    answer
}

pub fn json_answer(status: StatusCode, body: &serde_json::Value) -> Answer {
    answer(status, "application/json", body.to_string().into_bytes())
}

fn refusal(r: &Refusal) -> Answer {
    let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut answer = answer(status, "application/json", r.body());
    if let Some(challenge) = r.challenge() {
        answer.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
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

async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Refusal> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(Refusal::BodyTooLarge);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(_) => return Err(Refusal::BadRequest("cannot read the request body".into())),
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
        let mut answer = self.handle(session).await.unwrap_or_else(|r| refusal(&r));
        if let Ok(v) = HeaderValue::from_str(&id) {
            answer
                .headers_mut()
                .insert(crate::proxy::respond::REQUEST_ID, v);
        }
        answer
    }
}

impl AdminApp {
    async fn handle(&self, session: &mut ServerSession) -> Result<Answer, Refusal> {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let query = req.uri.query().map(str::to_string);
        let method = req.method.clone();
        if path == "/metrics" {
            return Ok(answer(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                metrics::render(),
            ));
        }
        if !(path == "/admin" || path.starts_with("/admin/")) {
            return Err(Refusal::NoRoute);
        }
        let state = self.state.load_full();
        let expected = state
            .config
            .admin
            .token
            .as_deref()
            .ok_or(Refusal::NoRoute)?;
        let given = req
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| crate::auth::bearer_token(Some(v.as_bytes())))
            .ok_or(Refusal::MissingToken)?;
        if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            return Err(Refusal::InvalidToken("wrong admin token".into()));
        }
        let body = read_body(session).await?;
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
            _ => Err(Refusal::NoRoute),
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
