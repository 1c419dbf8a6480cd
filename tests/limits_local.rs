//! Rate limits without Redis: exact within one instance, through the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use serde_json::json;

const SECRET: &str = "limits-secret-0123456789abcdef";

fn config(upstream: &str, limits: &str) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 2, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock" }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
log: {{ level: warn, color: false }}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{SECRET}" }} }}
limits:
  headers: legacy
{limits}
upstreams:
  backend: {{ peers: ["{upstream}"] }}
routes:
  - {{ name: api, path_prefix: /api/, upstream: backend }}
  - {{ name: heavy, path_prefix: /heavy/, upstream: backend, cost: 2 }}
"#
    )
}

const LIMITS: &str = r#"  claim_window: 1m
  default: [{ requests: 50, window: 1m }]
  tiers: { free: [{ requests: 5, window: 5s }, { requests: 100, window: 1m }] }
  org: [{ requests: 4, window: 1m }]"#;

fn token(claims: serde_json::Value) -> String {
    let mut c = json!({"exp": unix_now() + 3600, "allowed_routes": ["/*"]});
    c.as_object_mut()
        .unwrap()
        .extend(claims.as_object().unwrap().clone());
    pyjwt(json!({"alg": "HS256", "key": SECRET, "claims": c}))
}

fn auth(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

#[test]
fn remaining_counts_down_then_429_names_the_window() {
    let up = Recorder::start();
    let t = Tollgate::start(&config(&up.addr(), LIMITS));
    let tok = token(json!({"api_key": "free-1", "tier": "free"}));
    let mut c = Client::connect(t.port).unwrap();
    avoid_window_edge(5, std::time::Duration::from_secs(2));
    let mut remaining = Vec::new();
    for _ in 0..5 {
        let r = c.get("/api/x", &auth(&tok)).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("ratelimit-limit"), Some("5"));
        let reset: u64 = r.header("ratelimit-reset").unwrap().parse().unwrap();
        assert!((1..=5).contains(&reset), "reset {reset}");
        remaining.push(r.header("ratelimit-remaining").unwrap().to_string());
    }
    assert_eq!(remaining, ["4", "3", "2", "1", "0"]);
    let r = c.get("/api/x", &auth(&tok)).unwrap();
    r.assert_refusal(429, "rate_limited");
    assert_eq!(r.json()["message"], "limit of 5 requests per 5s exceeded");
    assert_eq!(r.header("ratelimit-limit"), Some("5"));
    assert_eq!(r.header("ratelimit-remaining"), Some("0"));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=5).contains(&retry), "retry-after {retry}");
    assert_eq!(up.hits(), 5, "a refused request reached the upstream");
    // The refusal kept the connection usable.
    assert_eq!(c.get("/api/x", &auth(&tok)).unwrap().status, 429);
    t.wait_metric(
        r#"tollgate_ratelimit_decisions_total{decision="allowed",source="local"}"#,
        5.0,
    );
    t.wait_metric(
        r#"tollgate_ratelimit_decisions_total{decision="limited",source="local"}"#,
        2.0,
    );
}

#[test]
fn claim_limit_cost_and_org_windows() {
    let up = Recorder::start();
    let t = Tollgate::start(&config(&up.addr(), LIMITS));
    let mut c = Client::connect(t.port).unwrap();
    avoid_window_edge(60, std::time::Duration::from_secs(5));

    // The rate_limit claim: 3 per claim_window (1m), costs in units.
    let tok = token(json!({"api_key": "claim-1", "rate_limit": 3}));
    let r = c.get("/heavy/x", &auth(&tok)).unwrap();
    assert_eq!(
        (r.status, r.header("ratelimit-remaining")),
        (200, Some("1"))
    );
    let r = c.get("/heavy/x", &auth(&tok)).unwrap();
    r.assert_refusal(429, "rate_limited");
    assert_eq!(r.json()["message"], "limit of 3 requests per 1m exceeded");
    let r = c.get("/api/x", &auth(&tok)).unwrap();
    assert_eq!(
        (r.status, r.header("ratelimit-remaining")),
        (200, Some("0"))
    );

    // Org windows are shared by every key of the org: 4 per minute in all.
    let a = token(json!({"api_key": "org-a", "org_id": "acme"}));
    let b = token(json!({"api_key": "org-b", "org_id": "acme"}));
    let statuses: Vec<u16> = [&a, &b, &a, &b, &a, &b]
        .iter()
        .map(|tok| c.get("/api/x", &auth(tok)).unwrap().status)
        .collect();
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429]);
    let r = c.get("/api/x", &auth(&a)).unwrap();
    assert_eq!(r.json()["message"], "limit of 4 requests per 1m exceeded");
    // Another org is untouched.
    let other = token(json!({"api_key": "org-c", "org_id": "globex"}));
    assert_eq!(c.get("/api/x", &auth(&other)).unwrap().status, 200);
}

