//! Lingering close, and the send timeout.
//!
//! When tollgate closes a connection the client may still be sending: a
//! pipelined request after a `Connection: close` answer, the frames an HTTP/2
//! client sends after a GOAWAY (WINDOW_UPDATE, SETTINGS and PING
//! acknowledgements, requests it had not yet seen refused). Closing a socket
//! with unread bytes, or receiving bytes after it is closed, makes the kernel
//! send a reset, and a reset can make the client discard answers it has
//! received but not yet read. So when tollgate drops a connection the client
//! has not closed, [`Linger`] keeps the socket: it sends FIN (`shutdown` of
//! the write side), then reads and discards until the client closes, for at
//! most [`LINGER_TIME`] and [`LINGER_BYTES`]. nginx does the same
//! (`lingering_close`).
//!
//! [`Linger`] also bounds how long a write may wait for the client to read
//! (`server.send_timeout`): a write that makes no progress for that long
//! fails, and the connection is closed. Without it a client that stops
//! reading holds its connection, and the answer buffered for it, forever.

use pingora::protocols::Stream;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How long a closed connection is kept for the client's last bytes.
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// How much a lingering connection reads before it is closed anyway.
pub const LINGER_BYTES: usize = 256 * 1024;

/// A downstream connection's stream, closed with a linger; see the module
/// docs.
pub struct Linger {
    inner: Stream,
    /// The socket's descriptor (taken at the start: a TLS stream cannot
    /// always tell it later).
    fd: i32,
    /// The client has closed its side, or the connection failed: nothing
    /// more can arrive, no linger.
    ended: bool,
    send_timeout: Duration,
    /// Runs while a write waits for the client to read.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl std::fmt::Debug for Linger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linger")
            .field("inner", &self.inner)
            .field("ended", &self.ended)
            .finish()
    }
}

impl Linger {
    pub fn new(inner: Stream, send_timeout: Duration) -> Self {
        Linger {
            fd: inner.id(),
            inner,
            ended: false,
            send_timeout,
            stalled: None,
        }
    }

    /// Called when a write is pending: fails it once it has waited for
    /// `send_timeout`.
    fn stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if self.send_timeout.is_zero() {
            return Poll::Pending;
        }
        let timeout = self.send_timeout;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.ended = true;
        log::debug!("the client read nothing for {timeout:?} (server.send_timeout): closing");
        crate::metrics::SEND_TIMEOUTS.inc();
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("client did not read for {timeout:?} (server.send_timeout)"),
        ))
    }

    fn progress<T>(
        &mut self,
        result: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Pending => match self.stall(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
            Poll::Ready(r) => {
                self.stalled = None;
                if r.is_err() {
                    self.ended = true;
                }
                Poll::Ready(r)
            }
        }
    }
}

impl Drop for Linger {
    // `dup` of the descriptor `inner` owns: the socket outlives `inner`.
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let fd = self.fd;
        if fd < 0 {
            return;
        }
        // A second descriptor keeps the socket open once `inner` closes its
        // own (right after this).
        // SAFETY: `fd` is the open socket `inner` owns; `dup` returns a new
        // descriptor (or -1) that nothing else owns.
        let copy = unsafe { libc::dup(fd) };
        if copy < 0 {
            return;
        }
        // SAFETY: `copy` is a fresh descriptor owned by nothing else.
        let socket = unsafe { <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(copy) };
        // FIN now: the client sees the end of the answers at once.
        if socket.shutdown(std::net::Shutdown::Write).is_err()
            || socket.set_nonblocking(true).is_err()
        {
            return;
        }
        runtime.spawn(async move {
            let Ok(mut socket) = tokio::net::TcpStream::from_std(socket) else {
                return;
            };
            let deadline = Instant::now() + LINGER_TIME;
            let mut buf = [0u8; 4096];
            let mut read = 0;
            while read < LINGER_BYTES {
                match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => read += n,
                    _ => break,
                }
            }
        });
    }
}

impl AsyncRead for Linger {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &result {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                this.ended = true;
            }
            Poll::Ready(Err(_)) => this.ended = true,
            _ => {}
        }
        result
    }
}

impl AsyncWrite for Linger {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progress(result, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progress(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.progress(result, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

super::io::delegate_io_traits!(Linger);
