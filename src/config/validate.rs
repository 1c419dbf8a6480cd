//! `Config::try_from(RawConfig)`: one pass that checks everything a file can
//! get wrong and collects every problem with its key path instead of
//! stopping at the first. Pure: no file is read, no name resolved, nothing
//! connected (that happens when the live state is built), so `check` and the
//! tests can run it anywhere.

use super::checked::{Checked, Span};
use super::raw::*;
use super::types::*;
use super::ConfigProblem;
use crate::http_client::HttpUrl;
use http::header::HeaderName;
use http::Method;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Largest limit of a window: counts stay exact in Redis' Lua numbers (doubles).
pub const MAX_REQUESTS: u64 = 1 << 53;
/// Longest window.
pub const MAX_WINDOW: Duration = Duration::from_secs(366 * 24 * 3600);
/// Largest cost of one request.
pub const MAX_COST: u64 = 1_000_000_000;

/// Accumulates problems with their key paths.
#[derive(Default)]
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// The value, or a default with the problem recorded.
    fn take<T: Clone + Default>(&mut self, path: &str, value: &Checked<T>) -> T {
        match value {
            Checked::Valid(v) => v.clone(),
            Checked::Invalid(why) => {
                self.add(path, why.clone());
                T::default()
            }
        }
    }

    /// A value with no default: `None` (and a problem) when it is invalid.
    fn take_opt<T: Clone>(&mut self, path: &str, value: &Checked<T>) -> Option<T> {
        match value {
            Checked::Valid(v) => Some(v.clone()),
            Checked::Invalid(why) => {
                self.add(path, why.clone());
                None
            }
        }
    }

    fn duration(&mut self, path: &str, value: &Checked<Span>) -> Duration {
        self.take(path, value).0
    }

    /// A duration that must be positive (a zero timeout or window is never meant).
    fn positive_duration(&mut self, path: &str, value: &Checked<Span>) -> Duration {
        let d = self.duration(path, value);
        if d.is_zero() && matches!(value, Checked::Valid(_)) {
            self.add(path, "must be greater than zero");
        }
        d
    }
}

fn check_listen(p: &mut Problems, path: &str, addr: &str) {
    if addr.parse::<SocketAddr>().is_err() {
        p.add(
            path,
            format!("invalid listen address {addr:?} (expected IP:PORT, e.g. 0.0.0.0:8080)"),
        );
    }
}

fn check_local_path(p: &mut Problems, path: &str, value: &str) {
    if !value.starts_with('/') {
        p.add(path, format!("must start with '/' (got {value:?})"));
    }
}

fn server(p: &mut Problems, s: &RawServer) -> ServerSettings {
    if s.listen.is_empty() {
        p.add("server.listen", "list at least one address");
    }
    for (i, addr) in s.listen.iter().enumerate() {
        check_listen(p, &format!("server.listen[{i}]"), addr);
    }
    if s.threads == 0 {
        p.add("server.threads", "must be at least 1");
    }
    if !(1024..=1024 * 1024).contains(&s.max_header_bytes) {
        p.add(
            "server.max_header_bytes",
            "must be from 1024 to 1048576 (1 KiB to 1 MiB)",
        );
    }
    check_local_path(p, "server.health_path", &s.health_path);
    check_local_path(p, "server.ready_path", &s.ready_path);
    let trusted_proxies = s
        .trusted_proxies
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            Cidr::parse(c)
                .map_err(|e| p.add(format!("server.trusted_proxies[{i}]"), e.to_string()))
                .ok()
        })
        .collect();
    let tls = tls_listeners(p, &s.tls, &s.listen);
    ServerSettings {
        h2c: s.h2c,
        tls,
        listen: s.listen.clone(),
        threads: s.threads,
        health_path: s.health_path.clone(),
        ready_path: s.ready_path.clone(),
        grace_period: p.duration("server.grace_period", &s.grace_period),
        upgrade_sock: s.upgrade_sock.clone(),
        pid_file: s.pid_file.clone(),
        upstream_pool_size: s.upstream_pool_size,
        work_stealing: s.work_stealing,
        error_log: s.error_log.clone(),
        max_header_bytes: s.max_header_bytes,
        header_timeout: p.positive_duration("server.header_timeout", &s.header_timeout),
        trusted_proxies,
        client_ip_header: p.take("server.client_ip_header", &s.client_ip_header),
        reload_timeout: p.positive_duration("server.reload_timeout", &s.reload_timeout),
        watch_config: s.watch_config,
        keepalive_timeout: p.duration("server.keepalive_timeout", &s.keepalive_timeout),
        h2_idle_timeout: p.positive_duration("server.h2_idle_timeout", &s.h2_idle_timeout),
        send_timeout: p.duration("server.send_timeout", &s.send_timeout),
        max_requests_per_connection: max_requests_per_connection(p, s),
        max_connections: (s.max_connections > 0).then_some(s.max_connections),
    }
}

