//! The configuration file as written by the operator: serde types.
//!
//! Every struct denies unknown fields so a typo is an error, never a silently
//! ignored setting. Durations and choices are typed here ([`Span`], enums),
//! wrapped in [`Checked`] so that a wrong value is recorded with its place
//! instead of stopping the parse: `validate.rs` then reports every problem
//! with its key path at once.

use super::checked::{span, Checked, Span};
use super::types::{
    Algorithm, Calendar, HeaderMode, JwtAlgorithm, LogFormat, LogLevel, OnFailure, RouteAuth,
    SyncMode, TlsVersion, TraceProtocol, UpstreamProtocol,
};
use super::types::{ClientIpHeader, PathPolicy};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub redis: Option<RawRedis>,
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub upstreams: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub telemetry: RawTelemetry,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTelemetry {
    /// Absent: no tracing.
    pub tracing: Option<RawTracing>,
}

/// `telemetry.tracing`. Keys left out here may be filled from the
/// `OTEL_EXPORTER_OTLP_*` variables before typing (`config::otel_env`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTracing {
    /// Default: the collector on this host for the protocol.
    pub endpoint: Option<String>,
    pub protocol: Checked<TraceProtocol>,
    pub sample_ratio: f64,
    pub service_name: String,
    pub headers: BTreeMap<String, String>,
    pub timeout: Checked<Span>,
    /// Spans waiting for export; beyond it new ones are dropped.
    pub queue_size: usize,
}

