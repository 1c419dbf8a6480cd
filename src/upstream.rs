//! Upstreams: a round-robin set of peers, resolved from their names at start
//! and every `resolve_interval`, with a TCP health check when there are
//! several, and the `HttpPeer` every request is sent to. An `Upstream`
//! outlives reloads that leave its settings alone, so its resolved
//! addresses and their health carry over; connections are pooled by
//! Pingora per peer address, so pools stay warm either way.

use crate::config::{ConfigProblem, UpstreamProtocol, UpstreamSettings};
use crate::metrics;
use crate::state::SharedState;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::prelude::HttpPeer;
use pingora::protocols::tls::CaType;
use pingora::protocols::ALPN;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::utils::tls::WrappedX509;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Consecutive failed checks before a peer leaves rotation: one lost SYN is
/// not an outage.
const FAILURES_TO_EJECT: u32 = 2;

/// Concurrent requests one HTTP/2 connection to a peer carries.
const H2_STREAMS: usize = 100;

/// One resolved address, the name it came from (the TLS server name unless
/// `sni` is set) and its health.
#[derive(Debug)]
struct Peer {
    addr: SocketAddr,
    host: Arc<str>,
    healthy: AtomicBool,
    failures: AtomicU32,
}

impl Peer {
    fn new(addr: SocketAddr, host: Arc<str>) -> Arc<Peer> {
        Arc::new(Peer {
            addr,
            host,
            healthy: AtomicBool::new(true),
            failures: AtomicU32::new(0),
        })
    }
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
fn host_of(peer: &str) -> Arc<str> {
    let host = peer.rsplit_once(':').map_or(peer, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']').into()
}

pub struct Upstream {
    pub settings: UpstreamSettings,
    /// The CAs of `ca_file`, loaded once.
    ca: Option<Arc<CaType>>,
    /// The bytes `ca` was loaded from: a reload compares them with the file,
    /// so a CA rotated in place is not missed.
    ca_pem: Option<Vec<u8>>,
    /// Keeps pooled connections apart from another upstream's to the same
    /// address that verifies them differently (Pingora's pool key does not
    /// include the CAs).
    group_key: u64,
    peers: ArcSwap<Vec<Arc<Peer>>>,
    next: AtomicUsize,
    /// Configured names that did not resolve at the last attempt, with why.
    unresolved: Mutex<Vec<String>>,
    resolved_at: Mutex<Instant>,
    checked_at: Mutex<Option<Instant>>,
}

/// Resolves `host:port` (blocking: at start, in `check`, or on a blocking thread).
fn resolve_blocking(peer: &str) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = peer
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {peer:?}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{peer:?} resolves to no address"));
    }
    Ok(addrs)
}

async fn resolve(peer: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(addr) = peer.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(peer)
        .await
        .map_err(|e| format!("cannot resolve {peer:?}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{peer:?} resolves to no address"));
    }
    Ok(addrs)
}

