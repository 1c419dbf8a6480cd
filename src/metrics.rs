//! Every metric tollgate exports, registered in the default registry of the
//! `prometheus` crate that `pingora-prometheus` re-exports. Labels carry route
//! and upstream names, never raw paths or keys.

use pingora_prometheus::prometheus::{
    self, register_histogram_vec, register_int_counter, register_int_counter_vec,
    register_int_gauge, register_int_gauge_vec, Histogram, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec,
};
use std::sync::{LazyLock, OnceLock};

// Registration only fails on a duplicate name or a malformed definition, both
// programming errors caught by the unit test below, never by user input.
macro_rules! must {
    ($e:expr) => {
        $e.expect("metric definition")
    };
}

pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    must!(register_int_counter_vec!(
        "tollgate_requests_total",
        "Requests answered, by route, status and protocol (http1, h2, grpc, ws).",
        &["route", "status", "protocol"]
    ))
});

/// Protocols of `tollgate_requests_total`, in the order of [`RouteMetrics`]' slots.
pub const PROTOCOLS: [&str; 4] = ["http1", "h2", "grpc", "ws"];

/// Statuses whose `tollgate_requests_total` series a route keeps a handle
/// for; any other status is looked up on each request.
const STATUSES: [u16; 21] = [
    200, 201, 204, 206, 301, 302, 304, 400, 401, 403, 404, 405, 408, 413, 429, 431, 500, 502, 503,
    504, 101,
];

/// One route's request metrics, resolved when the config is loaded (the
/// duration) or on the first request with a given status and protocol (the
/// counters): `with_label_values` hashes every label and takes a lock, on
/// each request, for the same few series.
pub struct RouteMetrics {
    name: String,
    duration: Histogram,
    requests: Box<[OnceLock<IntCounter>]>,
}

impl RouteMetrics {
    pub fn new(route: &str) -> Self {
        RouteMetrics {
            name: route.to_string(),
            duration: REQUEST_DURATION.with_label_values(&[route]),
            requests: (0..STATUSES.len() * PROTOCOLS.len())
                .map(|_| OnceLock::new())
                .collect(),
        }
    }

    /// Counts one answered request (`protocol` indexes [`PROTOCOLS`]).
    pub fn answered(&self, status: u16, protocol: usize, seconds: f64) {
        self.duration.observe(seconds);
        let protocol = protocol.min(PROTOCOLS.len() - 1);
        match STATUSES.iter().position(|s| *s == status) {
            Some(i) => self.requests[i * PROTOCOLS.len() + protocol]
                .get_or_init(|| requests(&self.name, status, protocol))
                .inc(),
            None => requests(&self.name, status, protocol).inc(),
        }
    }
}

/// The `tollgate_requests_total` series of a route, status and protocol
/// (an index of [`PROTOCOLS`]), looked up by its labels.
fn requests(route: &str, status: u16, protocol: usize) -> IntCounter {
    let protocol = PROTOCOLS[protocol.min(PROTOCOLS.len() - 1)];
    REQUESTS.with_label_values(&[route, itoa::Buffer::new().format(status), protocol])
}

/// Counts one answered request that matched no route (`route` is its label,
/// such as `_unmatched`): no handles are kept for those.
pub fn answered_unrouted(route: &str, status: u16, protocol: usize, seconds: f64) {
    requests(route, status, protocol).inc();
    REQUEST_DURATION
        .with_label_values(&[route])
        .observe(seconds);
}

/// Counts one `tollgate_ratelimit_decisions_total`, through handles resolved
/// once for the decisions and sources the limiter reports.
pub fn count_ratelimit_decision(decision: &str, source: &str) {
    const DECISIONS: [&str; 3] = ["allowed", "limited", "shadow_limited"];
    const SOURCES: [&str; 2] = ["local", "redis"];
    static HANDLES: LazyLock<Vec<IntCounter>> = LazyLock::new(|| {
        DECISIONS
            .iter()
            .flat_map(|d| {
                SOURCES
                    .iter()
                    .map(move |s| RATELIMIT_DECISIONS.with_label_values(&[d, s]))
            })
            .collect()
    });
    let d = DECISIONS.iter().position(|d| *d == decision);
    let s = SOURCES.iter().position(|s| *s == source);
    match (d, s) {
        (Some(d), Some(s)) => HANDLES[d * SOURCES.len() + s].inc(),
        _ => RATELIMIT_DECISIONS
            .with_label_values(&[decision, source])
            .inc(),
    }
}

