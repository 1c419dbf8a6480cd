//! The configuration file as written by the operator: plain serde types.
//!
//! Every struct denies unknown fields so a typo is an error, never a silently
//! ignored setting. Durations stay strings here; `runtime.rs` parses them with
//! the key path in hand so every problem can be reported at once.

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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: Vec<String>,
    pub threads: usize,
    pub health_path: String,
    pub ready_path: String,
    pub grace_period: String,
    pub upgrade_sock: String,
    pub pid_file: String,
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
    pub header_timeout: String,
    /// CIDRs whose X-Forwarded-For / Forwarded is believed for the client address.
    pub trusted_proxies: Vec<String>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: vec!["0.0.0.0:8080".into()],
            threads: 2,
            health_path: "/health".into(),
            ready_path: "/ready".into(),
            grace_period: "5s".into(),
            upgrade_sock: "/tmp/tollgate_upgrade.sock".into(),
            pid_file: "/tmp/tollgate.pid".into(),
            upstream_pool_size: 128,
            work_stealing: false,
            error_log: None,
            max_header_bytes: 32 * 1024,
            header_timeout: "10s".into(),
            trusted_proxies: Vec::new(),
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
    pub level: String,
    pub format: String,
    pub color: bool,
    pub access_log: bool,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".into(),
            format: "console".into(),
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
    pub timeout: String,
    #[serde(default = "default_on_failure")]
    pub on_failure: String,
    /// PEM file of the CAs that verify a `rediss://` server (default: the system's).
    #[serde(default)]
    pub ca_file: Option<String>,
}

fn default_prefix() -> String {
    "tollgate:".into()
}
fn default_redis_timeout() -> String {
    "20ms".into()
}
fn default_on_failure() -> String {
    "local".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuth {
    pub jwt: Option<RawJwt>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawJwt {
    pub algorithms: Vec<String>,
    pub secret: Option<String>,
    pub secret_file: Option<String>,
    pub public_key_file: Option<String>,
    pub jwks_url: Option<String>,
    /// PEM file of the CAs that verify an https:// `jwks_url` (default: the system's).
    pub jwks_ca_file: Option<String>,
    /// How often the JWKS is fetched again.
    pub jwks_refresh: String,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: String,
    pub claims: RawClaims,
    pub require_stored: bool,
    /// Verified tokens kept so a repeated token costs a lookup, not a signature check.
    pub cache_size: usize,
}

impl Default for RawJwt {
    fn default() -> Self {
        RawJwt {
            algorithms: vec!["HS256".into()],
            secret: None,
            secret_file: None,
            public_key_file: None,
            jwks_url: None,
            jwks_ca_file: None,
            jwks_refresh: "5m".into(),
            issuer: None,
            audience: None,
            leeway: "5s".into(),
            claims: RawClaims::default(),
            require_stored: false,
            cache_size: 10_000,
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
        RawClaims {
            key: "api_key".into(),
            rate_limit: "rate_limit".into(),
            routes: "allowed_routes".into(),
            tier: "tier".into(),
            org: "org_id".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub algorithm: String,
    pub claim_window: String,
    pub default: Vec<RawWindow>,
    pub tiers: BTreeMap<String, Vec<RawWindow>>,
    pub org: Vec<RawWindow>,
    pub sync: String,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            algorithm: "fixed_window".into(),
            claim_window: "1s".into(),
            default: vec![RawWindow {
                requests: 100,
                window: "1m".into(),
            }],
            tiers: BTreeMap::new(),
            org: Vec::new(),
            sync: "hybrid".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWindow {
    pub requests: u64,
    pub window: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub peers: Vec<String>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: String,
    #[serde(default = "default_read_timeout")]
    pub read_timeout: String,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: String,
    /// Interval of the TCP health check; only run when there are several peers.
    #[serde(default = "default_health_interval")]
    pub health_check_interval: String,
    /// How often peer names are resolved again.
    #[serde(default = "default_resolve_interval")]
    pub resolve_interval: String,
}

fn default_resolve_interval() -> String {
    "30s".into()
}

fn default_connect_timeout() -> String {
    "1s".into()
}
fn default_read_timeout() -> String {
    "30s".into()
}
fn default_idle_timeout() -> String {
    "60s".into()
}
fn default_health_interval() -> String {
    "5s".into()
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
    #[serde(default = "default_auth")]
    pub auth: String,
    #[serde(default = "default_cost")]
    pub cost: u64,
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
    #[serde(default)]
    pub cost_from_response_header: Option<String>,
    #[serde(default)]
    pub upstream_auth: Option<RawUpstreamAuth>,
}

fn default_auth() -> String {
    "jwt".into()
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
    pub refresh: String,
    /// PEM file of the CAs that verify an https:// `token_url` (default: the system's).
    #[serde(default)]
    pub ca_file: Option<String>,
}

fn default_refresh() -> String {
    "5m".into()
}
