//! Distributed limits: several real tollgate processes sharing one real
//! redis-server, checked for exactness and for how little Redis they use.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use serde_json::json;
use std::time::Duration;

const SECRET: &str = "redis-limits-secret-0123456789abcdef";

// Tests send more requests on one kept-alive connection than the default
// server.max_requests_per_connection (1000): no limit here.
fn config(upstream: &str, redis: &str, limits: &str, on_failure: &str) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 2, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock", max_requests_per_connection: 0 }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
log: {{ level: warn, color: false }}
redis: {{ url: "{redis}", timeout: 200ms, on_failure: {on_failure}, key_prefix: "tg:" }}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{SECRET}" }} }}
limits:
{limits}
upstreams:
  backend: {{ peers: ["{upstream}"] }}
routes:
  - {{ name: api, path_prefix: /api/, upstream: backend }}
"#
    )
}

fn limits(algorithm: &str, sync: &str, requests: u64) -> String {
    format!("  algorithm: {algorithm}\n  sync: {sync}\n  headers: both\n  default: [{{ requests: {requests}, window: 1m }}]")
}

fn token(api_key: &str) -> String {
    pyjwt(json!({"alg": "HS256", "key": SECRET, "claims": {
        "api_key": api_key, "exp": unix_now() + 3600, "allowed_routes": ["/*"]}}))
}

