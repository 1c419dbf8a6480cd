//! Bounds on a request head, enforced on the connection's bytes before the
//! HTTP/1 parser sees them: at most `max_header_bytes` from the first byte
//! (leading empty lines included, see [`super::scan`]) to the blank line
//! that ends the head (over it: 431, then the connection is closed), and the
//! whole head within `header_timeout` (else the connection is closed).
//! Pingora's own parser allows about 1 MiB and restarts its read timeout on
//! every byte, which lets a client hold memory and connections with a slow,
//! endless head. Between requests the connection may stay idle for
//! `keepalive_timeout`, then it is closed: Pingora's own keep-alive timeout
//! is overwritten from each request's headers (`respect_keepalive`, infinite
//! for HTTP/1.1), so it cannot be the bound.
//!
//! [`HeadGuard`] wraps the connection's stream. It is re-armed before each
//! request ([`HeadGuard::rearm`]); it then counts bytes until the end of the
//! head and lets everything after it (the body) through untouched.
//!
//! It also stands in for Pingora's own answers: a head that Pingora refuses
//! before tollgate's request path sees it (a malformed request line, a
//! `CONNECT`) is answered by Pingora with an empty body and
//! `Server: Pingora`. The request path marks every request it takes
//! ([`HeadGuard::claim`]); a write on a connection whose request was not
//! taken is such an answer, and the guard sends tollgate's JSON refusal in
//! its place.

use super::scan::{HeadScan, Verdict};
use crate::error::Refusal;
use crate::metrics;
use pingora::protocols::Stream;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    pub max_bytes: usize,
    pub timeout: Duration,
    /// Idle time allowed between requests.
    pub keepalive: Duration,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for the first byte of the next request on a kept-alive
    /// connection, until `deadline`.
    Idle { deadline: Instant },
    /// Inside a head.
    Head { deadline: Instant, scan: HeadScan },
    /// The head is complete: bytes pass through.
    Body,
    /// The head was refused (too large, too many empty lines before it):
    /// writing the answer, then failing the read.
    Refusing {
        answer: Arc<[u8]>,
        written: usize,
        why: &'static str,
    },
}

/// The connection stream with the head bounds; see the module docs.
pub struct HeadGuard {
    inner: Stream,
    limits: HeadLimits,
    phase: Phase,
    /// The deadline's timer, made only when a read has to wait.
    timer: Option<Pin<Box<Sleep>>>,
    /// Set between requests (through a shared reference: the stream is
    /// boxed by then); the next read starts a new head.
    rearm: AtomicBool,
    /// The request path has taken the current request.
    claimed: AtomicBool,
    /// tollgate's answer in place of Pingora's, and how much of it is written.
    substitute: Option<(Arc<[u8]>, usize)>,
}

impl std::fmt::Debug for HeadGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadGuard")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .finish()
    }
}

/// A complete HTTP/1.1 answer in tollgate's JSON shape that closes the
/// connection.
fn answer(status: u16, code: &str, message: &str) -> Arc<[u8]> {
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\ncache-control: no-store\r\nx-request-id: {}\r\nconnection: close\r\n\r\n",
        body.len(),
        crate::proxy::new_request_id()
    );
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    metrics::REQUESTS
        .with_label_values(&["_invalid", itoa::Buffer::new().format(status), "http1"])
        .inc();
    bytes.into()
}

fn refusal(r: &Refusal) -> Arc<[u8]> {
    answer(r.status(), r.code(), &r.message())
}