fn max_requests_per_connection(p: &mut Problems, s: &RawServer) -> Option<u32> {
    match s.max_requests_per_connection {
        0 => None,
        n => u32::try_from(n)
            .map_err(|_| {
                p.add(
                    "server.max_requests_per_connection",
                    format!("must be at most {} (0: no limit)", u32::MAX),
                )
            })
            .ok(),
    }
}

fn tls_listeners(
    p: &mut Problems,
    raw: &[RawTlsListener],
    plain: &[String],
) -> Vec<TlsListenerSettings> {
    raw.iter()
        .enumerate()
        .map(|(i, l)| {
            let base = format!("server.tls[{i}]");
            check_listen(p, &format!("{base}.listen"), &l.listen);
            let same =
                |a: &str| a.parse::<SocketAddr>().ok() == l.listen.parse::<SocketAddr>().ok();
            if plain.iter().any(|a| same(a)) || raw[..i].iter().any(|o| same(&o.listen)) {
                p.add(
                    format!("{base}.listen"),
                    format!("{:?} is already a listener", l.listen),
                );
            }
            if l.certificates.is_empty() {
                p.add(
                    format!("{base}.certificates"),
                    "list at least one certificate",
                );
            }
            TlsListenerSettings {
                listen: l.listen.clone(),
                certificates: l
                    .certificates
                    .iter()
                    .map(|c| CertificateFiles {
                        cert_file: PathBuf::from(&c.cert_file),
                        key_file: PathBuf::from(&c.key_file),
                    })
                    .collect(),
                min_version: p.take(&format!("{base}.min_version"), &l.min_version),
            }
        })
        .collect()
}

fn admin(p: &mut Problems, raw: &RawAdmin) -> AdminSettings {
    check_listen(p, "admin.listen", &raw.listen);
    if raw.token.as_deref() == Some("") {
        p.add(
            "admin.token",
            "must not be empty (remove it to disable /admin/)",
        );
    }
    AdminSettings {
        listen: raw.listen.clone(),
        token: raw.token.clone(),
    }
}

fn log(p: &mut Problems, raw: &RawLog) -> LogSettings {
    LogSettings {
        level: p.take("log.level", &raw.level).0,
        format: p.take("log.format", &raw.format),
        color: raw.color,
        access_log: raw.access_log,
    }
}

fn redis(p: &mut Problems, raw: &RawRedis) -> RedisSettings {
    let (urls, cluster) = match (&raw.url, &raw.cluster) {
        (Some(url), None) => (vec![url.clone()], false),
        (None, Some(nodes)) if !nodes.is_empty() => (nodes.clone(), true),
        (None, Some(_)) => {
            p.add("redis.cluster", "list at least one node");
            (Vec::new(), true)
        }
        (None, None) => {
            p.add("redis", "needs url or cluster");
            (Vec::new(), false)
        }
        (Some(_), Some(_)) => {
            p.add("redis", "give url or cluster, not both");
            (Vec::new(), false)
        }
    };
    for (i, url) in urls.iter().enumerate() {
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            let path = if cluster {
                format!("redis.cluster[{i}]")
            } else {
                "redis.url".to_string()
            };
            p.add(path, format!("{url:?} is not a redis:// or rediss:// URL"));
        }
    }
    if let Some(file) = &raw.ca_file {
        if !urls.iter().all(|u| u.starts_with("rediss://")) {
            p.add("redis.ca_file", "only used with rediss:// URLs");
        }
        if file.is_empty() {
            p.add("redis.ca_file", "must not be empty");
        }
    }
    RedisSettings {
        urls,
        cluster,
        ca_file: raw.ca_file.clone(),
        key_prefix: raw.key_prefix.clone(),
        timeout: p.positive_duration("redis.timeout", &raw.timeout),
        on_failure: p.take("redis.on_failure", &raw.on_failure),
    }
}

