//! Upstreams: a round-robin set of peers with TCP health checks, and the
//! `HttpPeer` every request is sent to. Connections are pooled by Pingora
//! per peer address, so pools stay warm across config reloads.

use crate::config::UpstreamSettings;
use crate::metrics;
use crate::state::SharedState;
use async_trait::async_trait;
use pingora::lb::health_check::TcpHealthCheck;
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, LoadBalancer};
use pingora::prelude::HttpPeer;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Upstream {
    pub settings: UpstreamSettings,
    lb: LoadBalancer<RoundRobin>,
}

impl Upstream {
    pub fn new(settings: UpstreamSettings) -> std::io::Result<Self> {
        let mut lb = LoadBalancer::<RoundRobin>::try_from_iter(settings.peers.iter().copied())?;
        let mut check = TcpHealthCheck::new();
        check.peer_template.options.connection_timeout = Some(settings.connect_timeout);
        // Two misses before a peer leaves rotation: one lost SYN is not an outage.
        check.consecutive_failure = 2;
        lb.set_health_check(check);
        Ok(Upstream { settings, lb })
    }

    /// Picks the next healthy peer not in `exclude`; if every peer is failing
    /// its health check, still tries one (a real attempt answers better than
    /// a guess), and only returns `None` when every peer was already tried.
    pub fn select(&self, exclude: &[SocketAddr]) -> Option<SocketAddr> {
        // One peer: nothing to balance and no health check runs.
        if let [only] = self.settings.peers.as_slice() {
            return (!exclude.contains(only)).then_some(*only);
        }
        let tried = |b: &Backend| b.as_inet().is_some_and(|a| exclude.contains(a));
        let pick = self
            .lb
            .select_with(b"", 256, |b, healthy| healthy && !tried(b))
            .or_else(|| self.lb.select_with(b"", 256, |b, _| !tried(b)))?;
        pick.as_inet().copied()
    }

    pub fn peer(&self, addr: SocketAddr) -> HttpPeer {
        let mut peer = HttpPeer::new(addr, false, String::new());
        let o = &mut peer.options;
        o.connection_timeout = Some(self.settings.connect_timeout);
        o.read_timeout = Some(self.settings.read_timeout);
        o.write_timeout = Some(self.settings.read_timeout);
        o.idle_timeout = Some(self.settings.idle_timeout);
        peer
    }

    async fn check_health(&self) {
        if self.settings.peers.len() < 2 {
            return;
        }
        self.lb.backends().run_health_check(true).await;
        let healthy = self
            .lb
            .backends()
            .get_backend()
            .iter()
            .filter(|b| self.lb.backends().ready(b))
            .count();
        metrics::UPSTREAM_PEERS_HEALTHY
            .with_label_values(&[self.settings.name.as_str()])
            .set(healthy as i64);
    }
}

/// Runs the health checks of whatever upstreams the current config has, so a
/// reload that adds or changes upstreams needs nothing restarted.
pub struct HealthChecks {
    pub state: SharedState,
}

#[async_trait]
impl BackgroundService for HealthChecks {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut last_run: Vec<(String, Instant)> = Vec::new();
        loop {
            let snapshot = self.state.load_full();
            for upstream in &snapshot.upstreams {
                let name = &upstream.settings.name;
                let due = last_run
                    .iter()
                    .find(|(n, _)| n == name)
                    .is_none_or(|(_, at)| at.elapsed() >= upstream.settings.health_check_interval);
                if due {
                    upstream.check_health().await;
                    last_run.retain(|(n, _)| n != name);
                    last_run.push((name.clone(), Instant::now()));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

pub fn build_all(settings: &[UpstreamSettings]) -> Result<Vec<Arc<Upstream>>, String> {
    settings
        .iter()
        .map(|s| {
            Upstream::new(s.clone())
                .map(Arc::new)
                .map_err(|e| format!("upstreams.{}: {e}", s.name))
        })
        .collect()
}