impl Default for RawTracing {
    fn default() -> Self {
        RawTracing {
            endpoint: None,
            protocol: Checked::default(),
            sample_ratio: 0.01,
            service_name: "tollgate".into(),
            headers: BTreeMap::new(),
            timeout: span("10s"),
            queue_size: 4096,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: Vec<String>,
    pub threads: usize,
    pub health_path: String,
    pub ready_path: String,
    pub grace_period: Checked<Span>,
    pub upgrade_sock: String,
    /// Written in the foreground too when set; with `--daemon` a default applies.
    pub pid_file: Option<String>,
    /// Idle upstream connections kept per worker thread.
    pub upstream_pool_size: usize,
    /// Let worker threads steal each other's tasks (tokio's multi-thread
    /// scheduler); off: one single-thread scheduler per worker, cheaper per
    /// request, connections stay on the thread that accepted them.
    pub work_stealing: bool,
    /// Where logs go with `--daemon` (a daemon has no terminal).
    pub error_log: Option<String>,
    /// Largest request head (request line and headers) accepted; over it: 431.
    pub max_header_bytes: usize,
    /// Whole time allowed to receive a request head.
    pub header_timeout: Checked<Span>,
    /// CIDRs whose X-Forwarded-For / Forwarded is believed for the client address.
    pub trusted_proxies: Vec<String>,
    /// HTTP/2 with prior knowledge on the plain listeners.
    pub h2c: bool,
    /// HTTPS listeners.
    pub tls: Vec<RawTlsListener>,
    /// The header that names the client behind a trusted proxy.
    pub client_ip_header: Checked<ClientIpHeader>,
    /// Longest a reload may take to make its new parts ready.
    pub reload_timeout: Checked<Span>,
    /// Reload when the config file or a certificate it names changes.
    pub watch_config: bool,
    /// Idle time allowed between requests on an HTTP/1.1 connection.
    pub keepalive_timeout: Checked<Span>,
    /// Time an HTTP/2 connection may have no open stream before GOAWAY.
    pub h2_idle_timeout: Checked<Span>,
    /// Longest a write may wait for the client to read (0: no limit).
    pub send_timeout: Checked<Span>,
    /// Requests served on one connection before it is closed (0: no limit).
    pub max_requests_per_connection: u64,
    /// Connections open at once (0: no limit); beyond it new ones are closed.
    pub max_connections: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTlsListener {
    pub listen: String,
    pub certificates: Vec<RawCertificate>,
    #[serde(default)]
    pub min_version: Checked<TlsVersion>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert_file: String,
    pub key_file: String,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: vec!["0.0.0.0:8080".into()],
            threads: 2,
            health_path: "/health".into(),
            ready_path: "/ready".into(),
            grace_period: span("5s"),
            upgrade_sock: "/tmp/tollgate_upgrade.sock".into(),
            pid_file: None,
            upstream_pool_size: 128,
            work_stealing: false,
            error_log: None,
            max_header_bytes: 32 * 1024,
            header_timeout: span("10s"),
            trusted_proxies: Vec::new(),
            h2c: false,
            tls: Vec::new(),
            client_ip_header: Checked::default(),
            reload_timeout: span("10s"),
            watch_config: false,
            keepalive_timeout: span("75s"),
            h2_idle_timeout: span("75s"),
            send_timeout: span("60s"),
            max_requests_per_connection: 1000,
            max_connections: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub listen: String,
    pub token: Option<String>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: "127.0.0.1:9090".into(),
            token: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub level: Checked<LogLevel>,
    pub format: Checked<LogFormat>,
    pub color: bool,
    pub access_log: bool,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: Checked::default(),
            format: Checked::default(),
            color: true,
            access_log: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    pub url: Option<String>,
    pub cluster: Option<Vec<String>>,
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    #[serde(default = "default_redis_timeout")]
    pub timeout: Checked<Span>,
    #[serde(default)]
    pub on_failure: Checked<OnFailure>,
    /// PEM file of the CAs that verify a `rediss://` server (default: the system's).
    #[serde(default)]
    pub ca_file: Option<String>,
}

fn default_prefix() -> String {
    "tollgate:".into()
}
fn default_redis_timeout() -> Checked<Span> {
    span("20ms")
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuth {
    pub jwt: Option<RawJwt>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawJwt {
    pub algorithms: Vec<Checked<JwtAlgorithm>>,
    pub secret: Option<String>,
    pub secret_file: Option<String>,
    pub public_key_file: Option<String>,
    pub jwks_url: Option<String>,
    /// PEM file of the CAs that verify an https:// `jwks_url` (default: the system's).
    pub jwks_ca_file: Option<String>,
    /// How often the JWKS is fetched again.
    pub jwks_refresh: Checked<Span>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Checked<Span>,
    pub claims: RawClaims,
    pub require_stored: bool,
    /// Verified tokens kept so a repeated token costs a lookup, not a signature check.
    pub cache_size: usize,
    /// With `require_stored`: how long a token confirmed stored keeps working
    /// while the store cannot answer.
    pub store_cache: Checked<Span>,
}

impl Default for RawJwt {
    fn default() -> Self {
        RawJwt {
            algorithms: vec![Checked::Valid(JwtAlgorithm(jsonwebtoken::Algorithm::HS256))],
            secret: None,
            secret_file: None,
            public_key_file: None,
            jwks_url: None,
            jwks_ca_file: None,
            jwks_refresh: span("5m"),
            issuer: None,
            audience: None,
            leeway: span("5s"),
            claims: RawClaims::default(),
            require_stored: false,
            cache_size: 10_000,
            store_cache: span("30s"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawClaims {
    pub key: String,
    pub rate_limit: String,
    pub routes: String,
    pub tier: String,
    pub org: String,
}

impl Default for RawClaims {
    fn default() -> Self {
        let names = super::types::ClaimNames::default();
        RawClaims {
            key: names.key,
            rate_limit: names.rate_limit,
            routes: names.routes,
            tier: names.tier,
            org: names.org,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub algorithm: Checked<Algorithm>,
    pub claim_window: Checked<Span>,
    pub default: Vec<RawWindow>,
    pub tiers: BTreeMap<String, Vec<RawWindow>>,
    pub org: Vec<RawWindow>,
    pub sync: Checked<SyncMode>,
    pub rules: Vec<RawRule>,
    pub concurrency: RawConcurrency,
    pub headers: Checked<HeaderMode>,
    pub max_keys: usize,
    pub client_ipv6_prefix: u8,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: String,
    pub key: String,
    #[serde(default)]
    pub routes: Option<Vec<String>>,
    pub windows: Vec<RawWindow>,
    #[serde(default)]
    pub shadow: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConcurrency {
    pub default: Option<u64>,
    pub tiers: BTreeMap<String, u64>,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            algorithm: Checked::default(),
            claim_window: span("1s"),
            default: vec![RawWindow {
                requests: 100,
                window: Some(span("1m")),
                calendar: None,
            }],
            tiers: BTreeMap::new(),
            org: Vec::new(),
            sync: Checked::default(),
            rules: Vec::new(),
            concurrency: RawConcurrency::default(),
            headers: Checked::default(),
            max_keys: 1_000_000,
            client_ipv6_prefix: 64,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWindow {
    pub requests: u64,
    /// A rolling window; exactly one of `window` and `calendar`.
    #[serde(default)]
    pub window: Option<Checked<Span>>,
    #[serde(default)]
    pub calendar: Option<Checked<Calendar>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub peers: Vec<String>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Checked<Span>,
    #[serde(default = "default_read_timeout")]
    pub read_timeout: Checked<Span>,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Checked<Span>,
    /// Interval of the TCP health check; only run when there are several peers.
    #[serde(default = "default_health_interval")]
    pub health_check_interval: Checked<Span>,
    /// How often peer names are resolved again.
    #[serde(default = "default_resolve_interval")]
    pub resolve_interval: Checked<Span>,
    #[serde(default)]
    pub protocol: Checked<UpstreamProtocol>,
    /// TLS to the peers, verified.
    #[serde(default)]
    pub tls: bool,
    /// Host name sent and verified (default: the peer's host).
    #[serde(default)]
    pub sni: Option<String>,
    /// PEM CAs that verify the peers (default: the system store).
    #[serde(default)]
    pub ca_file: Option<String>,
}

fn default_connect_timeout() -> Checked<Span> {
    span("1s")
}
fn default_read_timeout() -> Checked<Span> {
    span("30s")
}
fn default_idle_timeout() -> Checked<Span> {
    span("60s")
}
fn default_health_interval() -> Checked<Span> {
    span("5s")
}
fn default_resolve_interval() -> Checked<Span> {
    span("30s")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    pub path_prefix: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub methods: Option<Vec<String>>,
    pub upstream: String,
    #[serde(default)]
    pub auth: Checked<RouteAuth>,
    #[serde(default = "default_cost")]
    pub cost: u64,
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
    #[serde(default)]
    pub cost_from_response_header: Option<String>,
    #[serde(default)]
    pub upstream_auth: Option<RawUpstreamAuth>,
    /// `Upgrade: websocket` is tunnelled after auth and limits.
    #[serde(default)]
    pub websocket: bool,
    #[serde(default)]
    pub path_policy: Checked<PathPolicy>,
}

fn default_cost() -> u64 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamAuth {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: String,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default = "default_refresh")]
    pub refresh: Checked<Span>,
    /// PEM file of the CAs that verify an https:// `token_url` (default: the system's).
    #[serde(default)]
    pub ca_file: Option<String>,
}

fn default_refresh() -> Checked<Span> {
    span("5m")
}