/// The one key source `auth.jwt` names, checked for the algorithms it must serve.
fn key_source(
    p: &mut Problems,
    raw: &RawJwt,
    algorithms: &[jsonwebtoken::Algorithm],
) -> Option<KeySource> {
    let symmetric = algorithms
        .iter()
        .any(|a| a.family() == jsonwebtoken::AlgorithmFamily::Hmac);
    let asymmetric = algorithms
        .iter()
        .any(|a| a.family() != jsonwebtoken::AlgorithmFamily::Hmac);
    let given = [
        raw.secret.is_some(),
        raw.secret_file.is_some(),
        raw.public_key_file.is_some(),
        raw.jwks_url.is_some(),
    ];
    match given.iter().filter(|g| **g).count() {
        0 => {
            p.add(
                "auth.jwt",
                "needs one key source: secret, secret_file, public_key_file or jwks_url",
            );
            return None;
        }
        1 => {}
        _ => {
            p.add(
                "auth.jwt",
                "give only one of secret, secret_file, public_key_file, jwks_url",
            );
            return None;
        }
    }
    let key = if let Some(secret) = &raw.secret {
        if secret.is_empty() {
            p.add("auth.jwt.secret", "must not be empty");
        }
        KeySource::Secret(secret.as_bytes().to_vec())
    } else if let Some(file) = &raw.secret_file {
        KeySource::SecretFile(PathBuf::from(file))
    } else if let Some(file) = &raw.public_key_file {
        KeySource::PublicKeyFile(PathBuf::from(file))
    } else {
        let url = raw.jwks_url.as_deref().unwrap_or_default();
        match HttpUrl::parse(url) {
            Err(e) => {
                p.add("auth.jwt.jwks_url", e.to_string());
                return None;
            }
            Ok(u) => match u.with_ca_file(raw.jwks_ca_file.as_deref(), "jwks_url") {
                Ok(u) => KeySource::JwksUrl(u),
                Err(e) => {
                    p.add("auth.jwt.jwks_ca_file", e.to_string());
                    return None;
                }
            },
        }
    };
    if raw.jwks_ca_file.is_some() && raw.jwks_url.is_none() {
        p.add("auth.jwt.jwks_ca_file", "only used with jwks_url");
    }
    match &key {
        KeySource::Secret(_) | KeySource::SecretFile(_) if asymmetric => p.add(
            "auth.jwt.algorithms",
            "a shared secret only verifies HS256/HS384/HS512",
        ),
        KeySource::PublicKeyFile(_) | KeySource::JwksUrl(_) if symmetric => p.add(
            "auth.jwt.algorithms",
            "HS* algorithms need a shared secret, not a public key",
        ),
        KeySource::PublicKeyFile(_)
            if algorithms.iter().any(|a| a.family() != algorithms[0].family()) =>
        {
            p.add(
                "auth.jwt.algorithms",
                "a public_key_file is one key type; list algorithms of that type only (a JWKS can mix them)",
            )
        }
        _ => {}
    }
    Some(key)
}

/// Longest `auth.jwt.store_cache`.
const MAX_STORE_CACHE: Duration = Duration::from_secs(24 * 3600);

fn jwt(p: &mut Problems, raw: &RawJwt) -> Option<JwtSettings> {
    if raw.algorithms.is_empty() {
        p.add("auth.jwt.algorithms", "list at least one algorithm");
    }
    let algorithms: Vec<jsonwebtoken::Algorithm> = raw
        .algorithms
        .iter()
        .enumerate()
        .filter_map(|(i, a)| match a {
            Checked::Valid(a) => Some(a.0),
            Checked::Invalid(why) => {
                p.add(format!("auth.jwt.algorithms[{i}]"), why.clone());
                None
            }
        })
        .collect();
    let symmetric = algorithms
        .iter()
        .any(|a| a.family() == jsonwebtoken::AlgorithmFamily::Hmac);
    if symmetric
        && algorithms
            .iter()
            .any(|a| a.family() != jsonwebtoken::AlgorithmFamily::Hmac)
    {
        // One key per algorithm family: mixing them is how HS/RS confusion starts.
        p.add(
            "auth.jwt.algorithms",
            "mixes HMAC (HS*) with public-key algorithms; use one family",
        );
    }
    let key = key_source(p, raw, &algorithms);
    let claims = &raw.claims;
    for (field, value) in [
        ("key", &claims.key),
        ("rate_limit", &claims.rate_limit),
        ("routes", &claims.routes),
        ("tier", &claims.tier),
        ("org", &claims.org),
    ] {
        if value.is_empty() {
            p.add(format!("auth.jwt.claims.{field}"), "must not be empty");
        }
    }
    let leeway = p.duration("auth.jwt.leeway", &raw.leeway);
    let jwks_refresh = p.positive_duration("auth.jwt.jwks_refresh", &raw.jwks_refresh);
    let store_cache = p.duration("auth.jwt.store_cache", &raw.store_cache);
    if store_cache > MAX_STORE_CACHE {
        p.add(
            "auth.jwt.store_cache",
            "at most 24h (a revocation this instance cannot hear of during an outage stays unseen this long)",
        );
    }
    Some(JwtSettings {
        algorithms,
        key: key?,
        jwks_refresh,
        issuer: raw.issuer.clone(),
        audience: raw.audience.clone(),
        leeway,
        claims: ClaimNames {
            key: claims.key.clone(),
            rate_limit: claims.rate_limit.clone(),
            routes: claims.routes.clone(),
            tier: claims.tier.clone(),
            org: claims.org.clone(),
        },
        require_stored: raw.require_stored,
        cache_size: raw.cache_size,
        store_cache,
    })
}