impl Upstream {
    /// Resolves the peers once (blocking). A name that does not resolve is
    /// not an error: it stays out of rotation until it does, and
    /// [`Upstream::unresolved`] says why.
    pub fn new(settings: UpstreamSettings) -> Result<Self, ConfigProblem> {
        let (ca, ca_pem) = match &settings.ca_file {
            Some(path) => {
                let problem =
                    |e| ConfigProblem::new(format!("upstreams.{}.ca_file", settings.name), e);
                let pem = std::fs::read(path)
                    .map_err(|e| problem(format!("cannot read {}: {e}", path.display())))?;
                (Some(load_ca(path, &pem).map_err(problem)?), Some(pem))
            }
            None => (None, None),
        };
        let mut peers = Vec::new();
        let mut unresolved = Vec::new();
        for peer in &settings.peers {
            match resolve_blocking(peer) {
                Ok(found) => {
                    let host = host_of(peer);
                    peers.extend(found.into_iter().map(|a| Peer::new(a, host.clone())));
                }
                Err(e) => unresolved.push(e),
            }
        }
        let group_key = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            // The CAs themselves, not only their path: connections verified
            // against a CA that was rotated out are not reused.
            (
                settings.tls,
                &settings.ca_file,
                &ca_pem,
                settings.protocol == UpstreamProtocol::H2,
            )
                .hash(&mut h);
            h.finish()
        };
        Ok(Upstream {
            ca,
            ca_pem,
            group_key,
            peers: ArcSwap::from_pointee(unique(peers)),
            next: AtomicUsize::new(0),
            unresolved: Mutex::new(unresolved),
            resolved_at: Mutex::new(Instant::now()),
            checked_at: Mutex::new(None),
            settings,
        })
    }

    /// Whether `ca_file` still holds the CAs this upstream verifies with.
    fn ca_unchanged(&self) -> bool {
        match (&self.settings.ca_file, &self.ca_pem) {
            (Some(path), Some(pem)) => std::fs::read(path).is_ok_and(|now| now == *pem),
            _ => true,
        }
    }

    /// Why some configured peers are out of rotation (names that did not resolve).
    pub fn unresolved(&self) -> Vec<String> {
        self.unresolved
            .lock()
            .map(|u| u.clone())
            .unwrap_or_default()
    }

    /// How many addresses are resolved, in rotation or not.
    pub fn peer_count(&self) -> usize {
        self.peers.load().len()
    }

    /// Resolved addresses, in rotation or not.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.peers.load().iter().map(|p| p.addr).collect()
    }

    /// Picks the next healthy peer not in `exclude`; if every peer is failing
    /// its health check, still tries one (a real attempt answers better than
    /// a guess), and only returns `None` when every peer was already tried.
    pub fn select(&self, exclude: &[SocketAddr]) -> Option<HttpPeer> {
        let peers = self.peers.load();
        // One peer: nothing to balance and no health check runs.
        if let [only] = peers.as_slice() {
            return (!exclude.contains(&only.addr)).then(|| self.peer(only));
        }
        let n = peers.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let candidates = (0..n).map(|i| &peers[(start + i) % n]);
        let mut fallback = None;
        for p in candidates {
            if exclude.contains(&p.addr) {
                continue;
            }
            if p.healthy.load(Ordering::Relaxed) {
                return Some(self.peer(p));
            }
            fallback.get_or_insert(p);
        }
        fallback.map(|p| self.peer(p))
    }

    fn peer(&self, p: &Peer) -> HttpPeer {
        let s = &self.settings;
        // With TLS, the name is always sent and verified (an empty one
        // would turn verification off).
        let sni = match (s.tls, &s.sni) {
            (false, _) => String::new(),
            (true, Some(name)) => name.clone(),
            (true, None) => p.host.to_string(),
        };
        let mut peer = HttpPeer::new(p.addr, s.tls, sni);
        let o = &mut peer.options;
        o.connection_timeout = Some(s.connect_timeout);
        o.read_timeout = Some(s.read_timeout);
        o.write_timeout = Some(s.read_timeout);
        o.idle_timeout = Some(s.idle_timeout);
        o.ca = self.ca.clone();
        if s.protocol == UpstreamProtocol::H2 {
            // Over TLS by ALPN, in plain text with prior knowledge (h2c);
            // one connection carries many requests.
            o.alpn = ALPN::H2;
            o.max_h2_streams = H2_STREAMS;
        }
        peer.group_key = self.group_key;
        peer
    }

    fn due(at: &Mutex<Instant>, every: Duration) -> bool {
        at.lock().map(|t| t.elapsed() >= every).unwrap_or(true)
    }

    /// Resolves every name again; addresses that stay keep their health.
    pub async fn re_resolve(&self) {
        let mut found = Vec::new();
        let mut unresolved = Vec::new();
        for peer in &self.settings.peers {
            match resolve(peer).await {
                Ok(addrs) => {
                    let host = host_of(peer);
                    found.extend(addrs.into_iter().map(|a| (a, host.clone())));
                }
                Err(e) => unresolved.push(e),
            }
        }
        let old = self.peers.load_full();
        let peers: Vec<Arc<Peer>> = unique(
            found
                .into_iter()
                .map(|(a, host)| {
                    old.iter()
                        .find(|p| p.addr == a)
                        .cloned()
                        .unwrap_or_else(|| Peer::new(a, host))
                })
                .collect(),
        );
        let changed =
            peers.len() != old.len() || peers.iter().zip(old.iter()).any(|(a, b)| a.addr != b.addr);
        if changed {
            log::info!(
                "upstream {}: peers now {:?}",
                self.settings.name,
                peers.iter().map(|p| p.addr).collect::<Vec<_>>()
            );
            self.peers.store(Arc::new(peers));
        }
        if let Ok(mut u) = self.unresolved.lock() {
            for e in unresolved.iter().filter(|e| !u.contains(e)) {
                log::warn!(
                    "upstream {}: {e}; that peer is out of rotation",
                    self.settings.name
                );
            }
            *u = unresolved;
        }
        if let Ok(mut at) = self.resolved_at.lock() {
            *at = Instant::now();
        }
    }

    async fn check_health(&self) {
        if let Ok(mut at) = self.checked_at.lock() {
            *at = Some(Instant::now());
        }
        let peers = self.peers.load_full();
        if peers.len() < 2 {
            return;
        }
        let timeout = self.settings.connect_timeout;
        for p in peers.iter() {
            let ok = matches!(
                tokio::time::timeout(timeout, tokio::net::TcpStream::connect(p.addr)).await,
                Ok(Ok(_))
            );
            if ok {
                p.failures.store(0, Ordering::Relaxed);
                p.healthy.store(true, Ordering::Relaxed);
            } else if p.failures.fetch_add(1, Ordering::Relaxed) + 1 >= FAILURES_TO_EJECT {
                p.healthy.store(false, Ordering::Relaxed);
            }
        }
        let healthy = peers
            .iter()
            .filter(|p| p.healthy.load(Ordering::Relaxed))
            .count();
        metrics::UPSTREAM_PEERS_HEALTHY
            .with_label_values(&[self.settings.name.as_str()])
            .set(healthy as i64);
    }

    /// Re-resolves and health-checks this upstream when they are due.
    pub async fn maintain(&self) {
        let unresolved = self
            .unresolved
            .lock()
            .map(|u| !u.is_empty())
            .unwrap_or(false);
        // A name that failed is retried sooner than the interval.
        let every = if unresolved {
            self.settings.resolve_interval.min(Duration::from_secs(5))
        } else {
            self.settings.resolve_interval
        };
        let names = self
            .settings
            .peers
            .iter()
            .any(|p| p.parse::<SocketAddr>().is_err());
        if names && Self::due(&self.resolved_at, every) {
            self.re_resolve().await;
        }
        let check_due = self
            .checked_at
            .lock()
            .map(|t| t.is_none_or(|t| t.elapsed() >= self.settings.health_check_interval))
            .unwrap_or(true);
        if check_due {
            self.check_health().await;
        }
    }
}