/// tollgate's answer for the one Pingora starts to write in `written` (its
/// status line comes first).
fn substitute_for(written: &[u8]) -> Arc<[u8]> {
    let status = written
        .strip_prefix(b"HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|digits| std::str::from_utf8(digits).ok())
        .and_then(|digits| digits.parse::<u16>().ok())
        .unwrap_or(400);
    match status {
        405 => answer(
            405,
            "method_not_allowed",
            "this method is not supported by the proxy",
        ),
        400 => refusal(&Refusal::BadRequest(
            "the request line or headers are malformed".into(),
        )),
        other => answer(other, "bad_request", "the request cannot be served"),
    }
}

impl HeadGuard {
    /// Wraps a new connection; its first head's deadline runs from
    /// `accepted`.
    /// `accepted`: when the connection was accepted (a TLS handshake or an
    /// h2c preface wait comes out of the first head's time).
    pub fn new(inner: Stream, limits: HeadLimits, accepted: Instant) -> Self {
        HeadGuard {
            inner,
            limits,
            phase: Phase::Head {
                deadline: accepted + limits.timeout,
                scan: HeadScan::new(limits.max_bytes),
            },
            timer: None,
            rearm: AtomicBool::new(false),
            claimed: AtomicBool::new(false),
            substitute: None,
        }
    }

    /// Before the next request on a kept-alive connection (the stream that
    /// came back from a finished request is the `HeadGuard` `Edge` made):
    /// the connection is idle until the next head's first byte.
    pub fn rearm(stream: &Stream) {
        if let Some(guard) = stream.as_any().downcast_ref::<HeadGuard>() {
            guard.claimed.store(false, Ordering::Relaxed);
            guard.rearm.store(true, Ordering::Relaxed);
        }
    }

    /// The request path has the current request: what is written from now
    /// on is its answer.
    pub fn claim(stream: &Stream) {
        if let Some(guard) = stream.as_any().downcast_ref::<HeadGuard>() {
            guard.claimed.store(true, Ordering::Relaxed);
        }
    }

    /// Accounts the bytes `buf` just received from `before` on. Returns
    /// whether they are acceptable (else the phase is now `Refusing`).
    fn account(&mut self, buf: &mut ReadBuf<'_>, before: usize) -> bool {
        let new = &buf.filled()[before..];
        if new.is_empty() {
            return true;
        }
        if matches!(self.phase, Phase::Idle { .. }) {
            self.phase = Phase::Head {
                deadline: Instant::now() + self.limits.timeout,
                scan: HeadScan::new(self.limits.max_bytes),
            };
            self.timer = None;
        }
        let Phase::Head { scan, .. } = &mut self.phase else {
            return true;
        };
        let (answer, why) = match scan.feed(new) {
            Verdict::More => return true,
            Verdict::End(_) => {
                self.phase = Phase::Body;
                self.timer = None;
                return true;
            }
            Verdict::TooLarge => (
                refusal(&Refusal::HeadersTooLarge {
                    max_bytes: self.limits.max_bytes,
                }),
                "request head larger than server.max_header_bytes: answered 431",
            ),
            Verdict::TooManyBlankLines => (
                refusal(&Refusal::BadRequest(
                    "too many empty lines before the request line".into(),
                )),
                "too many empty lines before a request line: answered 400",
            ),
        };
        // Nothing of this head reaches the parser.
        buf.set_filled(before);
        self.phase = Phase::Refusing {
            answer,
            written: 0,
            why,
        };
        false
    }

    fn poll_refuse(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Phase::Refusing {
            answer,
            written,
            why,
        } = &mut self.phase
        else {
            return Poll::Ready(Ok(()));
        };
        while *written < answer.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &answer[*written..]))?;
            if n == 0 {
                break;
            }
            *written += n;
        }
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, *why)))
    }

    /// A write before the request path took the request: Pingora's own
    /// answer. tollgate's is written instead, whole; Pingora's bytes are
    /// reported as written and dropped.
    fn poll_substitute(&mut self, cx: &mut Context<'_>, first: &[u8]) -> Poll<io::Result<()>> {
        let (answer, written) = self
            .substitute
            .get_or_insert_with(|| (substitute_for(first), 0));
        while *written < answer.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &answer[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }

    fn waiting(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (deadline, idle) = match self.phase {
            Phase::Idle { deadline } => (deadline, true),
            Phase::Head { deadline, .. } => (deadline, false),
            _ => return Poll::Pending,
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(timer.as_mut().poll(cx));
        if idle {
            // Seen by the parser as the client closing between requests.
            return Poll::Ready(Ok(()));
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "request head not complete within {:?} (server.header_timeout): connection closed",
                self.limits.timeout
            ),
        )))
    }
}

impl AsyncRead for HeadGuard {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.rearm.swap(false, Ordering::Relaxed) {
            this.phase = Phase::Idle {
                deadline: Instant::now() + this.limits.keepalive,
            };
            this.timer = None;
        }
        match this.phase {
            Phase::Body => return Pin::new(&mut this.inner).poll_read(cx, buf),
            Phase::Refusing { .. } => return this.poll_refuse(cx),
            Phase::Idle { .. } | Phase::Head { .. } => {}
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.account(buf, before) {
                    Poll::Ready(Ok(()))
                } else {
                    this.poll_refuse(cx)
                }
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.waiting(cx),
        }
    }
}

impl AsyncWrite for HeadGuard {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.claimed.load(Ordering::Relaxed) {
            ready!(this.poll_substitute(cx, buf))?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.claimed.load(Ordering::Relaxed) {
            let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| b);
            ready!(this.poll_substitute(cx, first))?;
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

super::io::delegate_io_traits!(HeadGuard);