fn windows(p: &mut Problems, path: &str, raw: &[RawWindow]) -> Vec<Window> {
    let list: Vec<Window> = raw
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let at = format!("{path}[{i}]");
            if w.requests == 0 {
                p.add(format!("{at}.requests"), "must be at least 1");
            }
            if w.requests > MAX_REQUESTS {
                p.add(
                    format!("{at}.requests"),
                    format!("must be at most {MAX_REQUESTS} (Redis counts in doubles)"),
                );
            }
            match (&w.window, &w.calendar) {
                (Some(_), Some(_)) => {
                    p.add(
                        format!("{at}.calendar"),
                        "give either window or calendar, not both",
                    );
                    Window::every(w.requests, Duration::from_secs(1))
                }
                (None, None) => {
                    p.add(
                        format!("{at}.window"),
                        "missing: give a window (e.g. 1m) or a calendar (day | month)",
                    );
                    Window::every(w.requests, Duration::from_secs(1))
                }
                (None, Some(calendar)) => match p.take_opt(&format!("{at}.calendar"), calendar) {
                    Some(c) => Window::calendar(w.requests, c),
                    None => Window::every(w.requests, Duration::from_secs(1)),
                },
                (Some(span), None) => {
                    let window = p.positive_duration(&format!("{at}.window"), span);
                    if !window.is_zero() && !window.as_millis().is_multiple_of(1000) {
                        p.add(format!("{at}.window"), "must be a whole number of seconds");
                    }
                    if window > MAX_WINDOW {
                        p.add(format!("{at}.window"), "must be at most 366d");
                    }
                    Window::every(w.requests, window)
                }
            }
        })
        .collect();
    // Redis names a window's counter by its length: two windows of one
    // length in a list would share one counter and charge it twice.
    for (i, w) in list.iter().enumerate() {
        if let Some(j) = list[..i]
            .iter()
            .position(|v| v.window == w.window && v.calendar == w.calendar)
        {
            let key = if w.calendar.is_some() {
                "calendar"
            } else {
                "window"
            };
            p.add(
                format!("{path}[{i}].{key}"),
                format!(
                    "the same {} as {path}[{j}]: windows of one length would share one counter; keep the smaller limit",
                    if w.calendar.is_some() { "calendar" } else { "length" }
                ),
            );
        }
    }
    list
}

fn limits(p: &mut Problems, raw: &RawLimits) -> LimitSettings {
    let tiers = raw
        .tiers
        .iter()
        .map(|(name, w)| (name.clone(), windows(p, &format!("limits.tiers.{name}"), w)))
        .collect();
    LimitSettings {
        algorithm: p.take("limits.algorithm", &raw.algorithm),
        claim_window: claim_window(p, &raw.claim_window),
        default: windows(p, "limits.default", &raw.default),
        tiers,
        org: windows(p, "limits.org", &raw.org),
        sync: p.take("limits.sync", &raw.sync),
        // With their routes, once the routes are known (`rules`).
        rules: Vec::new(),
        concurrency: concurrency(p, &raw.concurrency),
        headers: p.take("limits.headers", &raw.headers),
        max_keys: {
            if raw.max_keys < 1000 {
                p.add("limits.max_keys", "must be at least 1000");
            }
            raw.max_keys
        },
        client_ipv6_prefix: {
            if !(1..=128).contains(&raw.client_ipv6_prefix) {
                p.add("limits.client_ipv6_prefix", "must be from 1 to 128");
            }
            raw.client_ipv6_prefix
        },
    }
}

/// The window of a token's `rate_limit` claim: whole seconds, as every
/// window (Redis names a window's counters by its start in seconds).
fn claim_window(p: &mut Problems, raw: &Checked<Span>) -> Duration {
    let window = p.positive_duration("limits.claim_window", raw);
    if !window.is_zero() && !window.as_millis().is_multiple_of(1000) {
        p.add("limits.claim_window", "must be a whole number of seconds");
    }
    if window > MAX_WINDOW {
        p.add("limits.claim_window", "must be at most 366d");
    }
    window
}

