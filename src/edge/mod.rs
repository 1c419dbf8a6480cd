//! The front door: every downstream connection enters here before Pingora's
//! HTTP handling. The edge admits connections up to `server.max_connections`
//! and counts them for the drain ([`Admission`], [`drain`]), terminates TLS
//! on HTTPS listeners with the certificates of the current config ([`tls`]),
//! serves HTTP/2 (ALPN `h2`, or the h2c preface when `server.h2c` is on)
//! with its own connection loop ([`h2`]), and runs the HTTP/1 keep-alive
//! loop itself so each request's head is bounded from its first byte and
//! each idle wait from its start ([`head`]).

pub mod drain;
pub mod h2;
pub mod head;
pub mod io;
pub mod linger;
pub mod scan;
pub mod stop;
pub mod tls;

use crate::config::ServerSettings;
use crate::proxy::Proxy;
use crate::state::{SharedState, State};
use async_trait::async_trait;
use drain::Drain;
use head::{HeadGuard, HeadLimits};
use io::Plain;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::listeners::ConnectionFilter;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as TcpStream;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

pub struct Edge {
    pub proxy: Arc<HttpProxy<Proxy>>,
    pub state: SharedState,
    pub drain: Arc<Drain>,
}

/// After the drain, the time answers still in flight have to finish.
pub const LAST_ANSWERS: Duration = Duration::from_secs(1);

/// What an HTTP/2 connection sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Decides at accept, before Pingora hands the connection to a task: over
/// `server.max_connections` it is closed at once (and counted in
/// `tollgate_connections_rejected_total`); else it is counted open from this
/// moment, so a drain that waits for open connections cannot miss one that
/// was accepted but whose task has not started.
pub struct Admission {
    pub state: SharedState,
    pub drain: Arc<Drain>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("open", &self.drain.open_connections())
            .finish()
    }
}

#[async_trait]
impl ConnectionFilter for Admission {
    async fn should_accept(&self, _peer: Option<&std::net::SocketAddr>) -> bool {
        let max = self.state.load().config.server.max_connections;
        self.drain.admit(max)
    }
}