#[test]
fn unauthenticated_routes_carry_no_limit_headers() {
    let up = Recorder::start();
    let t = Tollgate::start(&config(&up.addr(), LIMITS).replace(
        "routes:\n",
        "routes:\n  - { name: open, path_prefix: /open/, upstream: backend, auth: none }\n",
    ));
    let r = t.get("/open/x");
    assert_eq!(r.status, 200);
    assert!(r.header("ratelimit-limit").is_none());
}

#[test]
fn counts_survive_a_reload_that_keeps_the_windows() {
    let up = Recorder::start();
    let t = Tollgate::start(&config(&up.addr(), LIMITS));
    let tok = token(json!({"api_key": "reload-1", "tier": "free"}));
    let mut c = Client::connect(t.port).unwrap();
    avoid_window_edge(5, std::time::Duration::from_secs(4));
    for _ in 0..3 {
        assert_eq!(c.get("/api/x", &auth(&tok)).unwrap().status, 200);
    }
    // Same windows, one more route.
    t.rewrite_config(&config(&up.addr(), LIMITS).replace(
        "routes:\n",
        "routes:\n  - { name: extra, path_prefix: /extra/, upstream: backend }\n",
    ));
    t.proc.signal(libc::SIGHUP);
    t.wait_metric(r#"tollgate_config_reloads_total{result="success"}"#, 1.0);
    let r = c.get("/extra/x", &auth(&tok)).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("ratelimit-remaining"), Some("1"));
}

#[test]
fn cost_reported_by_the_upstream_is_charged() {
    let echo = Echo::start();
    let redis = Redis::start();
    for redis_section in [
        String::new(),
        format!("redis: {{ url: \"{}\" }}\n", redis.url()),
    ] {
        let template = config(&echo.addr(), LIMITS).replace(
            "routes:\n",
            &format!("{redis_section}routes:\n  - {{ name: llm, path_prefix: /llm/, upstream: backend, cost_from_response_header: X-Cost }}\n"),
        );
        let t = Tollgate::start(&template);
        avoid_window_edge(60, std::time::Duration::from_secs(5));
        let tok =
            token(json!({"api_key": format!("llm-{}", redis_section.len()), "rate_limit": 10}));
        let mut c = Client::connect(t.port).unwrap();
        let remaining = |r: &Response| r.header("ratelimit-remaining").map(str::to_string);
        let r = c.get("/llm/chat?cost=7", &auth(&tok)).unwrap();
        assert_eq!((r.status, r.header("x-cost")), (200, Some("7")));
        // 1 was charged at admission, 6 more after the answer: 3 left, 2 after this one.
        let r = c.get("/llm/chat", &auth(&tok)).unwrap();
        assert_eq!(
            (r.status, remaining(&r)),
            (200, Some("2".into())),
            "{redis_section}"
        );
        let r = c.get("/llm/chat?cost=abc", &auth(&tok)).unwrap();
        assert_eq!((r.status, remaining(&r)), (200, Some("1".into())));
        let r = c.get("/llm/chat?cost=5", &auth(&tok)).unwrap();
        assert_eq!(r.status, 200);
        // 14 of 10 used: refused until the window ends.
        c.get("/llm/chat", &auth(&tok))
            .unwrap()
            .assert_refusal(429, "rate_limited");
    }
}
