//! The end of a graceful stop or upgrade: the process exits as soon as its
//! stop is done — no connection open, every background service's stop work
//! (leases handed back, slots given back, the last analytics written) over
//! — with `server.grace_period` (plus the second for the last answers) as
//! the upper bound.
//!
//! Pingora cannot end that early by itself: once its shutdown starts, its
//! main thread sleeps the whole `grace_period_seconds` and only then shuts
//! the runtimes down (pingora-core 0.9.1, `src/server/mod.rs`,
//! `Server::run`: `thread::sleep(Duration::from_secs(exit_timeout))`), so a
//! SIGTERM with nothing open used to wait all of it. tollgate therefore
//! wraps every service ([`Stop::wrap`]) so that it starts its stop on
//! tollgate's signal and reports when its stop is done; when the last one
//! is, the process exits 0. Pingora's own timeline stays as the bound.
//!
//! The stop begins at `SIGTERM` (the listeners close at once), and for
//! `SIGQUIT` as soon as the new process accepts on the sockets it was
//! handed (Pingora would keep accepting for its whole 5-second hand-over
//! pause).

use async_trait::async_trait;
#[cfg(unix)]
use pingora::server::ListenFds;
use pingora::server::{RuntimeOpts, ShutdownWatch};
use pingora::services::{ServiceReadyNotifier, ServiceWithDependents};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub struct Stop {
    begun: watch::Sender<bool>,
    /// Handed (cloned) to every service: it has seen no value yet, so a
    /// stop that began before a service started is still reported to it.
    first: watch::Receiver<bool>,
    /// Services wrapped and not yet finished.
    running: AtomicUsize,
    exiting: AtomicBool,
    /// The pid file this process wrote (`server.pid_file`), removed on the
    /// early exit as it is when Pingora's own shutdown returns.
    pid_file: std::sync::Mutex<Option<std::path::PathBuf>>,
}

impl Stop {
    pub fn new() -> Arc<Stop> {
        let (begun, first) = watch::channel(false);
        Arc::new(Stop {
            begun,
            first,
            running: AtomicUsize::new(0),
            exiting: AtomicBool::new(false),
            pid_file: std::sync::Mutex::new(None),
        })
    }

    /// The pid file to remove if the process exits here.
    pub fn remove_at_exit(&self, pid_file: Option<std::path::PathBuf>) {
        if let Ok(mut slot) = self.pid_file.lock() {
            *slot = pid_file;
        }
    }

    /// Starts the stop: listeners close, background services do their
    /// stop work.
    pub fn begin(&self) {
        if !self.begun.send_replace(true) {
            log::info!("stopping: listeners closed");
        }
        self.exit_if_done();
    }

    /// `service`, stopped by [`Stop::begin`] (or by Pingora's own shutdown,
    /// whichever comes first) and counted until its stop is done.
    pub fn wrap<S: ServiceWithDependents + 'static>(self: &Arc<Self>, service: S) -> Stoppable<S> {
        self.running.fetch_add(1, Ordering::SeqCst);
        Stoppable {
            inner: service,
            stop: self.clone(),
            announce: None,
        }
    }

    /// Like [`Stop::wrap`]; `marker` is created when the service starts
    /// (the proxy of a process started with `--upgrade`, see
    /// [`Stop::begin_after_handover`]).
    pub fn wrap_announcing<S: ServiceWithDependents + 'static>(
        self: &Arc<Self>,
        service: S,
        marker: Option<std::path::PathBuf>,
    ) -> Stoppable<S> {
        let mut wrapped = self.wrap(service);
        wrapped.announce = marker;
        wrapped
    }

    fn finished(&self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.exit_if_done();
    }

    fn exit_if_done(&self) {
        if !*self.begun.borrow() || self.running.load(Ordering::SeqCst) != 0 {
            return;
        }
        if self.exiting.swap(true, Ordering::SeqCst) {
            return;
        }
        log::info!("stopped: no connection open and every service's stop work done; exiting");
        if let Some(path) = self.pid_file.lock().ok().and_then(|mut p| p.take()) {
            crate::pid_file::remove_if_ours(&path, std::process::id());
        }
        log::logger().flush();
        std::process::exit(0);
    }

    /// `SIGQUIT`: the stop begins once the new process accepts on the
    /// listening sockets Pingora handed over — it says so with
    /// [`serving_marker`] — or, if it never does (a hand-over that failed,
    /// or a new process without the marker), after Pingora's own 5-second
    /// pause. Until then both processes accept, so no client waits for the
    /// new process to start.
    pub fn begin_after_handover(
        self: &Arc<Self>,
        mut phases: tokio::sync::broadcast::Receiver<pingora::server::ExecutionPhase>,
        upgrade_sock: &str,
    ) {
        use pingora::server::ExecutionPhase;
        use tokio::sync::broadcast::error::RecvError;
        let stop = self.clone();
        let marker = serving_marker(upgrade_sock);
        tokio::spawn(async move {
            loop {
                match phases.recv().await {
                    Ok(ExecutionPhase::GracefulUpgradeCloseTimeout) => break,
                    Ok(ExecutionPhase::ShutdownStarted) | Err(RecvError::Closed) => {
                        return stop.begin();
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                }
            }
            let deadline = tokio::time::Instant::now() + HANDOVER_WAIT;
            while !marker.exists() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = std::fs::remove_file(&marker);
            stop.begin();
        });
    }
}

/// Longest wait for the new process to accept (Pingora's pause after
/// handing the sockets over).
const HANDOVER_WAIT: Duration = Duration::from_secs(5);

/// The file a process started with `--upgrade` creates when its proxy
/// listeners start accepting: the old process then stops.
pub fn serving_marker(upgrade_sock: &str) -> std::path::PathBuf {
    format!("{upgrade_sock}.serving").into()
}

/// A Pingora service that stops with [`Stop`].
pub struct Stoppable<S> {
    inner: S,
    stop: Arc<Stop>,
    announce: Option<std::path::PathBuf>,
}

#[async_trait]
impl<S: ServiceWithDependents + 'static> ServiceWithDependents for Stoppable<S> {
    async fn start_service(
        &mut self,
        #[cfg(unix)] fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
        ready_notifier: ServiceReadyNotifier,
    ) {
        let stop = self.stop.clone();
        let mut pingora = shutdown;
        let follow = tokio::spawn(async move {
            if pingora.wait_for(|stopping| *stopping).await.is_ok() {
                stop.begin();
            }
        });
        let ours = self.stop.first.clone();
        if let Some(marker) = &self.announce {
            if let Err(e) = std::fs::write(marker, b"") {
                log::warn!(
                    "cannot write {}: {e}; the old process stops accepting after Pingora's pause",
                    marker.display()
                );
            }
        }
        self.inner
            .start_service(
                #[cfg(unix)]
                fds,
                ours,
                listeners_per_fd,
                ready_notifier,
            )
            .await;
        follow.abort();
        self.stop.finished();
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn runtime_opts_override(&self, global: &RuntimeOpts) -> Option<RuntimeOpts> {
        self.inner.runtime_opts_override(global)
    }

    fn on_startup_delay(&self, time_waited: Duration) {
        self.inner.on_startup_delay(time_waited)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}
