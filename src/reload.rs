//! SIGHUP: re-read the config file (with environment overrides), validate it
//! completely, and swap it in whole. An invalid file changes nothing.

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
    let mut changed = Vec::new();
    if old.server.listen != new.server.listen {
        changed.push("server.listen");
    }
    if old.server.threads != new.server.threads {
        changed.push("server.threads");
    }
    if old.server.upgrade_sock != new.server.upgrade_sock {
        changed.push("server.upgrade_sock");
    }
    if old.server.pid_file != new.server.pid_file {
        changed.push("server.pid_file");
    }
    if old.server.grace_period != new.server.grace_period {
        changed.push("server.grace_period");
    }
    if old.server.error_log != new.server.error_log {
        changed.push("server.error_log");
    }
    if old.server.upstream_pool_size != new.server.upstream_pool_size {
        changed.push("server.upstream_pool_size");
    }
    if old.server.work_stealing != new.server.work_stealing {
        changed.push("server.work_stealing");
    }
    if old.admin.listen != new.admin.listen {
        changed.push("admin.listen");
    }
    if old.log.format != new.log.format || old.log.color != new.log.color {
        changed.push("log.format/log.color");
    }
    changed
}

impl Reloader {
    pub fn reload(&self) -> Result<(), String> {
        let config = config::load(&self.path).map_err(|e| e.problems.join("; "))?;
        let old = self.state.load_full();
        let pending = needs_upgrade(&old.config, &config);
        let state = State::build(config).map_err(|p| p.join("; "))?;
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
        loop {
            tokio::select! {
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    match self.reload() {
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
