//! The validated configuration: every string parsed, every name resolved.
//! Built once per load or reload by `Config::try_from(RawConfig)`, which
//! collects every problem with its key path instead of stopping at the first.

use super::duration::parse_duration;
use super::raw::*;
use http::header::HeaderName;
use http::Method;
use log::LevelFilter;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerSettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
    pub redis: Option<RedisSettings>,
    pub auth: AuthSettings,
    pub limits: LimitSettings,
    pub upstreams: Vec<UpstreamSettings>,
    pub routes: Vec<RouteSettings>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    pub listen: Vec<String>,
    pub threads: usize,
    pub health_path: String,
    pub ready_path: String,
    pub grace_period: Duration,
    pub upgrade_sock: String,
    pub pid_file: String,
    pub upstream_pool_size: usize,
    pub work_stealing: bool,
    pub error_log: Option<String>,
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    pub trusted_proxies: Vec<Cidr>,
}

/// An address range (`10.0.0.0/8`, `::1/128`; a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: std::net::IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("{text:?}: prefix length must be 0 to {max}")),
            },
        };
        Ok(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        let ip = match ip {
            V6(v6) => v6.to_ipv4_mapped().map_or(V6(v6), V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (V4(net), V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (V6(net), V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub listen: String,
    pub token: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Console,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub level: LevelFilter,
    pub format: LogFormat,
    pub color: bool,
    pub access_log: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    Local,
    Open,
    Closed,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RedisSettings {
    pub urls: Vec<String>,
    pub cluster: bool,
    pub key_prefix: String,
    pub timeout: Duration,
    pub on_failure: OnFailure,
    pub ca_file: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub jwt: Option<JwtSettings>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum KeySource {
    Secret(Vec<u8>),
    PublicKeyPem(Vec<u8>),
    JwksUrl(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClaimNames {
    pub key: String,
    pub rate_limit: String,
    pub routes: String,
    pub tier: String,
    pub org: String,
}

impl Default for ClaimNames {
    fn default() -> Self {
        let raw = RawClaims::default();
        ClaimNames {
            key: raw.key,
            rate_limit: raw.rate_limit,
            routes: raw.routes,
            tier: raw.tier,
            org: raw.org,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct JwtSettings {
    pub algorithms: Vec<String>,
    pub key: KeySource,
    pub jwks_refresh: Duration,
    pub jwks_ca_file: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
    pub claims: ClaimNames,
    pub require_stored: bool,
    pub cache_size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    FixedWindow,
    SlidingWindow,
    Gcra,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    Hybrid,
    Exact,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    pub requests: u64,
    pub window: Duration,
}

#[derive(Debug, Clone)]
pub struct LimitSettings {
    pub algorithm: Algorithm,
    pub claim_window: Duration,
    pub default: Vec<Window>,
    pub tiers: BTreeMap<String, Vec<Window>>,
    pub org: Vec<Window>,
    pub sync: SyncMode,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    pub name: String,
    /// `host:port` as written: IP literals or names, resolved by the
    /// running upstream (at start and every `resolve_interval`).
    pub peers: Vec<String>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
    pub health_check_interval: Duration,
    pub resolve_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamAuthSettings {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: String,
    pub scope: Option<String>,
    pub refresh: Duration,
    pub ca_file: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RouteSettings {
    pub name: String,
    pub path: PathMatch,
    /// Lower-case host without port.
    pub host: Option<String>,
    pub methods: Option<Vec<Method>>,
    /// Index into `Config::upstreams`.
    pub upstream: usize,
    pub auth_jwt: bool,
    pub cost: u64,
    pub forward_claims: Vec<(String, HeaderName)>,
    pub cost_from_response_header: Option<HeaderName>,
    pub upstream_auth: Option<UpstreamAuthSettings>,
}

/// Accumulates problems with their key paths.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, path: impl AsRef<str>, msg: impl AsRef<str>) {
        self.0.push(format!("{}: {}", path.as_ref(), msg.as_ref()));
    }

    fn duration(&mut self, path: &str, text: &str) -> Duration {
        parse_duration(text).unwrap_or_else(|e| {
            self.add(path, e);
            Duration::ZERO
        })
    }

    /// A duration that must be positive (a zero timeout or window is never meant).
    fn positive_duration(&mut self, path: &str, text: &str) -> Duration {
        match parse_duration(text) {
            Ok(d) if d.is_zero() => {
                self.add(path, "must be greater than zero");
                d
            }
            Ok(d) => d,
            Err(e) => {
                self.add(path, e);
                Duration::ZERO
            }
        }
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

/// Largest limit of a window: counts stay exact in Redis' Lua numbers (doubles).
pub const MAX_REQUESTS: u64 = 1 << 53;
/// Longest window.
pub const MAX_WINDOW: Duration = Duration::from_secs(366 * 24 * 3600);
/// Largest cost of one request.
pub const MAX_COST: u64 = 1_000_000_000;

fn windows(p: &mut Problems, path: &str, raw: &[RawWindow]) -> Vec<Window> {
    raw.iter()
        .enumerate()
        .map(|(i, w)| {
            if w.requests == 0 {
                p.add(format!("{path}[{i}].requests"), "must be at least 1");
            }
            if w.requests > MAX_REQUESTS {
                p.add(
                    format!("{path}[{i}].requests"),
                    format!("must be at most {MAX_REQUESTS} (Redis counts in doubles)"),
                );
            }
            let window = p.positive_duration(&format!("{path}[{i}].window"), &w.window);
            if !window.is_zero() && !window.as_millis().is_multiple_of(1000) {
                p.add(
                    format!("{path}[{i}].window"),
                    "must be a whole number of seconds",
                );
            }
            if window > MAX_WINDOW {
                p.add(format!("{path}[{i}].window"), "must be at most 366d");
            }
            Window {
                requests: w.requests,
                window,
            }
        })
        .collect()
}

pub const JWT_ALGORITHMS: [&str; 12] = [
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
    "ES384", "EdDSA",
];

fn jwt_settings(p: &mut Problems, raw: &RawJwt) -> Option<JwtSettings> {
    let mut algorithms = Vec::new();
    if raw.algorithms.is_empty() {
        p.add("auth.jwt.algorithms", "list at least one algorithm");
    }
    for (i, a) in raw.algorithms.iter().enumerate() {
        if JWT_ALGORITHMS.contains(&a.as_str()) {
            algorithms.push(a.clone());
        } else {
            p.add(
                format!("auth.jwt.algorithms[{i}]"),
                format!(
                    "unknown algorithm {a:?} (one of {})",
                    JWT_ALGORITHMS.join(", ")
                ),
            );
        }
    }
    let symmetric = algorithms.iter().any(|a| a.starts_with("HS"));
    let asymmetric = algorithms.iter().any(|a| !a.starts_with("HS"));
    if symmetric && asymmetric {
        // One key per algorithm family: mixing them is how HS/RS confusion starts.
        p.add(
            "auth.jwt.algorithms",
            "mixes HMAC (HS*) with public-key algorithms; use one family",
        );
    }
    let sources = [
        raw.secret.is_some(),
        raw.secret_file.is_some(),
        raw.public_key_file.is_some(),
        raw.jwks_url.is_some(),
    ];
    let key = match sources.iter().filter(|s| **s).count() {
        0 => {
            p.add(
                "auth.jwt",
                "needs one key source: secret, secret_file, public_key_file or jwks_url",
            );
            None
        }
        1 => {
            if let Some(secret) = &raw.secret {
                if secret.is_empty() {
                    p.add("auth.jwt.secret", "must not be empty");
                }
                Some(KeySource::Secret(secret.as_bytes().to_vec()))
            } else if let Some(file) = &raw.secret_file {
                match std::fs::read(file) {
                    Ok(bytes) => {
                        let trimmed = bytes.trim_ascii_end().to_vec();
                        if trimmed.is_empty() {
                            p.add("auth.jwt.secret_file", format!("{file:?} is empty"));
                        }
                        Some(KeySource::Secret(trimmed))
                    }
                    Err(e) => {
                        p.add("auth.jwt.secret_file", format!("cannot read {file:?}: {e}"));
                        None
                    }
                }
            } else if let Some(file) = &raw.public_key_file {
                match std::fs::read(file) {
                    Ok(bytes) => Some(KeySource::PublicKeyPem(bytes)),
                    Err(e) => {
                        p.add(
                            "auth.jwt.public_key_file",
                            format!("cannot read {file:?}: {e}"),
                        );
                        None
                    }
                }
            } else {
                raw.jwks_url.clone().map(KeySource::JwksUrl)
            }
        }
        _ => {
            p.add(
                "auth.jwt",
                "give only one of secret, secret_file, public_key_file, jwks_url",
            );
            None
        }
    };
    match &key {
        Some(KeySource::Secret(_)) if asymmetric => p.add(
            "auth.jwt.algorithms",
            "a shared secret only verifies HS256/HS384/HS512",
        ),
        Some(KeySource::PublicKeyPem(_)) | Some(KeySource::JwksUrl(_)) if symmetric => p.add(
            "auth.jwt.algorithms",
            "HS* algorithms need a shared secret, not a public key",
        ),
        _ => {}
    }
    let leeway = p.duration("auth.jwt.leeway", &raw.leeway);
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
    let jwks_refresh = p.positive_duration("auth.jwt.jwks_refresh", &raw.jwks_refresh);
    match (&key, &raw.jwks_ca_file) {
        (Some(KeySource::JwksUrl(url)), ca_file) => {
            if let Err(e) = crate::http_client::parse_url(url) {
                p.add("auth.jwt.jwks_url", e);
            } else if let Err(e) = crate::http_client::endpoint(url, ca_file.as_deref(), "jwks_url")
            {
                p.add("auth.jwt.jwks_ca_file", e);
            }
        }
        (_, Some(_)) => p.add("auth.jwt.jwks_ca_file", "only used with jwks_url"),
        (_, None) => {}
    }
    Some(JwtSettings {
        algorithms,
        jwks_refresh,
        jwks_ca_file: raw.jwks_ca_file.clone(),
        key: key?,
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
    })
}

fn redis_settings(p: &mut Problems, raw: &RawRedis) -> RedisSettings {
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
            p.add(path, format!("{url:?} is not a redis:// URL"));
        }
    }
    let on_failure = match raw.on_failure.as_str() {
        "local" => OnFailure::Local,
        "open" => OnFailure::Open,
        "closed" => OnFailure::Closed,
        other => {
            p.add(
                "redis.on_failure",
                format!("unknown value {other:?} (local, open or closed)"),
            );
            OnFailure::Local
        }
    };
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
        on_failure,
    }
}

fn limit_settings(p: &mut Problems, raw: &RawLimits) -> LimitSettings {
    let algorithm = match raw.algorithm.as_str() {
        "fixed_window" => Algorithm::FixedWindow,
        "sliding_window" => Algorithm::SlidingWindow,
        "gcra" => Algorithm::Gcra,
        other => {
            p.add(
                "limits.algorithm",
                format!("unknown algorithm {other:?} (fixed_window, sliding_window or gcra)"),
            );
            Algorithm::FixedWindow
        }
    };
    let sync = match raw.sync.as_str() {
        "hybrid" => SyncMode::Hybrid,
        "exact" => SyncMode::Exact,
        other => {
            p.add(
                "limits.sync",
                format!("unknown mode {other:?} (hybrid or exact)"),
            );
            SyncMode::Hybrid
        }
    };
    let claim_window = p.positive_duration("limits.claim_window", &raw.claim_window);
    let tiers = raw
        .tiers
        .iter()
        .map(|(name, w)| (name.clone(), windows(p, &format!("limits.tiers.{name}"), w)))
        .collect();
    LimitSettings {
        algorithm,
        claim_window,
        default: windows(p, "limits.default", &raw.default),
        tiers,
        org: windows(p, "limits.org", &raw.org),
        sync,
    }
}

fn upstream_settings(p: &mut Problems, name: &str, raw: &RawUpstream) -> UpstreamSettings {
    let base = format!("upstreams.{name}");
    if raw.peers.is_empty() {
        p.add(
            format!("{base}.peers"),
            "list at least one peer (host:port)",
        );
    }
    for (i, peer) in raw.peers.iter().enumerate() {
        if let Err(e) = check_peer(peer) {
            p.add(format!("{base}.peers[{i}]"), e);
        }
    }
    UpstreamSettings {
        name: name.to_string(),
        peers: raw.peers.clone(),
        connect_timeout: p
            .positive_duration(&format!("{base}.connect_timeout"), &raw.connect_timeout),
        read_timeout: p.positive_duration(&format!("{base}.read_timeout"), &raw.read_timeout),
        idle_timeout: p.positive_duration(&format!("{base}.idle_timeout"), &raw.idle_timeout),
        health_check_interval: p.positive_duration(
            &format!("{base}.health_check_interval"),
            &raw.health_check_interval,
        ),
        resolve_interval: p
            .positive_duration(&format!("{base}.resolve_interval"), &raw.resolve_interval),
    }
}

/// `host:port` with a host that is an IP literal or a DNS name, and a port.
/// Names are not resolved here: that is the running upstream's job.
pub fn check_peer(peer: &str) -> Result<(), String> {
    if peer.contains("://") {
        return Err(format!(
            "{peer:?}: give host:port without a scheme (plain HTTP upstreams)"
        ));
    }
    if peer.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = peer.rsplit_once(':') else {
        return Err(format!("{peer:?}: give host:port"));
    };
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!("{peer:?}: {port:?} is not a port (1-65535)"));
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
        return Err(format!(
            "{peer:?}: {host:?} is neither an IP address nor a host name"
        ));
    }
    Ok(())
}

fn route_settings(
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
    let path = match (&raw.path_prefix, &raw.path) {
        (Some(prefix), None) => Some((PathMatch::Prefix(prefix.clone()), "path_prefix", prefix)),
        (None, Some(exact)) => Some((PathMatch::Exact(exact.clone()), "path", exact)),
        (None, None) => {
            p.add(&base, "needs path_prefix or path");
            None
        }
        (Some(_), Some(_)) => {
            p.add(&base, "give path_prefix or path, not both");
            None
        }
    };
    if let Some((_, key, value)) = &path {
        match crate::path::normalize(value) {
            Ok(n) if n == **value => {}
            Ok(n) => p.add(
                format!("{base}.{key}"),
                format!("{value:?} is not in normal form; write {n:?}"),
            ),
            Err(e) => p.add(format!("{base}.{key}"), format!("{value:?}: {e}")),
        }
    }
    let methods = raw.methods.as_ref().map(|list| {
        list.iter()
            .enumerate()
            .filter_map(|(j, m)| {
                let upper = m.to_ascii_uppercase();
                match Method::from_bytes(upper.as_bytes()) {
                    Ok(method) => Some(method),
                    Err(_) => {
                        p.add(
                            format!("{base}.methods[{j}]"),
                            format!("invalid method {m:?}"),
                        );
                        None
                    }
                }
            })
            .collect()
    });
    let upstream = upstreams.iter().position(|u| u.name == raw.upstream);
    if upstream.is_none() {
        p.add(
            format!("{base}.upstream"),
            format!("unknown upstream {:?}", raw.upstream),
        );
    }
    let auth_jwt = match raw.auth.as_str() {
        "jwt" => {
            if !has_jwt {
                p.add(
                    format!("{base}.auth"),
                    "auth: jwt needs an auth.jwt section",
                );
            }
            true
        }
        "none" => false,
        other => {
            p.add(
                format!("{base}.auth"),
                format!("unknown auth {other:?} (jwt or none)"),
            );
            false
        }
    };
    if raw.cost == 0 || raw.cost > MAX_COST {
        p.add(
            format!("{base}.cost"),
            format!("must be from 1 to {MAX_COST}"),
        );
    }
    let mut forward_claims = Vec::new();
    for (claim, header) in &raw.forward_claims {
        match HeaderName::from_bytes(header.as_bytes()) {
            Ok(h) => forward_claims.push((claim.clone(), h)),
            Err(_) => p.add(
                format!("{base}.forward_claims.{claim}"),
                format!("invalid header name {header:?}"),
            ),
        }
    }
    if !forward_claims.is_empty() && !auth_jwt {
        p.add(
            format!("{base}.forward_claims"),
            "needs auth: jwt (there are no claims without a token)",
        );
    }
    let cost_from_response_header = raw.cost_from_response_header.as_ref().and_then(|h| {
        HeaderName::from_bytes(h.as_bytes())
            .map_err(|_| {
                p.add(
                    format!("{base}.cost_from_response_header"),
                    format!("invalid header name {h:?}"),
                )
            })
            .ok()
    });
    if let Some(ua) = &raw.upstream_auth {
        if let Err(e) = crate::http_client::parse_url(&ua.token_url) {
            p.add(format!("{base}.upstream_auth.token_url"), e);
        } else if let Err(e) =
            crate::http_client::endpoint(&ua.token_url, ua.ca_file.as_deref(), "token_url")
        {
            p.add(format!("{base}.upstream_auth.ca_file"), e);
        }
    }
    let upstream_auth = raw.upstream_auth.as_ref().map(|ua| UpstreamAuthSettings {
        token_url: ua.token_url.clone(),
        client_id: ua.client_id.clone(),
        client_secret: ua.client_secret.clone(),
        scope: ua.scope.clone(),
        refresh: p.positive_duration(&format!("{base}.upstream_auth.refresh"), &ua.refresh),
        ca_file: ua.ca_file.clone(),
    });
    let host = raw.host.as_ref().map(|h| {
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
    });
    Some(RouteSettings {
        name: raw.name.clone(),
        path: path?.0,
        host,
        methods,
        upstream: upstream?,
        auth_jwt,
        cost: raw.cost,
        forward_claims,
        cost_from_response_header,
        upstream_auth,
    })
}

impl TryFrom<RawConfig> for Config {
    type Error = Vec<String>;

    fn try_from(raw: RawConfig) -> Result<Self, Self::Error> {
        let mut p = Problems::default();

        let s = &raw.server;
        if s.listen.is_empty() {
            p.add("server.listen", "list at least one address");
        }
        for (i, addr) in s.listen.iter().enumerate() {
            check_listen(&mut p, &format!("server.listen[{i}]"), addr);
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
        check_local_path(&mut p, "server.health_path", &s.health_path);
        check_local_path(&mut p, "server.ready_path", &s.ready_path);
        let server = ServerSettings {
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
            trusted_proxies: s
                .trusted_proxies
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    Cidr::parse(c)
                        .map_err(|e| p.add(format!("server.trusted_proxies[{i}]"), e))
                        .ok()
                })
                .collect(),
        };

        check_listen(&mut p, "admin.listen", &raw.admin.listen);
        if raw.admin.token.as_deref() == Some("") {
            p.add(
                "admin.token",
                "must not be empty (remove it to disable /admin/)",
            );
        }
        let admin = AdminSettings {
            listen: raw.admin.listen.clone(),
            token: raw.admin.token.clone(),
        };

        let level = match raw.log.level.to_ascii_lowercase().as_str() {
            "error" => LevelFilter::Error,
            "warn" => LevelFilter::Warn,
            "info" => LevelFilter::Info,
            "debug" => LevelFilter::Debug,
            "trace" => LevelFilter::Trace,
            "off" => LevelFilter::Off,
            other => {
                p.add(
                    "log.level",
                    format!("unknown level {other:?} (error, warn, info, debug, trace)"),
                );
                LevelFilter::Info
            }
        };
        let format = match raw.log.format.as_str() {
            "console" => LogFormat::Console,
            "json" => LogFormat::Json,
            other => {
                p.add(
                    "log.format",
                    format!("unknown format {other:?} (console or json)"),
                );
                LogFormat::Console
            }
        };
        let log = LogSettings {
            level,
            format,
            color: raw.log.color,
            access_log: raw.log.access_log,
        };

        let redis = raw.redis.as_ref().map(|r| redis_settings(&mut p, r));
        let jwt = raw.auth.jwt.as_ref().and_then(|j| jwt_settings(&mut p, j));
        if let Some(j) = &jwt {
            if j.require_stored && redis.is_none() {
                p.add(
                    "auth.jwt.require_stored",
                    "needs a redis section (stored tokens live in Redis)",
                );
            }
        }
        let limits = limit_settings(&mut p, &raw.limits);
        let upstreams: Vec<UpstreamSettings> = raw
            .upstreams
            .iter()
            .map(|(name, u)| upstream_settings(&mut p, name, u))
            .collect();

        let has_jwt = raw.auth.jwt.is_some();
        let mut names = HashSet::new();
        let mut routes = Vec::new();
        for (i, r) in raw.routes.iter().enumerate() {
            if !names.insert(r.name.clone()) {
                p.add(
                    format!("routes[{i}].name"),
                    format!("duplicate route name {:?}", r.name),
                );
            }
            if let Some(route) = route_settings(&mut p, i, r, &upstreams, has_jwt) {
                routes.push(route);
            }
        }
        if raw.routes.is_empty() {
            p.add("routes", "list at least one route");
        }

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
        })
    }
}