/// Keeps the upstreams of whatever config is current resolved and
/// health-checked, so a reload that adds or changes upstreams needs nothing
/// restarted.
pub struct Maintenance {
    pub state: SharedState,
}

#[async_trait]
impl BackgroundService for Maintenance {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        crate::background::every(&mut shutdown, Duration::from_millis(500), || async {
            let snapshot = self.state.load_full();
            for upstream in &snapshot.upstreams {
                upstream.maintain().await;
            }
        })
        .await
    }
}

/// The upstreams of a new config: kept from `previous` when their settings
/// and CA files did not change (resolved addresses and health carry over),
/// else new.
pub fn build_all(
    settings: &[UpstreamSettings],
    previous: &[Arc<Upstream>],
) -> Result<Vec<Arc<Upstream>>, ConfigProblem> {
    settings
        .iter()
        .map(|s| {
            match previous
                .iter()
                .find(|u| u.settings == *s && u.ca_unchanged())
            {
                Some(kept) => Ok(kept.clone()),
                None => Upstream::new(s.clone()).map(Arc::new),
            }
        })
        .collect()
}

/// Each address once, first occurrence first.
fn unique(peers: Vec<Arc<Peer>>) -> Vec<Arc<Peer>> {
    let mut out: Vec<Arc<Peer>> = Vec::with_capacity(peers.len());
    for p in peers {
        if !out.iter().any(|o| o.addr == p.addr) {
            out.push(p);
        }
    }
    out
}