/// Calendar windows count requests per period: fixed windows on the
/// calendar. GCRA has no periods to follow, so it cannot honour them.
fn calendar_needs_windows(p: &mut Problems, limits: &LimitSettings) {
    if limits.algorithm != Algorithm::Gcra {
        return;
    }
    let mut lists: Vec<(String, &[Window])> = vec![
        ("limits.default".into(), &limits.default),
        ("limits.org".into(), &limits.org),
    ];
    lists.extend(
        limits
            .tiers
            .iter()
            .map(|(t, w)| (format!("limits.tiers.{t}"), w.as_slice())),
    );
    lists.extend(
        limits
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("limits.rules[{i}].windows"), r.windows.as_slice())),
    );
    for (path, windows) in lists {
        for (i, w) in windows.iter().enumerate() {
            if w.calendar.is_some() {
                p.add(
                    format!("{path}[{i}].calendar"),
                    "calendar windows need limits.algorithm fixed_window or sliding_window (gcra has no periods)",
                );
            }
        }
    }
}

/// `limits.rules`, each with its routes resolved to route indices.
fn rules(p: &mut Problems, raw: &[RawRule], routes: &[RouteSettings]) -> Vec<RuleSettings> {
    let mut names = HashSet::new();
    raw.iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let base = format!("limits.rules[{i}]");
            let name_ok = !r.name.is_empty()
                && r.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !name_ok {
                p.add(
                    format!("{base}.name"),
                    "must be non-empty: letters, digits, '-' and '_' (it names a policy and a metric)",
                );
            }
            if matches!(r.name.as_str(), "default" | "org" | "key") {
                p.add(
                    format!("{base}.name"),
                    format!("{:?} names a built-in policy; choose another name", r.name),
                );
            }
            if !names.insert(r.name.clone()) {
                p.add(format!("{base}.name"), format!("duplicate rule name {:?}", r.name));
            }
            if r.windows.is_empty() {
                p.add(format!("{base}.windows"), "list at least one window");
            }
            let windows = windows(p, &format!("{base}.windows"), &r.windows);
            let routes = r.routes.as_ref().map(|names| {
                names
                    .iter()
                    .enumerate()
                    .filter_map(|(j, name)| {
                        let found = routes.iter().position(|route| route.name == *name);
                        if found.is_none() {
                            p.add(
                                format!("{base}.routes[{j}]"),
                                format!("unknown route {name:?}"),
                            );
                        }
                        found
                    })
                    .collect()
            });
            let key = super::KeyExpr::parse(&r.key)
                .map_err(|e| p.add(format!("{base}.key"), e.to_string()))
                .ok()?;
            Some(RuleSettings {
                name: r.name.clone(),
                key,
                routes,
                windows,
                shadow: r.shadow,
            })
        })
        .collect()
}

fn concurrency(p: &mut Problems, raw: &RawConcurrency) -> ConcurrencySettings {
    if raw.default == Some(0) {
        p.add(
            "limits.concurrency.default",
            "must be at least 1 (remove it for no limit)",
        );
    }
    for (tier, n) in &raw.tiers {
        if *n == 0 {
            p.add(
                format!("limits.concurrency.tiers.{tier}"),
                "must be at least 1",
            );
        }
    }
    ConcurrencySettings {
        default: raw.default,
        tiers: raw.tiers.clone(),
    }
}

/// Why a peer is not `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("{0:?}: give host:port without a scheme (set tls: true for HTTPS peers)")]
    Scheme(String),
    #[error("{0:?}: give host:port")]
    NoPort(String),
    #[error("{peer:?}: {port:?} is not a port (1-65535)")]
    BadPort { peer: String, port: String },
    #[error("{peer:?}: {host:?} is neither an IP address nor a host name")]
    BadHost { peer: String, host: String },
}

/// `host:port` with a host that is an IP literal or a DNS name, and a port.
/// Names are not resolved here: that is the running upstream's job.
pub fn check_peer(peer: &str) -> Result<(), PeerError> {
    if peer.contains("://") {
        return Err(PeerError::Scheme(peer.into()));
    }
    if peer.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = peer.rsplit_once(':') else {
        return Err(PeerError::NoPort(peer.into()));
    };
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(PeerError::BadPort {
            peer: peer.into(),
            port: port.into(),
        });
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let name = host.strip_suffix('.').unwrap_or(host);
    if host.len() > 253 || name.is_empty() || !name.split('.').all(label_ok) {
        return Err(PeerError::BadHost {
            peer: peer.into(),
            host: host.into(),
        });
    }
    Ok(())
}

