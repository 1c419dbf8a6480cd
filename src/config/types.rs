//! The validated configuration's types: every value parsed, every name
//! resolved to an index, nothing left as a string to re-check later. Choices
//! are enums that deserialise straight from the file (`snake_case`).

use crate::http_client::HttpUrl;
use http::header::HeaderName;
use http::Method;
use log::LevelFilter;
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::path::PathBuf;
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
    /// `telemetry.tracing`; `None`: tracing is off.
    pub tracing: Option<TracingSettings>,
}

/// How spans leave: OTLP over gRPC or over HTTP with protobuf bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceProtocol {
    #[default]
    Grpc,
    Http,
}

/// `telemetry.tracing`, resolved: `endpoint` is the URL spans are sent to
/// (for `http`, with its `/v1/traces` path).
#[derive(Debug, Clone, PartialEq)]
pub struct TracingSettings {
    pub endpoint: String,
    pub protocol: TraceProtocol,
    pub sample_ratio: f64,
    pub service_name: String,
    pub headers: BTreeMap<String, String>,
    pub timeout: Duration,
    pub queue_size: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    pub listen: Vec<String>,
    pub threads: usize,
    pub health_path: String,
    pub ready_path: String,
    pub grace_period: Duration,
    pub upgrade_sock: String,
    pub pid_file: Option<String>,
    pub upstream_pool_size: usize,
    pub work_stealing: bool,
    pub error_log: Option<String>,
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    pub trusted_proxies: Vec<Cidr>,
    pub h2c: bool,
    pub tls: Vec<TlsListenerSettings>,
    pub client_ip_header: ClientIpHeader,
    pub reload_timeout: Duration,
    pub watch_config: bool,
    /// Zero: no keep-alive (every answer closes its connection).
    pub keepalive_timeout: Duration,
    pub h2_idle_timeout: Duration,
    /// Zero: no limit.
    pub send_timeout: Duration,
    /// `None`: no limit.
    pub max_requests_per_connection: Option<u32>,
    /// `None`: no limit.
    pub max_connections: Option<usize>,
}

/// An HTTPS listener: its certificates (chosen by SNI; the first is the
/// default) and the lowest TLS version it accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsListenerSettings {
    pub listen: String,
    pub certificates: Vec<CertificateFiles>,
    pub min_version: TlsVersion,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CertificateFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// `min_version`: `"1.2"` or `"1.3"` (a bare `1.2` in YAML is a number; both are taken).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsVersion {
    #[default]
    Tls12,
    Tls13,
}

impl<'de> Deserialize<'de> for TlsVersion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_yaml::Value::deserialize(deserializer)?;
        let text = match &value {
            serde_yaml::Value::String(s) => s.clone(),
            serde_yaml::Value::Number(n) => n.to_string(),
            _ => String::new(),
        };
        match text.as_str() {
            "1.2" => Ok(TlsVersion::Tls12),
            "1.3" => Ok(TlsVersion::Tls13),
            _ => Err(serde::de::Error::custom(format!(
                "unknown TLS version {text:?} (\"1.2\" or \"1.3\")"
            ))),
        }
    }
}

/// How tollgate speaks to an upstream's peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// HTTP/2: over TLS (ALPN) or with prior knowledge (h2c); needed by gRPC.
    H2,
}

/// An address range (`10.0.0.0/8`, `::1/128`; a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an IP address or CIDR")]
    NotAnAddress(String),
    #[error("{text:?}: prefix length must be 0 to {max}")]
    Prefix { text: String, max: u8 },
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, CidrError> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: std::net::IpAddr = addr
            .parse()
            .map_err(|_| CidrError::NotAnAddress(text.into()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => {
                    return Err(CidrError::Prefix {
                        text: text.into(),
                        max,
                    })
                }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Console,
    Json,
}

/// `log.level`, any case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLevel(pub LevelFilter);

impl Default for LogLevel {
    fn default() -> Self {
        LogLevel(LevelFilter::Info)
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let level = match text.to_ascii_lowercase().as_str() {
            "error" => LevelFilter::Error,
            "warn" => LevelFilter::Warn,
            "info" => LevelFilter::Info,
            "debug" => LevelFilter::Debug,
            "trace" => LevelFilter::Trace,
            "off" => LevelFilter::Off,
            _ => {
                return Err(serde::de::Error::custom(format!(
                    "unknown level {text:?} (error, warn, info, debug, trace)"
                )))
            }
        };
        Ok(LogLevel(level))
    }
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub level: LevelFilter,
    pub format: LogFormat,
    pub color: bool,
    pub access_log: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Per-instance limits while Redis is away.
    #[default]
    Local,
    /// Admit without limits.
    Open,
    /// Refuse with 503.
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

/// Where the verifying key comes from. Files are named here and read when
/// the live state is built (so a reload sees a rotated file).
#[derive(Debug, Clone, PartialEq)]
pub enum KeySource {
    Secret(Vec<u8>),
    SecretFile(PathBuf),
    PublicKeyFile(PathBuf),
    /// With the CA file that verifies it, when one is configured.
    JwksUrl(HttpUrl),
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
        ClaimNames {
            key: "api_key".into(),
            rate_limit: "rate_limit".into(),
            routes: "allowed_routes".into(),
            tier: "tier".into(),
            org: "org_id".into(),
        }
    }
}

/// A JWT signing algorithm, as `auth.jwt.algorithms` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JwtAlgorithm(pub jsonwebtoken::Algorithm);

pub const JWT_ALGORITHMS: [&str; 12] = [
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
    "ES384", "EdDSA",
];

impl<'de> Deserialize<'de> for JwtAlgorithm {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if !JWT_ALGORITHMS.contains(&text.as_str()) {
            return Err(serde::de::Error::custom(format!(
                "unknown algorithm {text:?} (one of {})",
                JWT_ALGORITHMS.join(", ")
            )));
        }
        text.parse()
            .map(JwtAlgorithm)
            .map_err(|_| serde::de::Error::custom(format!("unknown algorithm {text:?}")))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct JwtSettings {
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub key: KeySource,
    pub jwks_refresh: Duration,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
    pub claims: ClaimNames,
    pub require_stored: bool,
    pub cache_size: usize,
    /// With `require_stored`: a token confirmed stored this recently is
    /// still admitted while the store cannot answer.
    pub store_cache: Duration,
}

/// How a window counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    #[default]
    FixedWindow,
    SlidingWindow,
    Gcra,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::Gcra => "gcra",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Leases: a local fast path reconciled with Redis.
    #[default]
    Hybrid,
    /// One Redis script per request.
    Exact,
}

/// A window that follows the calendar (UTC): it resets exactly at the
/// start of each day or month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Calendar {
    Day,
    Month,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    pub requests: u64,
    /// The window's length; for a calendar window the longest period
    /// (a day, 31 days), which only bounds how long state is kept.
    pub window: Duration,
    pub calendar: Option<Calendar>,
}