/// The certificates of a PEM file (`pem`, read from `path`), as Pingora's
/// connector takes them.
fn load_ca(path: &std::path::Path, pem: &[u8]) -> Result<Arc<CaType>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<WrappedX509> = rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .into_iter()
        .map(|der| WrappedX509::new(der.to_vec(), pingora::utils::tls::parse_x509))
        .collect();
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(Arc::from(certs.into_boxed_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(peers: &[&str]) -> UpstreamSettings {
        UpstreamSettings {
            name: "u".into(),
            peers: peers.iter().map(|p| p.to_string()).collect(),
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            health_check_interval: Duration::from_secs(5),
            resolve_interval: Duration::from_secs(30),
            protocol: UpstreamProtocol::Http1,
            tls: false,
            sni: None,
            ca_file: None,
        }
    }

    fn addr(peer: &HttpPeer) -> SocketAddr {
        *pingora::upstreams::peer::Peer::address(peer)
            .as_inet()
            .expect("an inet peer")
    }

    #[test]
    fn names_resolve_and_bad_names_stay_out_of_rotation() {
        let u = Upstream::new(settings(&[
            "localhost:8081",
            "no-such-host.invalid:80",
            "127.0.0.2:9",
        ]))
        .unwrap();
        let addrs = u.addresses();
        assert!(
            addrs
                .iter()
                .any(|a| a.port() == 8081 && a.ip().is_loopback()),
            "{addrs:?}"
        );
        assert!(addrs.contains(&"127.0.0.2:9".parse().unwrap()));
        let unresolved = u.unresolved();
        assert_eq!(unresolved.len(), 1, "{unresolved:?}");
        assert!(
            unresolved[0].contains("no-such-host.invalid"),
            "{unresolved:?}"
        );
    }

    #[test]
    fn round_robin_skips_tried_peers() {
        let u = Upstream::new(settings(&["127.0.0.1:1", "127.0.0.1:2"])).unwrap();
        let a = addr(&u.select(&[]).unwrap());
        let b = addr(&u.select(&[a]).unwrap());
        assert_ne!(a, b);
        assert!(u.select(&[a, b]).is_none());
        let none = Upstream::new(settings(&["no-such-host.invalid:80"])).unwrap();
        assert!(none.select(&[]).is_none());
    }

    #[test]
    fn unchanged_upstreams_are_kept() {
        let old = vec![Arc::new(Upstream::new(settings(&["127.0.0.1:1"])).unwrap())];
        let kept = build_all(&[settings(&["127.0.0.1:1"])], &old).unwrap();
        assert!(Arc::ptr_eq(&kept[0], &old[0]));
        let fresh = build_all(&[settings(&["127.0.0.1:2"])], &old).unwrap();
        assert!(!Arc::ptr_eq(&fresh[0], &old[0]));
    }

    #[test]
    fn tls_peers_always_carry_a_name_to_verify() {
        let mut s = settings(&["localhost:8443"]);
        s.tls = true;
        let u = Upstream::new(s.clone()).unwrap();
        assert_eq!(u.select(&[]).unwrap().sni, "localhost");
        s.sni = Some("api.internal".into());
        let u = Upstream::new(s).unwrap();
        assert_eq!(u.select(&[]).unwrap().sni, "api.internal");
    }
}