pub static REQUEST_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    must!(register_histogram_vec!(
        "tollgate_request_duration_seconds",
        "Time from request start to the last byte of the answer, by route.",
        &["route"],
        vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
    ))
});

pub static AUTH_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    must!(register_int_counter_vec!(
        "tollgate_auth_failures_total",
        "Requests refused by authentication or authorization, by reason.",
        &["reason"]
    ))
});

pub static RATELIMIT_DECISIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    must!(register_int_counter_vec!(
        "tollgate_ratelimit_decisions_total",
        "Rate-limit decisions, by decision (allowed, limited) and where they were made (local, redis).",
        &["decision", "source"]
    ))
});

pub static RULE_DECISIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    must!(register_int_counter_vec!(
        "tollgate_ratelimit_rule_decisions_total",
        "Requests counted by each limits.rules entry, by rule name and decision (allowed, limited, shadow_limited).",
        &["rule", "decision"]
    ))
});

pub static REFUSALS_BY_POLICY: LazyLock<IntCounterVec> = LazyLock::new(|| {
    must!(register_int_counter_vec!(
        "tollgate_ratelimit_refusals_total",
        "Windows that refused a request (limited) or would have (shadow_limited), by policy name (<tier|default|key|org|rule>-<window>, e.g. monthly-month).",
        &["policy", "decision"]
    ))
});

pub static REDIS_CALLS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    must!(register_int_counter_vec!(
        "tollgate_redis_calls_total",
        "Calls made to Redis, by operation.",
        &["op"]
    ))
});

pub static REDIS_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    must!(register_int_counter!(
        "tollgate_redis_errors_total",
        "Redis calls that failed or timed out."
    ))
});

pub static RATELIMIT_KEYS_EVICTED: LazyLock<IntCounter> = LazyLock::new(|| {
    must!(register_int_counter!(
        "tollgate_ratelimit_keys_evicted_total",
        "Limiter keys forgotten because limits.max_keys was reached (least recently used first)."
    ))
});

pub static RATELIMIT_FALLBACK: LazyLock<IntCounterVec> = LazyLock::new(|| {
    must!(register_int_counter_vec!(
        "tollgate_ratelimit_fallback_total",
        "Limit decisions this instance made on its own while Redis could not be reached (on_failure: local).",
        &["decision"]
    ))
});

pub static UPSTREAM_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    must!(register_int_counter_vec!(
        "tollgate_upstream_errors_total",
        "Failures talking to upstreams, by upstream and kind.",
        &["upstream", "kind"]
    ))
});

pub static CONFIG_RELOADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    must!(register_int_counter_vec!(
        "tollgate_config_reloads_total",
        "Configuration reloads, by result (success, failure).",
        &["result"]
    ))
});

pub static JWKS_FETCHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    must!(register_int_counter_vec!(
        "tollgate_jwks_fetches_total",
        "JWKS fetches, by result (attempt, failure).",
        &["result"]
    ))
});

pub static UPSTREAM_TOKEN_FETCHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    must!(register_int_counter_vec!(
        "tollgate_upstream_token_fetches_total",
        "Calls to upstream_auth token endpoints, by route and result (attempt, failure).",
        &["route", "result"]
    ))
});

pub static BUILD_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    must!(register_int_gauge_vec!(
        "tollgate_build_info",
        "Always 1; the version label names the running build.",
        &["version"]
    ))
});

pub static UPSTREAM_PEERS_HEALTHY: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    must!(register_int_gauge_vec!(
        "tollgate_upstream_peers_healthy",
        "Peers of an upstream that pass the health check.",
        &["upstream"]
    ))
});

pub static TOKEN_STORE_OUTAGE: LazyLock<IntCounterVec> = LazyLock::new(|| {
    must!(register_int_counter_vec!(
        "tollgate_token_store_outage_answers_total",
        "Stored-token checks the store could not answer, by what was answered instead: \
         confirmed (stored within auth.jwt.store_cache: admitted), refused (last seen \
         revoked or blocked), unavailable (503 token_store_unavailable).",
        &["answer"]
    ))
});

pub static CONNECTIONS_OPEN: LazyLock<IntGauge> = LazyLock::new(|| {
    must!(register_int_gauge!(
        "tollgate_connections_open",
        "Client connections open on the proxy listeners."
    ))
});

pub static CONNECTIONS_REJECTED: LazyLock<IntCounter> = LazyLock::new(|| {
    must!(register_int_counter!(
        "tollgate_connections_rejected_total",
        "Client connections closed at accept because server.max_connections were open."
    ))
});

