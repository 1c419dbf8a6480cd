//! An HTTP/2 connection's life: tollgate's own accept loop around Pingora's
//! HTTP/2 sessions, so that every way a connection ends is a GOAWAY the
//! client can act on. Pingora's loop (`accept_downstream_sessions`) closes
//! an idle connection without a GOAWAY, has no request limit, and learns of
//! a shutdown only from a watch's `changed()`, which never fires for a
//! connection accepted after the drain began.
//!
//! A connection gets a GOAWAY when the drain begins (or had begun when it
//! was accepted), when it has had no open stream for `h2_idle_timeout`, or
//! after `max_requests_per_connection` streams. The first GOAWAY names the
//! highest stream id, so requests the client sent before it saw the GOAWAY
//! are still served; the connection closes once they are done.

use crate::proxy::Proxy;
use pingora::apps::HttpServerApp;
use pingora::protocols::http::v2::server::{self, H2Accept, HttpSession};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Digest, Stream};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Streams refused as malformed before the connection is dropped (the
/// budget Pingora's own loop keeps).
const MAX_MALFORMED_STREAMS: usize = 32;

/// Streams a client may still open after a graceful GOAWAY. The GOAWAY
/// exchange takes a round trip (GOAWAY, PING, PING acknowledgement, final
/// GOAWAY), so a few arrive normally; a client that never acknowledges the
/// PING could go on forever, so beyond these its new streams are refused
/// (`REFUSED_STREAM`: not processed, safe to send again elsewhere).
const MAX_STREAMS_AFTER_GOAWAY: u64 = 32;

/// After a GOAWAY with no stream open, how long the client has to close
/// (the GOAWAY exchange takes a round trip) before the socket is dropped.
const GOAWAY_LINGER: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
pub struct H2Limits {
    /// Time with no open stream before a GOAWAY.
    pub idle: Duration,
    /// Streams accepted before a GOAWAY (`None`: no limit).
    pub max_requests: Option<u32>,
    /// Time the client has to send its connection preface.
    pub handshake: Duration,
}

/// Streams being served on one connection.
#[derive(Default)]
struct Active {
    count: AtomicUsize,
    idle: Notify,
}

struct StreamGuard(Arc<Active>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::Relaxed) == 1 {
            // A permit is kept if nobody waits yet: no wake-up is lost.
            self.0.idle.notify_one();
        }
    }
}

impl Active {
    fn start(self: &Arc<Self>) -> StreamGuard {
        self.count.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.clone())
    }

    /// Resolves once no stream has been open for `period`.
    async fn idle_for(&self, period: Duration) {
        while self.count.load(Ordering::Relaxed) != 0 {
            self.idle.notified().await;
        }
        tokio::time::sleep(period).await;
    }
}

/// Serves one HTTP/2 connection until it closes. `closing` is the drain's
/// watch.
pub async fn serve(
    proxy: &Arc<HttpProxy<Proxy>>,
    stream: Stream,
    limits: H2Limits,
    mut closing: ShutdownWatch,
) {
    let digest = Arc::new(Digest {
        ssl_digest: stream.get_ssl_digest(),
        timing_digest: stream.get_timing_digest(),
        proxy_digest: stream.get_proxy_digest(),
        socket_digest: stream.get_socket_digest(),
    });
    let handshake = server::handshake(stream, proxy.h2_options());
    let mut conn = match tokio::time::timeout(limits.handshake, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            log::debug!("HTTP/2 handshake failed: {e}");
            return;
        }
        Err(_) => {
            log::debug!("no HTTP/2 preface within {:?}", limits.handshake);
            return;
        }
    };
    let active = Arc::new(Active::default());
    let (mut served, mut malformed) = (0u64, 0usize);
    // Streams accepted after the first GOAWAY (`None`: none sent yet).
    let mut after_goaway: Option<u64> = None;
    // A connection accepted after the drain began is told at once:
    // `changed()` only reports values set after the subscription.
    let mut goaway = *closing.borrow_and_update();
    if goaway {
        conn.graceful_shutdown();
    }
    loop {
        let quiet = if goaway { GOAWAY_LINGER } else { limits.idle };
        let next = tokio::select! {
            biased;
            changed = closing.changed(), if !goaway => {
                if changed.is_err() || *closing.borrow_and_update() {
                    conn.graceful_shutdown();
                    goaway = true;
                }
                continue;
            }
            next = HttpSession::from_h2_conn(&mut conn, digest.clone()) => next,
            () = active.idle_for(quiet) => {
                if goaway {
                    log::debug!("HTTP/2 client did not close within {GOAWAY_LINGER:?} of a GOAWAY");
                    return;
                }
                log::debug!("HTTP/2 connection idle for {:?} (server.h2_idle_timeout): GOAWAY", limits.idle);
                conn.graceful_shutdown();
                goaway = true;
                continue;
            }
        };
        match next {
            Err(e) => {
                // Clients often just close the socket.
                log::debug!("HTTP/2 connection ended: {e}");
                return;
            }
            Ok(None) => return,
            Ok(Some(H2Accept::Rejected)) => {
                malformed += 1;
                if malformed >= MAX_MALFORMED_STREAMS {
                    log::debug!("HTTP/2 connection dropped after {malformed} malformed streams");
                    return;
                }
            }
            Ok(Some(H2Accept::Session(mut session))) => {
                if goaway {
                    let late = after_goaway.get_or_insert(0);
                    *late += 1;
                    if *late > MAX_STREAMS_AFTER_GOAWAY {
                        // Not processed: the client may send it again on
                        // a new connection (RFC 9113 §8.7).
                        if *late == MAX_STREAMS_AFTER_GOAWAY + 1 {
                            log::debug!(
                                "HTTP/2 client ignores the GOAWAY: its new streams are refused"
                            );
                        }
                        session.shutdown_with_reason(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                }
                served += 1;
                let guard = active.start();
                let (proxy, shutdown) = (proxy.clone(), closing.clone());
                tokio::spawn(async move {
                    let _open = guard;
                    proxy
                        .process_new_http(ServerSession::new_http2(session), &shutdown)
                        .await;
                });
                let limit = limits.max_requests.map(u64::from);
                if !goaway && limit.is_some_and(|max| served >= max) {
                    log::debug!("HTTP/2 connection served {served} requests (server.max_requests_per_connection): GOAWAY");
                    conn.graceful_shutdown();
                    goaway = true;
                }
            }
        }
    }
}