impl Window {
    /// A rolling window of `window` (no calendar).
    pub const fn every(requests: u64, window: Duration) -> Window {
        Window {
            requests,
            window,
            calendar: None,
        }
    }

    pub const fn calendar(requests: u64, calendar: Calendar) -> Window {
        let days = match calendar {
            Calendar::Day => 1,
            Calendar::Month => 31,
        };
        Window {
            requests,
            window: Duration::from_secs(days * 86_400),
            calendar: Some(calendar),
        }
    }

    /// How messages, policy names and Redis key names call the window:
    /// `1m`, `5s`, `day`, `month`.
    pub fn label(&self) -> String {
        let mut out = String::with_capacity(8);
        self.write_label(&mut out);
        out
    }

    /// `label` appended to `out`.
    pub fn write_label(&self, out: &mut String) {
        match self.calendar {
            Some(Calendar::Day) => out.push_str("day"),
            Some(Calendar::Month) => out.push_str("month"),
            None => super::duration::write_duration(out, self.window),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LimitSettings {
    pub algorithm: Algorithm,
    pub claim_window: Duration,
    pub default: Vec<Window>,
    pub tiers: BTreeMap<String, Vec<Window>>,
    pub org: Vec<Window>,
    pub sync: SyncMode,
    pub rules: Vec<RuleSettings>,
    pub concurrency: ConcurrencySettings,
    pub headers: HeaderMode,
    /// Keys each limiter store keeps; the least recently used go beyond it.
    pub max_keys: usize,
    /// `client_ip` rule keys count an IPv6 client by this many leading bits.
    pub client_ipv6_prefix: u8,
}

/// `limits.rules[]`: windows for a key computed from the request.
#[derive(Debug, Clone)]
pub struct RuleSettings {
    pub name: String,
    pub key: super::KeyExpr,
    /// Indices into `Config::routes`; `None`: every route.
    pub routes: Option<Vec<usize>>,
    pub windows: Vec<Window>,
    /// Counted and reported, never refused.
    pub shadow: bool,
}

/// `limits.concurrency`: requests in flight per api_key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConcurrencySettings {
    pub default: Option<u64>,
    pub tiers: BTreeMap<String, u64>,
}

/// `limits.headers`: which rate-limit response fields to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderMode {
    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers-11).
    #[default]
    Draft,
    /// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`.
    Legacy,
    Both,
    None,
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
    pub protocol: UpstreamProtocol,
    pub tls: bool,
    pub sni: Option<String>,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamAuthSettings {
    /// With the CA file that verifies it, when one is configured.
    pub token_url: HttpUrl,
    pub client_id: String,
    pub client_secret: String,
    pub scope: Option<String>,
    pub refresh: Duration,
    /// Names the token these settings get (`credentials::token_key`): a
    /// change of endpoint, client, secret or scope is another token.
    pub token_key: String,
}

/// `routes[].auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteAuth {
    #[default]
    Jwt,
    None,
}

#[derive(Debug, Clone)]
pub struct RouteSettings {
    pub name: String,
    pub path: PathMatch,
    /// Lower-case host without port or trailing dot.
    pub host: Option<String>,
    pub methods: Option<Vec<Method>>,
    /// Index into `Config::upstreams`.
    pub upstream: usize,
    pub auth_jwt: bool,
    pub cost: u64,
    pub forward_claims: Vec<(String, HeaderName)>,
    pub cost_from_response_header: Option<HeaderName>,
    pub upstream_auth: Option<UpstreamAuthSettings>,
    pub websocket: bool,
    pub path_policy: PathPolicy,
}

/// `routes[].path_policy`: which path forms reach the route's upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathPolicy {
    /// Dot segments (also encoded), parameters on them, backslashes and
    /// encoded slashes are refused with `400 bad_path`.
    #[default]
    Strict,
    /// Those forms pass (dot segments resolved, the rest as written), as
    /// long as every reading of the path stays on this route.
    Permissive,
}

/// `server.client_ip_header`: the one header whose entries name the client
/// when the peer is a trusted proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientIpHeader {
    #[default]
    XForwardedFor,
    Forwarded,
    XRealIp,
}

impl ClientIpHeader {
    pub fn header_name(self) -> &'static str {
        match self {
            ClientIpHeader::XForwardedFor => "x-forwarded-for",
            ClientIpHeader::Forwarded => "forwarded",
            ClientIpHeader::XRealIp => "x-real-ip",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_contain_their_addresses() {
        let net = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(net.contains("10.200.1.2".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.1.1".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        let one = Cidr::parse("::1").unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("::2".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("ten").is_err());
    }
}