impl Edge {
    /// TLS on an HTTPS listener, within the header timeout; a failed or slow
    /// handshake closes the connection.
    async fn accept_tls(&self, stream: Stream, state: &State, timeout: Duration) -> Option<Stream> {
        let local = stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied());
        let Some(listener) = local.and_then(|l| state.tls_listener(l)) else {
            return Some(stream);
        };
        match tokio::time::timeout(
            timeout,
            listener.acceptor.tls_handshake(Plain { inner: stream }),
        )
        .await
        {
            Ok(Ok(tls)) => Some(Box::new(tls)),
            Ok(Err(e)) => {
                log::debug!("TLS handshake failed: {e}");
                None
            }
            Err(_) => {
                log::debug!("TLS handshake not done within {timeout:?}");
                None
            }
        }
    }

    /// Whether a plain connection opens with the HTTP/2 preface (h2c), or
    /// `None` when it closes or stays silent past the header timeout. Reads
    /// only until the bytes so far either are the whole preface or cannot
    /// be its beginning (a short HTTP/1.0 request is shorter than the
    /// preface), then puts them back for the protocol's parser.
    async fn h2c_opening(stream: Stream, timeout: Duration) -> Option<(bool, Stream)> {
        // Plain listeners hand over TCP streams, which can put bytes back;
        // anything else is served as HTTP/1 unread.
        if !stream.as_any().is::<TcpStream>() {
            return Some((false, stream));
        }
        let mut stream = stream;
        let mut seen = [0u8; H2_PREFACE.len()];
        let mut n = 0;
        let deadline = tokio::time::Instant::now() + timeout;
        while n < H2_PREFACE.len() && seen[..n] == H2_PREFACE[..n] {
            match tokio::time::timeout_at(deadline, stream.read(&mut seen[n..])).await {
                Ok(Ok(read)) if read > 0 => n += read,
                _ => return None,
            }
        }
        let mut tcp = stream.into_any().downcast::<TcpStream>().ok()?;
        tcp.rewind(&seen[..n]);
        Some((seen == *H2_PREFACE, tcp))
    }

    /// HTTP/1: one session per request on the same connection, the head
    /// guard re-armed before each.
    async fn serve_http1(
        &self,
        stream: Stream,
        limits: HeadLimits,
        accepted: tokio::time::Instant,
        server: &ServerSettings,
        shutdown: &ShutdownWatch,
    ) {
        // `shutdown` is the drain's watch (see `process_new`).
        let guarded: Stream = Box::new(HeadGuard::new(stream, limits, accepted));
        let mut session = ServerSession::new_http1(guarded);
        // A client that half-closes after its request (FIN, RFC 9112 §9.6)
        // still gets its answer; a client that is really gone is seen when
        // the answer cannot be written.
        session.set_abort_on_close(false);
        // Requests sent before the previous answer arrived (pipelining) are
        // served in order, not refused (RFC 9112 §9.3.2). Their bytes may
        // come with the previous request's, before the head guard is
        // re-armed: such a head is bounded by the guard from the first byte
        // read after the previous request, so by up to one read more than
        // `max_header_bytes` (see `head`).
        session.set_pipelining_enabled(true);
        // Pingora sets each request's keep-alive timeout from its headers
        // (`respect_keepalive`), so idle time is bounded by the head guard;
        // what it keeps across requests is the number of reuses left, which
        // makes the last answer say `Connection: close`.
        let reuses = if limits.keepalive.is_zero() {
            Some(0)
        } else {
            server
                .max_requests_per_connection
                .map(|n| n.saturating_sub(1))
        };
        session.set_keepalive_reuses_remaining(reuses);
        let mut result = self.proxy.process_new_http(session, shutdown).await;
        while let Some((stream, persistent)) = result.map(|r| r.consume()) {
            HeadGuard::rearm(&stream);
            let mut session = ServerSession::new_http1(stream);
            if let Some(persistent) = persistent {
                persistent.apply_to_session(&mut session);
            }
            session.set_abort_on_close(false);
            result = self.proxy.process_new_http(session, shutdown).await;
        }
    }
}

#[async_trait]
impl ServerApp for Edge {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // The first request head must be whole within `header_timeout` of
        // this instant, TLS handshake and h2c detection included.
        let accepted = tokio::time::Instant::now();
        let _open = self.drain.adopt();
        // Pingora's HTTP handling closes connections once its shutdown signal
        // is set; it gets the drain's instead, which is set only when clients
        // can safely be told to reconnect (see `drain`).
        let _ = shutdown;
        let shutdown = &self.drain.watch();
        let state = self.state.load_full();
        let server = &state.config.server;
        let limits = HeadLimits {
            max_bytes: server.max_header_bytes,
            timeout: server.header_timeout,
            keepalive: server.keepalive_timeout,
        };
        let stream = self.accept_tls(stream, &state, limits.timeout).await?;
        let left = |timeout: Duration| timeout.saturating_sub(accepted.elapsed());
        let (h2, stream) = if stream.get_ssl_digest().is_some() {
            let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
            (h2, stream)
        } else if server.h2c {
            Self::h2c_opening(stream, left(limits.timeout)).await?
        } else {
            (false, stream)
        };
        let stream: Stream = Box::new(linger::Linger::new(
            stream,
            server.send_timeout,
            self.drain.clone(),
        ));
        if h2 {
            let h2_limits = h2::H2Limits {
                idle: server.h2_idle_timeout,
                max_requests: server.max_requests_per_connection,
                handshake: left(limits.timeout),
                send_timeout: server.send_timeout,
            };
            h2::serve(&self.proxy, stream, h2_limits, shutdown.clone()).await;
        } else {
            self.serve_http1(stream, limits, accepted, server, shutdown)
                .await;
        }
        None
    }

    async fn cleanup(&self) {
        // The listeners have stopped; open connections may still send.
        self.drain.wait().await;
        // Connections waiting for a next request close now; an answer still
        // being written gets one more second.
        ServerApp::cleanup(self.proxy.as_ref()).await;
        self.drain.closed_within(LAST_ANSWERS).await;
    }
}