fn upstream(p: &mut Problems, name: &str, raw: &RawUpstream) -> UpstreamSettings {
    let base = format!("upstreams.{name}");
    if raw.peers.is_empty() {
        p.add(
            format!("{base}.peers"),
            "list at least one peer (host:port)",
        );
    }
    for (i, peer) in raw.peers.iter().enumerate() {
        if let Err(e) = check_peer(peer) {
            p.add(format!("{base}.peers[{i}]"), e.to_string());
        }
    }
    if !raw.tls && (raw.sni.is_some() || raw.ca_file.is_some()) {
        p.add(format!("{base}.tls"), "sni and ca_file need tls: true");
    }
    if raw.sni.as_deref() == Some("") {
        p.add(format!("{base}.sni"), "must not be empty");
    }
    let protocol = p.take(&format!("{base}.protocol"), &raw.protocol);
    let mut d =
        |key: &str, value: &Checked<Span>| p.positive_duration(&format!("{base}.{key}"), value);
    UpstreamSettings {
        protocol,
        tls: raw.tls,
        sni: raw.sni.clone(),
        ca_file: raw.ca_file.as_ref().map(PathBuf::from),
        name: name.to_string(),
        peers: raw.peers.clone(),
        connect_timeout: d("connect_timeout", &raw.connect_timeout),
        read_timeout: d("read_timeout", &raw.read_timeout),
        idle_timeout: d("idle_timeout", &raw.idle_timeout),
        health_check_interval: d("health_check_interval", &raw.health_check_interval),
        resolve_interval: d("resolve_interval", &raw.resolve_interval),
    }
}

/// The route's path rule, which must already be in normal form.
fn route_path(p: &mut Problems, base: &str, raw: &RawRoute) -> Option<PathMatch> {
    let (path, key, value) = match (&raw.path_prefix, &raw.path) {
        (Some(prefix), None) => (PathMatch::Prefix(prefix.clone()), "path_prefix", prefix),
        (None, Some(exact)) => (PathMatch::Exact(exact.clone()), "path", exact),
        (None, None) => {
            p.add(base, "needs path_prefix or path");
            return None;
        }
        (Some(_), Some(_)) => {
            p.add(base, "give path_prefix or path, not both");
            return None;
        }
    };
    match crate::path::normalize(value) {
        Ok(n) if n == *value => {}
        Ok(n) => p.add(
            format!("{base}.{key}"),
            format!("{value:?} is not in normal form; write {n:?}"),
        ),
        Err(e) => p.add(format!("{base}.{key}"), format!("{value:?}: {e}")),
    }
    Some(path)
}

fn route_methods(p: &mut Problems, base: &str, raw: &RawRoute) -> Option<Vec<Method>> {
    raw.methods.as_ref().map(|list| {
        list.iter()
            .enumerate()
            .filter_map(|(j, m)| {
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| {
                        p.add(
                            format!("{base}.methods[{j}]"),
                            format!("invalid method {m:?}"),
                        )
                    })
                    .ok()
            })
            .collect()
    })
}

fn route_host(p: &mut Problems, base: &str, raw: &RawRoute) -> Option<String> {
    raw.host.as_ref().map(|h| {
        let bare = h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase();
        if bare.is_empty()
            || bare.contains(['/', ' '])
            || crate::proxy::request::normalize_host(&bare) != bare
        {
            p.add(
                format!("{base}.host"),
                format!("{h:?}: give a host name without port or scheme"),
            );
        }
        bare
    })
}

fn header_name(p: &mut Problems, path: String, name: &str) -> Option<HeaderName> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| p.add(path, format!("invalid header name {name:?}")))
        .ok()
}

fn upstream_auth(
    p: &mut Problems,
    base: &str,
    raw: &RawUpstreamAuth,
) -> Option<UpstreamAuthSettings> {
    let url = match HttpUrl::parse(&raw.token_url) {
        Ok(u) => u,
        Err(e) => {
            p.add(format!("{base}.upstream_auth.token_url"), e.to_string());
            return None;
        }
    };
    let token_url = match url.with_ca_file(raw.ca_file.as_deref(), "token_url") {
        Ok(u) => u,
        Err(e) => {
            p.add(format!("{base}.upstream_auth.ca_file"), e.to_string());
            return None;
        }
    };
    Some(UpstreamAuthSettings {
        token_key: crate::credentials::token_key(
            &token_url,
            &raw.client_id,
            &raw.client_secret,
            raw.scope.as_deref(),
        ),
        token_url,
        client_id: raw.client_id.clone(),
        client_secret: raw.client_secret.clone(),
        scope: raw.scope.clone(),
        refresh: p.positive_duration(&format!("{base}.upstream_auth.refresh"), &raw.refresh),
    })
}

