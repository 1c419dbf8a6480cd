//! The front door: every downstream connection enters here before Pingora's
//! HTTP handling. The edge counts open connections for the drain
//! ([`drain`]), terminates TLS on HTTPS listeners with the certificates of
//! the current config ([`tls`]), sends HTTP/2 (ALPN `h2`, or the h2c preface
//! when `server.h2c` is on) to Pingora's HTTP/2 handling, and runs the
//! HTTP/1 keep-alive loop itself so each request's head is bounded from its
//! first byte ([`head`]).

pub mod drain;
pub mod head;
pub mod io;
pub mod scan;
pub mod tls;

use crate::proxy::Proxy;
use crate::state::{SharedState, State};
use async_trait::async_trait;
use drain::Drain;
use head::{HeadGuard, HeadLimits};
use io::Plain;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use std::sync::Arc;
use std::time::Duration;

/// Idle time allowed between requests on a kept-alive connection (seconds).
const KEEPALIVE_SECS: u64 = 60;

pub struct Edge {
    pub proxy: Arc<HttpProxy<Proxy>>,
    pub state: SharedState,
    pub drain: Arc<Drain>,
}

/// What an HTTP/2 connection sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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

    /// Whether a plain connection opens with the HTTP/2 preface (h2c).
    async fn h2c_preface(stream: &mut Stream, timeout: Duration) -> bool {
        let mut buf = [0u8; H2_PREFACE.len()];
        matches!(
            tokio::time::timeout(timeout, stream.try_peek(&mut buf)).await,
            Ok(Ok(true))
        ) && buf == H2_PREFACE
    }

    /// HTTP/1: one session per request on the same connection, the head
    /// guard re-armed before each.
    async fn serve_http1(&self, stream: Stream, limits: HeadLimits, shutdown: &ShutdownWatch) {
        // `shutdown` is the drain's watch (see `process_new`).
        let guarded: Stream = Box::new(HeadGuard::new(stream, limits));
        let mut session = ServerSession::new_http1(guarded);
        session.set_keepalive((!*shutdown.borrow()).then_some(KEEPALIVE_SECS));
        let mut result = self.proxy.process_new_http(session, shutdown).await;
        while let Some((stream, persistent)) = result.map(|r| r.consume()) {
            HeadGuard::rearm(&stream);
            let mut session = ServerSession::new_http1(stream);
            if let Some(persistent) = persistent {
                persistent.apply_to_session(&mut session);
            }
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
        let _open = self.drain.connection();
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
        };
        let mut stream = self.accept_tls(stream, &state, limits.timeout).await?;
        let tls = stream.get_ssl_digest().is_some();
        let h2 = if tls {
            matches!(stream.selected_alpn_proto(), Some(ALPN::H2))
        } else {
            server.h2c && Self::h2c_preface(&mut stream, limits.timeout).await
        };
        if h2 {
            // Pingora's HTTP/2 handling: each stream is a request on the
            // same request path (tollgate's filters).
            return self.proxy.process_new(stream, shutdown).await;
        }
        self.serve_http1(stream, limits, shutdown).await;
        None
    }

    async fn cleanup(&self) {
        // The listeners have stopped; open connections may still send.
        self.drain.wait().await;
        ServerApp::cleanup(self.proxy.as_ref()).await;
    }
}
