//! Graceful stop and upgrade without losing a request on a kept-alive
//! connection.
//!
//! Pingora drops a connection that is waiting for its next request the
//! moment its shutdown starts, so a request already on the wire would be
//! lost. tollgate therefore drains around it:
//!
//! 1. `SIGTERM` or `SIGQUIT` arrive at [`Signals`], which hands Pingora the
//!    signal at once. For `SIGQUIT`, Pingora passes the listening sockets to
//!    the new process, which accepts from then on; tollgate switches to
//!    draining right away (every answer carries `Connection: close`, every
//!    HTTP/2 connection gets a GOAWAY, so clients move over), and stops
//!    accepting once the new process accepts ([`super::stop`]). For
//!    `SIGTERM`, the listeners stop at once; draining starts only once they
//!    are closed, so a client told to reconnect is refused (nothing sent)
//!    instead of being queued on a socket nobody accepts from any more.
//! 2. When the listeners have stopped, Pingora calls the edge's `cleanup`,
//!    which drains — up to `server.grace_period`, or until every connection
//!    has gone — while requests on open connections are still answered.
//!    A connection counts as open from its accept ([`Drain::admit`]), before
//!    Pingora hands it to a task, so one accepted just before the listeners
//!    stopped is waited for and served, not closed unread.
//! 3. Only then are the remaining idle connections closed, and one more
//!    second lets the last answers finish; then the process exits.
//!
//! The request path sees the drain through [`Drain::watch`], which the edge
//! hands to Pingora's HTTP handling in place of Pingora's shutdown signal.

use super::stop::Stop;
use crate::metrics;
use async_trait::async_trait;
use pingora::server::{ExecutionPhase, ShutdownSignal, ShutdownSignalWatch};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{broadcast, watch, Notify};

pub struct Drain {
    draining: AtomicBool,
    /// Turns true when draining starts (Pingora's HTTP handling then closes
    /// each connection after its answer).
    closing: watch::Sender<bool>,
    open: AtomicUsize,
    /// Sockets kept after their connection ended, for the client's last
    /// bytes (see `linger`): they count towards `max_connections` at accept
    /// (each holds a descriptor), not towards the drain.
    lingering: AtomicUsize,
    all_closed: Notify,
    grace: Duration,
    /// True once the drain is over (idle connections are being closed).
    done: watch::Sender<bool>,
}

impl Drain {
    pub fn new(grace: Duration) -> Arc<Drain> {
        Arc::new(Drain {
            draining: AtomicBool::new(false),
            closing: watch::channel(false).0,
            open: AtomicUsize::new(0),
            lingering: AtomicUsize::new(0),
            all_closed: Notify::new(),
            grace,
            done: watch::channel(false).0,
        })
    }

    pub fn start(&self) {
        if !self.draining.swap(true, Ordering::Relaxed) {
            self.closing.send_replace(true);
            log::info!(
                "draining: answers carry Connection: close; idle connections are closed after {:?}",
                self.grace
            );
        }
    }

