//! The one place that writes answers tollgate makes itself.

use super::Ctx;
use crate::error::Refusal;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
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

/// Writes `{"error","message"}` with the status and headers the SPEC fixes.
pub async fn refuse(session: &mut Session, ctx: &mut Ctx, refusal: &Refusal) -> Result<()> {
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
    ctx.error = Some(refusal.code());
    send(session, ctx, h, body).await
}

/// Plain-text answers (health and readiness probes).
pub async fn text(session: &mut Session, ctx: &mut Ctx, status: u16, body: &str) -> Result<()> {
    let h = header(status, "text/plain; charset=utf-8", body.len(), ctx)?;
    send(session, ctx, h, body.as_bytes().to_vec()).await
}