fn redis_calls(t: &Tollgate) -> f64 {
    metric_value(&t.metrics(), r#"tollgate_redis_calls_total{op="acquire"}"#).unwrap_or(0.0)
}

fn fleet(n: usize, template: &str) -> Vec<Tollgate> {
    (0..n).map(|_| Tollgate::start(template)).collect()
}

#[test]
fn three_instances_admit_the_limit_and_no_more_with_every_algorithm() {
    let up = Recorder::start();
    let redis = Redis::start();
    for algorithm in ["fixed_window", "sliding_window", "gcra"] {
        let instances = fleet(
            3,
            &config(
                &up.addr(),
                &redis.url(),
                &limits(algorithm, "hybrid", 200),
                "local",
            ),
        );
        avoid_window_edge(60, Duration::from_secs(15));
        let (admitted, limited) = hammer(&instances, &token(&format!("fleet-{algorithm}")), 300);
        assert_eq!(admitted + limited, 900);
        // GCRA refills one unit every 300 ms, so it may admit a few more during the run.
        assert!(
            (200..=206).contains(&admitted),
            "{algorithm}: admitted {admitted} of 900 with a limit of 200"
        );
    }
}

#[test]
fn exact_mode_admits_exactly_the_limit() {
    let up = Recorder::start();
    let redis = Redis::start();
    let instances = fleet(
        3,
        &config(
            &up.addr(),
            &redis.url(),
            &limits("fixed_window", "exact", 50),
            "local",
        ),
    );
    avoid_window_edge(60, Duration::from_secs(10));
    let (admitted, _) = hammer(&instances, &token("exact-1"), 100);
    assert_eq!(admitted, 50);
}

#[test]
fn far_from_the_limit_costs_few_redis_calls() {
    let up = Recorder::start();
    let redis = Redis::start();
    let instances = fleet(
        3,
        &config(
            &up.addr(),
            &redis.url(),
            &limits("fixed_window", "hybrid", 1_000_000),
            "local",
        ),
    );
    avoid_window_edge(60, Duration::from_secs(10));
    let (admitted, limited) = hammer(&instances, &token("big-1"), 700);
    assert_eq!((admitted, limited), (2100, 0));
    let calls: f64 = instances.iter().map(redis_calls).sum();
    let per_request = calls / admitted as f64;
    assert!(
        per_request <= 0.2,
        "{calls} Redis calls for {admitted} requests ({per_request:.4} each)"
    );
}

#[test]
fn a_key_over_its_limit_costs_almost_no_redis_calls() {
    let up = Recorder::start();
    let redis = Redis::start();
    let t = Tollgate::start(&config(
        &up.addr(),
        &redis.url(),
        &limits("fixed_window", "hybrid", 5),
        "local",
    ));
    avoid_window_edge(60, Duration::from_secs(10));
    let tok = token("over-1");
    let mut c = Client::connect(t.port).unwrap();
    let header = format!("Authorization: Bearer {tok}\r\n");
    let remaining: Vec<String> = (0..5)
        .map(|_| {
            let r = c.get("/api/x", &header).unwrap();
            assert_eq!(r.status, 200);
            r.header("ratelimit-remaining").unwrap().to_string()
        })
        .collect();
    assert_eq!(remaining, ["4", "3", "2", "1", "0"]);
    let r = c.get("/api/x", &header).unwrap();
    r.assert_refusal(429, "rate_limited");
    assert_eq!(r.json()["message"], "limit of 5 requests per 1m exceeded");
    let before = redis_calls(&t);
    for _ in 0..1000 {
        assert_eq!(c.get("/api/x", &header).unwrap().status, 429);
    }
    let calls = redis_calls(&t) - before;
    assert!(
        calls <= 20.0,
        "{calls} Redis calls for 1000 refused requests"
    );
    t.wait_metric(
        r#"tollgate_ratelimit_decisions_total{decision="limited",source="local"}"#,
        1000.0,
    );
}

#[test]
fn redis_keys_are_hash_tagged_and_expire_spread_after_their_window() {
    let up = Recorder::start();
    let redis = Redis::start();
    let t = Tollgate::start(&config(
        &up.addr(),
        &redis.url(),
        &limits("fixed_window", "exact", 10),
        "local",
    ));
    let names: Vec<String> = (0..20).map(|i| format!("keys-{i}")).collect();
    for name in &names {
        let tok = token(name);
        let r = request(t.port, &format!("GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {tok}\r\nConnection: close\r\n\r\n")).unwrap();
        assert_eq!(r.status, 200);
    }
    let cli = |args: &[&str]| redis.cli(args);
    let keys = cli(&["KEYS", "tg:rl:*"]);
    let mut lingers = Vec::new();
    for name in &names {
        let prefix = format!("tg:rl:{{k:{name}}}:60:");
        // The counter (its ledger, `<counter>:l`, is checked below).
        let key = keys
            .lines()
            .find(|k| k.starts_with(&prefix) && !k.ends_with(":l"))
            .unwrap_or_else(|| {
                panic!("no key <prefix>rl:{{<key>}}:<window>:<start> for {name} in {keys:?}")
            });
        let start: u64 = key[prefix.len()..].parse().unwrap();
        assert_eq!(start % 60, 0);
        assert_eq!(cli(&["GET", key]), "1");
        // Each key outlives its window by a second of slack (to a few ms of
        // script time) plus up to a window (at most a minute), picked by its
        // name, so one window's keys do not all expire at the same instant
        // (Redis would stall deleting them).
        let expires_ms: u64 = cli(&["PEXPIRETIME", key]).parse().unwrap();
        let linger = expires_ms as i64 - ((start + 60) * 1000) as i64;
        assert!(
            (990..=61_000).contains(&linger),
            "{key} expires {linger} ms after its window"
        );
        lingers.push(linger);
        // The period's ledger: the same hash tag, the instance's unit, and
        // the counter's life.
        let ledger = format!("{key}:l");
        let fields = cli(&["HGETALL", &ledger]);
        assert_eq!(
            fields.lines().nth(1),
            Some("1"),
            "{ledger} holds the instance's unit: {fields:?}"
        );
        // (A later call that rewrites only the ledger works its expiry out
        // again from its own time: the same instant, to a millisecond.)
        let ledger_expires: u64 = cli(&["PEXPIRETIME", &ledger]).parse().unwrap();
        assert!(
            ledger_expires.abs_diff(expires_ms) <= 2,
            "{ledger} expires at {ledger_expires}, its counter at {expires_ms}"
        );
    }
    let spread = lingers.iter().max().unwrap() - lingers.iter().min().unwrap();
    assert!(
        spread >= 10_000,
        "20 keys expire within {spread} ms: {lingers:?}"
    );
}

#[test]
fn redis_outage_follows_on_failure() {
    let up = Recorder::start();
    let mut redis = Redis::start();
    let tok = token("outage-1");
    let header = format!("Authorization: Bearer {tok}\r\n");
    // Exact mode holds no leased budget, so every request needs Redis.
    let local = Tollgate::start(&config(
        &up.addr(),
        &redis.url(),
        &limits("fixed_window", "exact", 1000),
        "local",
    ));
    let closed = Tollgate::start(&config(
        &up.addr(),
        &redis.url(),
        &limits("fixed_window", "exact", 1000),
        "closed",
    ));
    let open = Tollgate::start(&config(
        &up.addr(),
        &redis.url(),
        &limits("fixed_window", "exact", 1000),
        "open",
    ));
    for t in [&local, &closed, &open] {
        assert_eq!(
            Client::connect(t.port)
                .unwrap()
                .get("/api/x", &header)
                .unwrap()
                .status,
            200
        );
    }
    redis.stop();
    wait_for("503 ready with redis down", Duration::from_secs(10), || {
        (local.get("/ready").status == 503).then_some(())
    });

    let r = Client::connect(local.port)
        .unwrap()
        .get("/api/x", &header)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("ratelimit-limit").is_some());
    let r = Client::connect(closed.port)
        .unwrap()
        .get("/api/x", &header)
        .unwrap();
    r.assert_refusal(503, "limiter_unavailable");
    let r = Client::connect(open.port)
        .unwrap()
        .get("/api/x", &header)
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.header("ratelimit-limit").is_none());
    assert!(metric_value(&local.metrics(), "tollgate_redis_errors_total").unwrap_or(0.0) >= 1.0);

    redis.restart();
    wait_for("ready again", Duration::from_secs(10), || {
        (local.get("/ready").status == 200).then_some(())
    });
    wait_for(
        "closed instance admits again",
        Duration::from_secs(10),
        || {
            (Client::connect(closed.port)
                .ok()?
                .get("/api/x", &header)
                .ok()?
                .status
                == 200)
                .then_some(())
        },
    );
}