fn route(
    p: &mut Problems,
    i: usize,
    raw: &RawRoute,
    upstreams: &[UpstreamSettings],
    has_jwt: bool,
) -> Option<RouteSettings> {
    let base = format!("routes[{i}]");
    if raw.name.is_empty() || raw.name.starts_with('_') {
        p.add(
            format!("{base}.name"),
            "must be non-empty and not start with '_' (reserved for tollgate's own labels)",
        );
    }
    let path = route_path(p, &base, raw);
    let methods = route_methods(p, &base, raw);
    let upstream = upstreams.iter().position(|u| u.name == raw.upstream);
    if upstream.is_none() {
        p.add(
            format!("{base}.upstream"),
            format!("unknown upstream {:?}", raw.upstream),
        );
    }
    let auth_jwt = p.take(&format!("{base}.auth"), &raw.auth) == RouteAuth::Jwt;
    if auth_jwt && !has_jwt {
        p.add(
            format!("{base}.auth"),
            "auth: jwt needs an auth.jwt section",
        );
    }
    if raw.cost == 0 || raw.cost > MAX_COST {
        p.add(
            format!("{base}.cost"),
            format!("must be from 1 to {MAX_COST}"),
        );
    }
    let forward_claims: Vec<(String, HeaderName)> = raw
        .forward_claims
        .iter()
        .filter_map(|(claim, header)| {
            header_name(p, format!("{base}.forward_claims.{claim}"), header)
                .map(|h| (claim.clone(), h))
        })
        .collect();
    if !forward_claims.is_empty() && !auth_jwt {
        p.add(
            format!("{base}.forward_claims"),
            "needs auth: jwt (there are no claims without a token)",
        );
    }
    let cost_from_response_header = raw
        .cost_from_response_header
        .as_ref()
        .and_then(|h| header_name(p, format!("{base}.cost_from_response_header"), h));
    let upstream_auth = raw
        .upstream_auth
        .as_ref()
        .and_then(|ua| upstream_auth(p, &base, ua));
    let path_policy = p.take(&format!("{base}.path_policy"), &raw.path_policy);
    if let (PathPolicy::Strict, Some(PathMatch::Exact(v) | PathMatch::Prefix(v))) =
        (path_policy, &path)
    {
        if crate::path::strict_violation(v).is_some() {
            p.add(
                format!("{base}.path_policy"),
                format!("the route's own path {v:?} is a form strict refuses; set path_policy: permissive"),
            );
        }
    }
    Some(RouteSettings {
        name: raw.name.clone(),
        host: route_host(p, &base, raw),
        path: path?,
        methods,
        upstream: upstream?,
        auth_jwt,
        cost: raw.cost,
        forward_claims,
        cost_from_response_header,
        upstream_auth,
        websocket: raw.websocket,
        path_policy,
    })
}

fn routes(
    p: &mut Problems,
    raw: &[RawRoute],
    upstreams: &[UpstreamSettings],
    has_jwt: bool,
) -> Vec<RouteSettings> {
    if raw.is_empty() {
        p.add("routes", "list at least one route");
    }
    let mut names = HashSet::new();
    let mut out = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        if !names.insert(r.name.clone()) {
            p.add(
                format!("routes[{i}].name"),
                format!("duplicate route name {:?}", r.name),
            );
        }
        out.extend(route(p, i, r, upstreams, has_jwt));
    }
    out
}

impl TryFrom<RawConfig> for Config {
    type Error = Vec<ConfigProblem>;

    fn try_from(raw: RawConfig) -> Result<Self, Self::Error> {
        let mut p = Problems::default();
        let server = server(&mut p, &raw.server);
        let admin = admin(&mut p, &raw.admin);
        let log = log(&mut p, &raw.log);
        let redis = raw.redis.as_ref().map(|r| redis(&mut p, r));
        let jwt = raw.auth.jwt.as_ref().and_then(|j| jwt(&mut p, j));
        if jwt.as_ref().is_some_and(|j| j.require_stored) && redis.is_none() {
            p.add(
                "auth.jwt.require_stored",
                "needs a redis section (stored tokens live in Redis)",
            );
        }
        let mut limits = limits(&mut p, &raw.limits);
        let upstreams: Vec<UpstreamSettings> = raw
            .upstreams
            .iter()
            .map(|(name, u)| upstream(&mut p, name, u))
            .collect();
        let routes = routes(&mut p, &raw.routes, &upstreams, raw.auth.jwt.is_some());
        limits.rules = rules(&mut p, &raw.limits.rules, &routes);
        calendar_needs_windows(&mut p, &limits);
        let tracing = raw.telemetry.tracing.as_ref().map(|t| tracing(&mut p, t));
        if !p.0.is_empty() {
            return Err(p.0);
        }
        Ok(Config {
            server,
            admin,
            log,
            redis,
            auth: AuthSettings { jwt },
            limits,
            upstreams,
            routes,
            tracing,
        })
    }
}

