//! The one place that writes answers tollgate makes itself.

use super::Ctx;
use crate::error::Refusal;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession as HttpSession;
use pingora::proxy::Session;

pub const REQUEST_ID: &str = "x-request-id";

fn header(status: u16, content_type: &str, len: usize, ctx: &Ctx) -> Result<ResponseHeader> {
    let mut h = ResponseHeader::build(status, Some(6))?;
    h.insert_header(http::header::CONTENT_TYPE, content_type)?;
    h.set_content_length(len)?;
    h.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
    h.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    Ok(h)
}

async fn send(
    session: &mut Session,
    ctx: &mut Ctx,
    mut h: ResponseHeader,
    body: Vec<u8>,
) -> Result<()> {
    ctx.status = h.status.as_u16();
    for (name, value) in ctx.extra_headers.drain(..) {
        h.insert_header(name, value)?;
    }
    // An unread request body would be taken for the next request.
    if !session.as_downstream_mut().is_body_empty() {
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(h), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await
}

/// Whether the client speaks gRPC (`content-type: application/grpc...`).
pub fn is_grpc(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// `grpc-message` is percent-encoded (the gRPC HTTP/2 protocol): bytes
/// outside printable ASCII, and `%` itself.
fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A refusal to a gRPC client in the trailers-only form: HTTP 200,
/// `content-type: application/grpc`, and `grpc-status` / `grpc-message` in
/// the response headers themselves — on HTTP/2 one HEADERS frame that ends
/// the stream, on HTTP/1.1 a head with an empty body — so every client
/// sees the status, including those that never read trailers.
async fn refuse_grpc(session: &mut Session, ctx: &mut Ctx, refusal: &Refusal) -> Result<()> {
    let mut h = ResponseHeader::build(200, Some(6))?;
    h.insert_header(http::header::CONTENT_TYPE, "application/grpc")?;
    h.insert_header("grpc-status", u16::from(refusal.grpc_status()))?;
    if let Ok(message) = http::HeaderValue::from_str(&grpc_message(&refusal.message())) {
        h.insert_header("grpc-message", message)?;
    }
    h.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
    ctx.status = refusal.status();
    ctx.grpc_refused = true;
    for (name, value) in ctx.extra_headers.drain(..) {
        h.insert_header(name, value)?;
    }
    if !session.as_downstream_mut().is_body_empty() {
        session.set_keepalive(None);
    }
    if let HttpSession::H2(h2) = session.as_downstream_mut() {
        // Pingora's session-level writer never ends an HTTP/2 stream with
        // the headers; its HTTP/2 session does when asked.
        return h2.write_response_header(Box::new(h), true);
    }
    h.set_content_length(0)?;
    session.write_response_header(Box::new(h), false).await?;
    session.write_response_body(None, true).await
}

/// Writes `{"error","message"}` with the status and headers of the README
/// (or, to a gRPC client, the matching gRPC status).
pub async fn refuse(session: &mut Session, ctx: &mut Ctx, refusal: &Refusal) -> Result<()> {
    ctx.error = Some(refusal.code());
    if is_grpc(session) {
        return refuse_grpc(session, ctx, refusal).await;
    }
    let body = refusal.body();
    let mut h = header(refusal.status(), "application/json", body.len(), ctx)?;
    if let Some(challenge) = refusal.challenge() {
        h.insert_header(http::header::WWW_AUTHENTICATE, challenge)?;
    }
    if let Refusal::RateLimited {
        retry_after_secs, ..
    } = refusal
    {
        h.insert_header(http::header::RETRY_AFTER, retry_after_secs.to_string())?;
    }
    // The Redis client tries the store again a second after a failure.
    if let Refusal::TokenStoreUnavailable = refusal {
        h.insert_header(http::header::RETRY_AFTER, "1")?;
    }
    send(session, ctx, h, body).await
}

/// Plain-text answers (health and readiness probes).
pub async fn text(session: &mut Session, ctx: &mut Ctx, status: u16, body: &str) -> Result<()> {
    let h = header(status, "text/plain; charset=utf-8", body.len(), ctx)?;
    send(session, ctx, h, body.as_bytes().to_vec()).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(
            super::grpc_message("limit of 5 requests per 5s exceeded"),
            "limit of 5 requests per 5s exceeded"
        );
        assert_eq!(super::grpc_message("100% é\n"), "100%25 %C3%A9%0A");
    }
}
