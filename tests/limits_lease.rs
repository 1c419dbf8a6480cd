//! Lease sizing and hand-back: several real tollgate processes sharing one
//! real redis-server. Larger leases far from the limit must not cost
//! exactness near it, nor leave budget idle on an instance that stopped
//! seeing a key.
//! (3 instances × 300 requests against a limit of 200 is
//! `limits_redis::three_instances_admit_the_limit_and_no_more_with_every_algorithm`.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use serde_json::json;
use std::time::Duration;

const SECRET: &str = "lease-limits-secret-0123456789abcdef";

// Tests send more requests on one kept-alive connection than the default
// server.max_requests_per_connection (1000): no limit here.
fn config(upstream: &str, redis: &str, algorithm: &str, requests: u64) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 2, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock", max_requests_per_connection: 0 }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
log: {{ level: warn, color: false }}
redis: {{ url: "{redis}", timeout: 500ms, on_failure: closed, key_prefix: "lease:" }}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{SECRET}" }} }}
limits:
  algorithm: {algorithm}
  sync: hybrid
  default: [{{ requests: {requests}, window: 1m }}]
upstreams:
  backend: {{ peers: ["{upstream}"] }}
routes:
  - {{ name: api, path_prefix: /api/, upstream: backend }}
"#
    )
}

fn token(api_key: &str) -> String {
    pyjwt(json!({"alg": "HS256", "key": SECRET, "claims": {
        "api_key": api_key, "exp": unix_now() + 3600, "allowed_routes": ["/*"]}}))
}

fn status(c: &mut Client, header: &str) -> u16 {
    match c.get("/api/x", header).expect("response").status {
        s @ (200 | 429) => s,
        s => panic!("unexpected status {s}"),
    }
}

/// One key, limit 300 per minute, three instances taking 80%, 10% and 10%
/// of the requests (interleaved 8:1:1, one at a time): the fleet admits
/// 300..306, and no instance refuses while budget that could serve it sits
/// on another: the first refusal anywhere comes after at least 285 admitted.
#[test]
fn uneven_load_admits_the_limit_and_refuses_only_at_the_end() {
    let up = Recorder::start();
    let redis = Redis::start();
    for algorithm in ["fixed_window", "sliding_window"] {
        let template = config(&up.addr(), &redis.url(), algorithm, 300);
        let instances: Vec<Tollgate> = (0..3).map(|_| Tollgate::start(&template)).collect();
        let header = format!(
            "Authorization: Bearer {}\r\n",
            token(&format!("split-{algorithm}"))
        );
        // Wait for the window first: a connection that sends nothing for
        // server.header_timeout (10 s) is closed, as it should be.
        avoid_window_edge(60, Duration::from_secs(20));
        let mut clients: Vec<Client> = instances
            .iter()
            .map(|t| Client::connect(t.port).expect("connect"))
            .collect();
        let schedule = [0, 0, 0, 0, 0, 0, 0, 0, 1, 2];
        let (mut admitted, mut first_refusal) = (0usize, None);
        let mut per_instance = [0usize; 3];
        for i in 0..500 {
            let which = schedule[i % schedule.len()];
            if status(&mut clients[which], &header) == 200 {
                admitted += 1;
                per_instance[which] += 1;
            } else if first_refusal.is_none() {
                first_refusal = Some((which, admitted));
            }
        }
        assert!(
            (300..=306).contains(&admitted),
            "{algorithm}: admitted {admitted} ({per_instance:?}) with a limit of 300"
        );
        let (which, before) = first_refusal.expect("a refusal after the limit");
        assert!(
            before >= 285,
            "{algorithm}: instance {which} refused after only {before} admitted in the fleet \
             ({per_instance:?} by the end)"
        );
    }
}

/// Instance A takes a lease on a key, admits a few requests and goes quiet;
/// its unused units go back to Redis, so instance B can admit everything A
/// did not use — exactly that, and no more.
#[test]
fn an_idle_instance_hands_its_lease_back() {
    let up = Recorder::start();
    let redis = Redis::start();
    let template = config(&up.addr(), &redis.url(), "fixed_window", 1000);
    let a = Tollgate::start(&template);
    let b = Tollgate::start(&template);
    avoid_window_edge(60, Duration::from_secs(40));
    let header = format!("Authorization: Bearer {}\r\n", token("idle-1"));

    let mut ca = Client::connect(a.port).expect("connect");
    for _ in 0..10 {
        assert_eq!(status(&mut ca, &header), 200);
    }
    drop(ca);
    let keys = redis.cli(&["KEYS", "lease:rl:*"]);
    let key = keys
        .lines()
        .find(|k| !k.ends_with(":l"))
        .expect("a window key (not its ledger)")
        .to_string();
    let leased: u64 = redis.cli(&["GET", &key]).parse().unwrap_or(0);
    assert!(leased > 10, "A leased more than it used ({leased})");

    // The event: Redis counts only what A admitted.
    wait_for(
        "instance A to hand its unused lease back",
        Duration::from_secs(30),
        || (redis.cli(&["GET", &key]) == "10").then_some(()),
    );

    let mut cb = Client::connect(b.port).expect("connect");
    let mut admitted = 0;
    while status(&mut cb, &header) == 200 {
        admitted += 1;
        assert!(admitted <= 1000, "B admitted more than the limit");
    }
    assert_eq!(admitted, 990, "B admits the limit minus A's 10");
    assert_eq!(redis.cli(&["GET", &key]), "1000");
}

/// A key far from its limit gets large leases: once this instance knows the
/// key's rate (after its first second), hundreds of requests cost at most a
/// couple of Redis calls, and the lease is handed back (the key's Redis
/// count falls back to what was admitted) once the key is idle.
#[test]
fn far_from_the_limit_a_lease_covers_many_requests_and_goes_back_when_idle() {
    let up = Recorder::start();
    let redis = Redis::start();
    let t = Tollgate::start(&config(&up.addr(), &redis.url(), "fixed_window", 100_000));
    avoid_window_edge(60, Duration::from_secs(40));
    let header = format!("Authorization: Bearer {}\r\n", token("far-1"));
    let mut c = Client::connect(t.port).expect("connect");
    let calls =
        || metric_value(&t.metrics(), r#"tollgate_redis_calls_total{op="acquire"}"#).unwrap_or(0.0);
    // The rate is measured per second: leases stay small until one has passed.
    let started = std::time::Instant::now();
    let mut admitted = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        assert_eq!(status(&mut c, &header), 200);
        admitted += 1;
    }
    let before = calls();
    for _ in 0..500 {
        assert_eq!(status(&mut c, &header), 200);
    }
    admitted += 500;
    let spent = calls() - before;
    assert!(spent <= 2.0, "{spent} lease calls for 500 requests");
    drop(c);
    let keys = redis.cli(&["KEYS", "lease:rl:*"]);
    let key = keys
        .lines()
        .find(|k| !k.ends_with(":l"))
        .expect("a window key (not its ledger)")
        .to_string();
    let leased: u64 = redis.cli(&["GET", &key]).parse().unwrap_or(0);
    assert!(
        leased > admitted + 500,
        "a large lease ({leased} for {admitted})"
    );
    let want = admitted.to_string();
    wait_for(
        "the idle lease to be handed back",
        Duration::from_secs(30),
        || (redis.cli(&["GET", &key]) == want).then_some(()),
    );
}
