//! SIGHUP: re-read the config file (with environment overrides), validate it
//! completely, build the new state by diff against the running one (what did
//! not change keeps running untouched), make what is new ready, and only then
//! swap it in. An invalid file, or a new part that cannot be made ready (a
//! new JWKS endpoint that does not answer) within `server.reload_timeout`,
//! changes nothing.

use crate::config::{self, Config};
use crate::logging;
use crate::metrics;
use crate::state::{SharedState, State};
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};

pub struct Reloader {
    pub path: PathBuf,
    pub state: SharedState,
}

/// Settings that only a new process (graceful upgrade) can change.
fn needs_upgrade(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (&old.server, &new.server);
    let checks = [
        (o.listen != n.listen, "server.listen"),
        (
            o.tls
                .iter()
                .map(|t| &t.listen)
                .ne(n.tls.iter().map(|t| &t.listen)),
            "server.tls[].listen",
        ),
        (
            o.max_header_bytes != n.max_header_bytes,
            "server.max_header_bytes (HTTP/2)",
        ),
        (o.threads != n.threads, "server.threads"),
        (o.upgrade_sock != n.upgrade_sock, "server.upgrade_sock"),
        (o.pid_file != n.pid_file, "server.pid_file"),
        (o.grace_period != n.grace_period, "server.grace_period"),
        (o.error_log != n.error_log, "server.error_log"),
        (
            o.upstream_pool_size != n.upstream_pool_size,
            "server.upstream_pool_size",
        ),
        (o.work_stealing != n.work_stealing, "server.work_stealing"),
        (old.admin.listen != new.admin.listen, "admin.listen"),
        (
            old.log.format != new.log.format || old.log.color != new.log.color,
            "log.format/log.color",
        ),
    ];
    checks
        .into_iter()
        .filter_map(|(changed, key)| changed.then_some(key))
        .collect()
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{}", config::join(.0, "; "))]
    Invalid(Vec<config::ConfigProblem>),
    #[error("{0}")]
    NotReady(config::ConfigProblem),
    #[error("reload task failed: {0}")]
    Task(String),
    #[error("the new config was not ready within server.reload_timeout ({})", config::format_duration(*.0))]
    TimedOut(std::time::Duration),
}

impl Reloader {
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let path = self.path.clone();
        let old = self.state.load_full();
        let previous = old.clone();
        // Reading files and resolving names block: keep them off this runtime's thread.
        let built = tokio::task::spawn_blocking(move || {
            let config = config::load(&path).map_err(|e| ReloadError::Invalid(e.problems))?;
            let pending = needs_upgrade(&previous.config, &config);
            let state = State::build(config, Some(&previous)).map_err(ReloadError::Invalid)?;
            Ok::<_, ReloadError>((state, pending))
        })
        .await
        .map_err(|e| ReloadError::Task(e.to_string()))?;
        let (state, pending) = built?;
        state.prepare(&old).await.map_err(ReloadError::NotReady)?;
        for warning in state.warnings() {
            log::warn!("{warning}");
        }
        logging::apply(&state.config.log);
        self.state.store(Arc::new(state));
        if !pending.is_empty() {
            log::warn!(
                "config reloaded, but {} changed and needs a graceful upgrade (serve --upgrade) to take effect",
                pending.join(", ")
            );
        }
        Ok(())
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot listen for SIGHUP, reload is disabled: {e}");
                return;
            }
        };
        metrics::reloads_handled();
        loop {
            tokio::select! {
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    // Bounded by the running config's limit: a new part
                    // that never gets ready (a JWKS endpoint trickling
                    // bytes, a name that does not resolve) must not hold
                    // up this loop, and with it every later SIGHUP.
                    let limit = self.state.load().config.server.reload_timeout;
                    let reloaded = tokio::time::timeout(limit, self.reload())
                        .await
                        .unwrap_or(Err(ReloadError::TimedOut(limit)));
                    match reloaded {
                        Ok(()) => {
                            metrics::CONFIG_RELOADS.with_label_values(&["success"]).inc();
                            log::info!("config reloaded from {}", self.path.display());
                        }
                        Err(e) => {
                            metrics::CONFIG_RELOADS.with_label_values(&["failure"]).inc();
                            log::error!("config reload failed, still serving the previous config: {e}");
                        }
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