#[test]
fn graceful_stop_hands_unused_leases_back() {
    let up = Recorder::start();
    let redis = Redis::start();
    let mut t = Tollgate::start(&config(
        &up.addr(),
        &redis.url(),
        &limits("fixed_window", "hybrid", 1000),
        "local",
    ));
    avoid_window_edge(60, Duration::from_secs(10));
    let tok = token("stop-1");
    let mut c = Client::connect(t.port).unwrap();
    for _ in 0..3 {
        assert_eq!(
            c.get("/api/x", &format!("Authorization: Bearer {tok}\r\n"))
                .unwrap()
                .status,
            200
        );
    }
    let keys = redis.cli(&["KEYS", "tg:rl:*"]);
    let key = keys
        .lines()
        .find(|k| !k.ends_with(":l"))
        .expect("a window key (not its ledger)")
        .to_string();
    let leased: u64 = redis.cli(&["GET", &key]).parse().unwrap();
    assert!(
        leased > 3,
        "a lease larger than the 3 requests was taken ({leased})"
    );
    drop(c);
    t.proc.signal(libc::SIGTERM);
    assert_eq!(t.proc.wait_exit(Duration::from_secs(20)), Some(0));
    assert_eq!(
        redis.cli(&["GET", &key]),
        "3",
        "unused units were not handed back"
    );
}

#[test]
fn with_redis_down_local_fallback_still_limits_in_process() {
    let up = Recorder::start();
    let mut redis = Redis::start();
    let t = Tollgate::start(&config(
        &up.addr(),
        &redis.url(),
        &limits("fixed_window", "exact", 5),
        "local",
    ));
    redis.stop();
    wait_for("503 ready with redis down", Duration::from_secs(10), || {
        (t.get("/ready").status == 503).then_some(())
    });
    avoid_window_edge(60, Duration::from_secs(10));
    let header = format!("Authorization: Bearer {}\r\n", token("fallback-1"));
    let mut c = Client::connect(t.port).unwrap();
    let statuses: Vec<u16> = (0..8)
        .map(|_| c.get("/api/x", &header).unwrap().status)
        .collect();
    // The in-process store takes over the same window: 5 admitted, then 429s.
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    assert_eq!(up.hits(), 5);
    t.wait_metric(
        r#"tollgate_ratelimit_decisions_total{decision="limited",source="local"}"#,
        3.0,
    );
}