/// `telemetry.tracing`: where spans go and how many requests make them.
fn tracing(p: &mut Problems, raw: &RawTracing) -> TracingSettings {
    const BASE: &str = "telemetry.tracing";
    let protocol = p.take(&format!("{BASE}.protocol"), &raw.protocol);
    let endpoint = match &raw.endpoint {
        Some(e) => e.trim().to_string(),
        None => match protocol {
            TraceProtocol::Grpc => "http://127.0.0.1:4317".to_string(),
            TraceProtocol::Http => "http://127.0.0.1:4318".to_string(),
        },
    };
    let endpoint = match trace_endpoint(&endpoint, protocol) {
        Ok(e) => e,
        Err(why) => {
            p.add(format!("{BASE}.endpoint"), why);
            String::new()
        }
    };
    if !(0.0..=1.0).contains(&raw.sample_ratio) {
        p.add(
            format!("{BASE}.sample_ratio"),
            format!(
                "must be from 0 to 1 (0.01: one new trace in a hundred), got {}",
                raw.sample_ratio
            ),
        );
    }
    if raw.service_name.trim().is_empty() {
        p.add(format!("{BASE}.service_name"), "must not be empty");
    }
    for (name, value) in &raw.headers {
        let path = format!("{BASE}.headers.{name}");
        let lower = name.to_ascii_lowercase();
        if HeaderName::from_bytes(lower.as_bytes()).is_err() {
            p.add(&path, "not a valid header name");
        } else if http::HeaderValue::from_str(value).is_err() {
            p.add(&path, "the value must be visible ASCII characters");
        }
    }
    let timeout = p.positive_duration(&format!("{BASE}.timeout"), &raw.timeout);
    if timeout > Duration::from_secs(60) {
        p.add(format!("{BASE}.timeout"), "must be at most 60s");
    }
    if !(1..=1_000_000).contains(&raw.queue_size) {
        p.add(format!("{BASE}.queue_size"), "must be from 1 to 1000000");
    }
    TracingSettings {
        queue_size: raw.queue_size.clamp(1, 1_000_000),
        endpoint,
        protocol,
        sample_ratio: raw.sample_ratio.clamp(0.0, 1.0),
        service_name: raw.service_name.trim().to_string(),
        headers: raw
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect(),
        timeout,
    }
}

/// The URL spans are sent to. gRPC takes `scheme://host:port` only; OTLP/HTTP
/// takes a full URL, and one without a path gets the standard `/v1/traces`.
/// OTLP/HTTP is spoken in plain HTTP only (a collector beside tollgate); TLS
/// to a remote collector is for gRPC.
pub fn trace_endpoint(endpoint: &str, protocol: TraceProtocol) -> Result<String, String> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|_| format!("{endpoint:?} is not a URL (expected e.g. http://127.0.0.1:4317)"))?;
    let scheme = uri.scheme_str().unwrap_or_default();
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "{endpoint:?}: the URL must start with http:// or https://"
        ));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{endpoint:?}: the URL names no host"));
    }
    if endpoint.contains('@') {
        return Err(format!(
            "{endpoint:?}: credentials belong in headers, not the URL"
        ));
    }
    let path = uri.path();
    match protocol {
        TraceProtocol::Grpc => {
            if path != "/" && !path.is_empty() || uri.query().is_some() {
                return Err(format!(
                    "{endpoint:?}: a gRPC endpoint is scheme://host:port, without a path"
                ));
            }
            Ok(endpoint.trim_end_matches('/').to_string())
        }
        TraceProtocol::Http => {
            if scheme == "https" {
                return Err(format!(
                    "{endpoint:?}: OTLP/HTTP is sent in plain HTTP (to a collector next to tollgate); \
                     use protocol: grpc for an https:// endpoint"
                ));
            }
            if path.is_empty() || path == "/" {
                Ok(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            } else {
                Ok(endpoint.to_string())
            }
        }
    }
}
