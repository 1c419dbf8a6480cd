//! The front door: every downstream connection enters here before Pingora's
//! HTTP handling. The edge counts open connections for the drain
//! ([`drain`]), bounds request heads ([`head`]), and runs the HTTP/1
//! keep-alive loop itself so each request's head is bounded from its first
//! byte. HTTP/2 connections go to Pingora's own handling as they are.

pub mod drain;
pub mod head;

use crate::proxy::Proxy;
use crate::state::SharedState;
use async_trait::async_trait;
use drain::Drain;
use head::{HeadGuard, HeadLimits};
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use std::sync::Arc;

/// Idle time allowed between requests on a kept-alive connection (seconds).
const KEEPALIVE_SECS: u64 = 60;

pub struct Edge {
    pub proxy: Arc<HttpProxy<Proxy>>,
    pub state: SharedState,
    pub drain: Arc<Drain>,
}

impl Edge {
    fn head_limits(&self) -> HeadLimits {
        let state = self.state.load();
        let server = &state.config.server;
        HeadLimits {
            max_bytes: server.max_header_bytes,
            timeout: server.header_timeout,
        }
    }

    /// HTTP/1: one session per request on the same connection, the head
    /// guard re-armed before each.
    async fn serve_http1(&self, stream: Stream, shutdown: &ShutdownWatch) {
        let guarded: Stream = Box::new(HeadGuard::new(stream, self.head_limits()));
        let mut session = ServerSession::new_http1(guarded);
        session.set_keepalive((!*shutdown.borrow()).then_some(KEEPALIVE_SECS));
        let mut result = self.proxy.process_new_http(session, shutdown).await;
        while let Some((stream, persistent)) = result.map(|r| r.consume()) {
            let mut session = ServerSession::new_http1(HeadGuard::rearm(stream));
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
        self.serve_http1(stream, shutdown).await;
        None
    }

    async fn cleanup(&self) {
        // The listeners have stopped; open connections may still send.
        self.drain.wait().await;
        ServerApp::cleanup(self.proxy.as_ref()).await;
    }
}