pub static SEND_TIMEOUTS: LazyLock<IntCounter> = LazyLock::new(|| {
    must!(register_int_counter!(
        "tollgate_send_timeouts_total",
        "Client connections closed because the client read nothing of its answer for server.send_timeout."
    ))
});

pub static TRACE_SPANS_DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    must!(register_int_counter!(
        "tollgate_trace_spans_dropped_total",
        "Spans not delivered: the export queue was full, or the collector was down, refused them or did not answer within telemetry.tracing.timeout."
    ))
});

pub static TRACE_SPANS_EXPORTED: LazyLock<IntCounter> = LazyLock::new(|| {
    must!(register_int_counter!(
        "tollgate_trace_spans_exported_total",
        "Spans the OTLP collector accepted."
    ))
});

/// Forces registration so `/metrics` lists every family from the first scrape.
pub fn init() {
    BUILD_INFO
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    LazyLock::force(&REQUESTS);
    LazyLock::force(&REQUEST_DURATION);
    LazyLock::force(&AUTH_FAILURES);
    LazyLock::force(&RATELIMIT_DECISIONS);
    LazyLock::force(&RULE_DECISIONS);
    LazyLock::force(&REFUSALS_BY_POLICY);
    LazyLock::force(&REDIS_CALLS);
    LazyLock::force(&REDIS_ERRORS);
    LazyLock::force(&UPSTREAM_ERRORS);
    LazyLock::force(&RATELIMIT_KEYS_EVICTED);
    LazyLock::force(&RATELIMIT_FALLBACK);
    LazyLock::force(&CONFIG_RELOADS);
    LazyLock::force(&UPSTREAM_PEERS_HEALTHY);
    LazyLock::force(&JWKS_FETCHES);
    LazyLock::force(&UPSTREAM_TOKEN_FETCHES);
    LazyLock::force(&TOKEN_STORE_OUTAGE);
    LazyLock::force(&CONNECTIONS_OPEN);
    LazyLock::force(&CONNECTIONS_REJECTED);
    LazyLock::force(&SEND_TIMEOUTS);
    LazyLock::force(&TRACE_SPANS_DROPPED);
    LazyLock::force(&TRACE_SPANS_EXPORTED);
}

/// Called once SIGHUP is handled: the reload series appear at zero, so
/// dashboards and alerts have a line to draw, and whoever starts the process
/// can tell from `/metrics` when a SIGHUP will reload rather than be ignored.
pub fn reloads_handled() {
    for result in ["success", "failure"] {
        CONFIG_RELOADS.with_label_values(&[result]);
    }
}

/// The Prometheus text exposition of every registered metric.
pub fn render() -> Vec<u8> {
    use prometheus::Encoder;
    let mut out = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&prometheus::gather(), &mut out) {
        log::error!("cannot encode metrics: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_family_is_exported() {
        super::init();
        super::reloads_handled();
        let text = String::from_utf8(super::render()).unwrap();
        for name in [
            "tollgate_build_info",
            "tollgate_config_reloads_total",
            "tollgate_redis_errors_total",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        assert!(text.contains(&format!(
            "tollgate_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[test]
    fn route_handles_count_the_series_a_label_lookup_names() {
        use super::{RouteMetrics, REQUESTS, REQUEST_DURATION};
        let route = "unit-route-handles";
        let count = |status: &str, protocol: &str| {
            REQUESTS.with_label_values(&[route, status, protocol]).get()
        };
        let m = RouteMetrics::new(route);
        m.answered(200, 0, 0.001);
        m.answered(200, 0, 0.001);
        m.answered(418, 1, 0.002); // not among the kept statuses
        m.answered(503, 3, 0.0);
        m.answered(429, 2, 0.0);
        assert_eq!(count("200", "http1"), 2);
        assert_eq!(count("418", "h2"), 1);
        assert_eq!(count("503", "ws"), 1);
        assert_eq!(count("429", "grpc"), 1);
        assert_eq!(count("200", "h2"), 0);
        let duration = REQUEST_DURATION.with_label_values(&[route]);
        assert_eq!(duration.get_sample_count(), 5);
    }

    #[test]
    fn ratelimit_decisions_count_through_resolved_handles() {
        use super::{count_ratelimit_decision, RATELIMIT_DECISIONS};
        for (decision, source) in [
            ("allowed", "local"),
            ("limited", "redis"),
            ("shadow_limited", "redis"),
            ("unlisted", "elsewhere"),
        ] {
            let series = RATELIMIT_DECISIONS.with_label_values(&[decision, source]);
            let before = series.get();
            count_ratelimit_decision(decision, source);
            assert_eq!(series.get(), before + 1, "{decision} {source}");
        }
    }
}
