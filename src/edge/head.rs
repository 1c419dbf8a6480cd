//! Bounds on a request head, enforced on the connection's bytes before the
//! HTTP/1 parser sees them: at most `max_header_bytes` from the first byte of
//! the request line to the blank line that ends the head (over it: 431,
//! then the connection is closed), and the whole head within
//! `header_timeout` (else the connection is closed). Pingora's own parser
//! allows about 1 MiB and restarts its read timeout on every byte, which
//! lets a client hold memory and connections with a slow, endless head.
//!
//! [`HeadGuard`] wraps the connection's stream. It is armed before each
//! request ([`HeadGuard::arm`]); it then counts bytes until the end of the
//! head and lets everything after it (the body, the next request's idle
//! wait) through untouched.

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
}

/// Finds the end of a head: an empty line, after CRLF or a bare LF (the
/// parser accepts both). Carries its state across reads.
#[derive(Debug, Default, Clone, Copy)]
pub struct HeadEnd {
    /// The current line has no byte but CR so far (and a line ended before it).
    line_empty: bool,
}

impl HeadEnd {
    /// The index just past the end of the head in `bytes`, if it is there.
    /// Jumps from line feed to line feed: a header line is rejected at its
    /// first byte, so the cost is per line, not per byte.
    pub fn scan(&mut self, bytes: &[u8]) -> Option<usize> {
        let only_cr = |line: &[u8]| line.iter().all(|&b| b == b'\r');
        let mut start = 0;
        // Whether the line `start` begins can still be the empty one.
        let mut may_be_empty = self.line_empty;
        while let Some(at) = memchr::memchr(b'\n', &bytes[start..]) {
            let feed = start + at;
            if may_be_empty && only_cr(&bytes[start..feed]) {
                return Some(feed + 1);
            }
            start = feed + 1;
            may_be_empty = true;
        }
        self.line_empty = may_be_empty && only_cr(&bytes[start..]);
        None
    }
}

#[derive(Debug)]
enum Phase {
    /// Waiting for the first byte of the next request on a kept-alive
    /// connection: no deadline yet (the keep-alive timeout applies).
    Idle,
    /// Inside a head.
    Head {
        deadline: Instant,
        seen: usize,
        end: HeadEnd,
    },
    /// The head is complete: bytes pass through.
    Body,
    /// Over the size limit: writing the 431 answer, then failing the read.
    Refusing { answer: Arc<[u8]>, written: usize },
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
}

impl std::fmt::Debug for HeadGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadGuard")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .finish()
    }
}

fn answer_431(max_bytes: usize) -> Arc<[u8]> {
    let refusal = crate::error::Refusal::HeadersTooLarge { max_bytes };
    let body = refusal.body();
    let head = format!(
        "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\ncontent-length: {}\r\ncache-control: no-store\r\nx-request-id: {}\r\nconnection: close\r\n\r\n",
        body.len(),
        crate::proxy::new_request_id()
    );
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&body);
    bytes.into()
}

impl HeadGuard {
    /// Wraps a new connection; its first head's deadline runs from now.
    pub fn new(inner: Stream, limits: HeadLimits) -> Self {
        HeadGuard {
            inner,
            limits,
            phase: Phase::Head {
                deadline: Instant::now() + limits.timeout,
                seen: 0,
                end: HeadEnd::default(),
            },
            timer: None,
            rearm: AtomicBool::new(false),
        }
    }

    /// Before the next request on a kept-alive connection (the stream that
    /// came back from a finished request is the `HeadGuard` `Edge` made):
    /// the next head is counted from its first byte.
    pub fn rearm(stream: &Stream) {
        if let Some(guard) = stream.as_any().downcast_ref::<HeadGuard>() {
            guard.rearm.store(true, Ordering::Relaxed);
        }
    }

    /// Accounts the bytes `buf` just received from `before` on. Returns
    /// whether they are acceptable (else the phase is now `Refusing`).
    fn account(&mut self, buf: &mut ReadBuf<'_>, before: usize) -> bool {
        let new = &buf.filled()[before..];
        if new.is_empty() {
            return true;
        }
        if matches!(self.phase, Phase::Idle) {
            self.phase = Phase::Head {
                deadline: Instant::now() + self.limits.timeout,
                seen: 0,
                end: HeadEnd::default(),
            };
        }
        let Phase::Head { seen, end, .. } = &mut self.phase else {
            return true;
        };
        match end.scan(new) {
            Some(at) if *seen + at <= self.limits.max_bytes => {
                self.phase = Phase::Body;
                self.timer = None;
                true
            }
            None if *seen + new.len() <= self.limits.max_bytes => {
                *seen += new.len();
                true
            }
            _ => {
                // Nothing of this head reaches the parser.
                buf.set_filled(before);
                metrics::REQUESTS
                    .with_label_values(&["_invalid", "431", "http1"])
                    .inc();
                self.phase = Phase::Refusing {
                    answer: answer_431(self.limits.max_bytes),
                    written: 0,
                };
                false
            }
        }
    }

    fn poll_refuse(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let max = self.limits.max_bytes;
        if let Phase::Refusing { answer, written } = &mut self.phase {
            while *written < answer.len() {
                let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &answer[*written..]))?;
                if n == 0 {
                    break;
                }
                *written += n;
            }
            ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("request head larger than {max} bytes (server.max_header_bytes): answered 431"),
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
            this.phase = Phase::Idle;
            this.timer = None;
        }
        match this.phase {
            Phase::Body => return Pin::new(&mut this.inner).poll_read(cx, buf),
            Phase::Refusing { .. } => return this.poll_refuse(cx),
            Phase::Idle | Phase::Head { .. } => {}
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
            Poll::Pending => {
                let Phase::Head { deadline, .. } = this.phase else {
                    return Poll::Pending;
                };
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "request head not complete within {:?} (server.header_timeout): connection closed",
                            this.limits.timeout
                        ),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

super::io::delegate_async_write!(HeadGuard);
super::io::delegate_io_traits!(HeadGuard);

#[cfg(test)]
mod tests {
    use super::*;

    fn end_of(chunks: &[&[u8]]) -> Option<usize> {
        let mut end = HeadEnd::default();
        let mut offset = 0;
        for c in chunks {
            if let Some(i) = end.scan(c) {
                return Some(offset + i);
            }
            offset += c.len();
        }
        None
    }

    #[test]
    fn finds_the_end_of_a_head_across_reads() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody";
        assert_eq!(end_of(&[head]), Some(head.len() - 4));
        for split in 0..head.len() {
            let (a, b) = head.split_at(split);
            assert_eq!(end_of(&[a, b]), Some(head.len() - 4), "split at {split}");
        }
        assert_eq!(end_of(&[b"GET / HTTP/1.1\nHost: a\n\n"]), Some(24));
        assert_eq!(end_of(&[b"GET / HTTP/1.1\r\nHost: a\r\n"]), None);
        assert_eq!(end_of(&[b"GET / HTTP/1.1\r\nX: \r\r\n"]), None);
    }
}