    /// The drain as a shutdown signal for Pingora's HTTP handling.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Whether answers must close their connection.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// At accept: counts the connection as open, unless `max` are open
    /// already (then it is counted as rejected and must be closed).
    pub fn admit(&self, max: Option<usize>) -> bool {
        let lingering = self.lingering.load(Ordering::Relaxed);
        let admitted = self
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| match max {
                Some(max) if n.saturating_add(lingering) >= max => None,
                _ => Some(n + 1),
            })
            .is_ok();
        if admitted {
            metrics::CONNECTIONS_OPEN.inc();
        } else {
            metrics::CONNECTIONS_REJECTED.inc();
        }
        admitted
    }

    /// The count `admit` took for a connection, given back when the guard
    /// is dropped.
    pub fn adopt(self: &Arc<Self>) -> OpenConnection {
        OpenConnection(self.clone())
    }

    /// Counts a lingering socket until the guard is dropped; `None` when
    /// `max` are lingering already (the socket is then closed at once).
    pub fn linger(self: &Arc<Self>, max: usize) -> Option<LingeringSocket> {
        self.lingering
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| LingeringSocket(self.clone()))
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Waits out the grace period, or less when every connection is gone.
    pub async fn wait(&self) {
        self.start();
        let deadline = tokio::time::Instant::now() + self.grace;
        loop {
            let closed = self.all_closed.notified();
            if self.open.load(Ordering::Relaxed) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, closed).await.is_err() {
                break;
            }
        }
        log::info!(
            "drain over: closing {} idle connections",
            self.open.load(Ordering::Relaxed)
        );
        self.done.send_replace(true);
    }

    /// Whether the drain is over.
    pub fn is_finished(&self) -> bool {
        *self.done.borrow()
    }

    /// Waits until no connection is open, for at most `limit`.
    pub async fn closed_within(&self, limit: std::time::Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                let closed = self.all_closed.notified();
                if self.open.load(Ordering::Relaxed) == 0 {
                    return;
                }
                closed.await;
            }
        })
        .await;
    }

    /// Resolves once the drain is over.
    pub async fn finished(&self) {
        let mut done = self.done.subscribe();
        let _ = done.wait_for(|d| *d).await;
    }
}

pub struct LingeringSocket(Arc<Drain>);

impl Drop for LingeringSocket {
    fn drop(&mut self) {
        self.0.lingering.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct OpenConnection(Arc<Drain>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::CONNECTIONS_OPEN.dec();
        if self.0.open.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.all_closed.notify_waiters();
        }
    }
}

/// `SIGQUIT`: upgrade, `SIGTERM`: graceful stop — both drain; `SIGINT`: stop now.
pub struct Signals {
    pub drain: Arc<Drain>,
    pub stop: Arc<Stop>,
    /// Pingora's execution phases, to see the listening sockets handed over.
    pub phases: std::sync::Mutex<Option<broadcast::Receiver<ExecutionPhase>>>,
    /// `server.upgrade_sock` (see [`Stop::begin_after_handover`]).
    pub upgrade_sock: String,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (quit, term, int) = match (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(q), Ok(t), Ok(i)) => (q, t, i),
            _ => {
                log::error!("cannot listen for SIGQUIT/SIGTERM/SIGINT; stop with SIGKILL");
                std::future::pending::<()>().await;
                return ShutdownSignal::FastShutdown;
            }
        };
        let (mut quit, mut term, mut int) = (quit, term, int);
        tokio::select! {
            _ = quit.recv() => {
                log::info!("SIGQUIT: handing the listeners over, then draining");
                self.drain.start();
                let phases = self.phases.lock().ok().and_then(|mut p| p.take());
                if let Some(phases) = phases {
                    self.stop.begin_after_handover(phases, &self.upgrade_sock);
                }
                ShutdownSignal::GracefulUpgrade
            }
            _ = term.recv() => {
                // Draining starts once the listeners are closed (the edge's cleanup).
                log::info!("SIGTERM: no new connections; draining open ones");
                self.stop.begin();
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => ShutdownSignal::FastShutdown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lingering_sockets_count_towards_max_connections_and_have_a_cap() {
        let drain = Drain::new(Duration::from_secs(1));
        assert!(drain.admit(Some(2)));
        let open = drain.adopt();
        let lingering = drain.linger(2).expect("below the cap");
        // One open, one lingering: the third is refused.
        assert!(!drain.admit(Some(2)));
        let second = drain.linger(2).expect("below the cap");
        assert!(drain.linger(2).is_none(), "over the cap");
        drop((lingering, second));
        assert!(drain.admit(Some(2)));
        drop(open);
        // The drain waits for open connections only, not lingering ones.
        let _late = drain.linger(2);
        assert_eq!(drain.open_connections(), 1);
    }
}
