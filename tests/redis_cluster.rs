//! `redis.cluster`: a fleet of real tollgate processes on a real three-master
//! Redis Cluster. Limits stay exact, keys spread over the masters (every key
//! of one script call shares a hash tag, so no call crosses slots), and token
//! revocation reaches every instance.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

const SECRET: &str = "cluster-secret-0123456789abcdef";
const ADMIN: &str = "cluster-admin-token";

fn config(upstream: &str, cluster: &RedisCluster, sync: &str, requests: u64) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 2, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock" }}
admin: {{ listen: "127.0.0.1:{{admin}}", token: "{ADMIN}" }}
log: {{ level: warn, color: false }}
redis: {{ cluster: {urls}, timeout: 500ms, on_failure: closed, key_prefix: "tg:" }}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{SECRET}" }} }}
limits:
  sync: {sync}
  default: [{{ requests: {requests}, window: 1m }}]
upstreams:
  backend: {{ peers: ["{upstream}"] }}
routes:
  - {{ name: api, path_prefix: /api/, upstream: backend }}
"#,
        urls = cluster.urls_yaml()
    )
}

fn token(api_key: &str) -> String {
    pyjwt(json!({"alg": "HS256", "key": SECRET, "claims": {
        "api_key": api_key, "exp": unix_now() + 3600, "allowed_routes": ["/*"]}}))
}

fn call(t: &Tollgate, token: &str) -> Response {
    request(
        t.port,
        &format!("GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"),
    )
    .expect("request")
}

fn admin(t: &Tollgate, method: &str, path: &str, body: &str) -> Response {
    admin_call(t, ADMIN, method, path, body)
}

/// Requests for `/api/x` with `token` to every instance at once (one
/// kept-alive connection each), each until it has been refused 5 times.
/// A `503 limiter_unavailable` is neither: a cluster call slower than
/// `redis.timeout` on a busy machine (`on_failure: closed`), after which
/// the instance backs off for a second; its grant, if the script ran, comes
/// back at the instance's next call. Returns (admitted, refused, 503s).
fn until_refused(instances: &[Tollgate], token: &str) -> (usize, usize, usize) {
    let header = format!("Authorization: Bearer {token}\r\n");
    let handles: Vec<_> = instances
        .iter()
        .map(|t| {
            let (port, header) = (t.port, header.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(port).expect("connect");
                let (mut ok, mut limited, mut unavailable) = (0, 0, 0);
                let deadline = Instant::now() + Duration::from_secs(60);
                while limited < 5 {
                    assert!(
                        Instant::now() < deadline,
                        "never refused: {ok} admitted, {unavailable} 503"
                    );
                    let r = c.get("/api/x", &header).expect("response");
                    match r.status {
                        200 => ok += 1,
                        429 => {
                            r.assert_refusal(429, "rate_limited");
                            limited += 1
                        }
                        503 => {
                            r.assert_refusal(503, "limiter_unavailable");
                            unavailable += 1;
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        s => panic!("unexpected status {s}: {}", r.text()),
                    }
                }
                (ok, limited, unavailable)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .fold((0, 0, 0), |(a, b, c), (d, e, f)| (a + d, b + e, c + f))
}

/// Exactly the limit is admitted on a cluster — no more, and none of it
/// lost to a slow call — and it is what reached the upstream.
#[test]
fn a_fleet_on_a_cluster_admits_the_limit_and_no_more() {
    let up = Recorder::start();
    let cluster = RedisCluster::start(3);

    let exact: Vec<Tollgate> = (0..2)
        .map(|_| Tollgate::start(&config(&up.addr(), &cluster, "exact", 50)))
        .collect();
    avoid_window_edge(60, Duration::from_secs(20));
    let (admitted, _, slow) = until_refused(&exact, &token("cluster-exact"));
    eprintln!("exact: {admitted} admitted, {slow} calls slower than redis.timeout");
    assert_eq!(admitted, 50, "exact mode on the cluster");
    assert_eq!(up.hits(), 50);
    drop(exact);

    let hybrid: Vec<Tollgate> = (0..3)
        .map(|_| Tollgate::start(&config(&up.addr(), &cluster, "hybrid", 200)))
        .collect();
    avoid_window_edge(60, Duration::from_secs(20));
    let (admitted, _, slow) = until_refused(&hybrid, &token("cluster-hybrid"));
    eprintln!("hybrid: {admitted} admitted, {slow} calls slower than redis.timeout");
    assert_eq!(admitted, 200, "hybrid mode on the cluster");
    assert_eq!(up.hits(), 250);

    // Many keys: their counters land on more than one master, and each
    // key's windows still hold.
    // (A 503 from a slow call is asked again.)
    for i in 0..12 {
        let header = format!(
            "Authorization: Bearer {}\r\n",
            token(&format!("spread-{i}"))
        );
        let mut c = Client::connect(hybrid[0].port).expect("connect");
        let mut admitted = 0;
        while admitted < 3 {
            let r = c.get("/api/x", &header).expect("response");
            match r.status {
                200 => admitted += 1,
                503 => {
                    r.assert_refusal(503, "limiter_unavailable");
                    std::thread::sleep(Duration::from_millis(100));
                }
                s => panic!("spread-{i}: {s} {}", r.text()),
            }
        }
    }
    let counts = cluster.key_counts();
    assert!(
        counts.iter().filter(|&&n| n > 0).count() >= 2,
        "every key on one master: {counts:?}"
    );
}

#[test]
fn revocation_on_a_cluster_reaches_every_instance() {
    let up = Recorder::start();
    let cluster = RedisCluster::start(3);
    let stored = |s: String| {
        s.replace(
            r#"secret: "cluster"#,
            r#"require_stored: true, secret: "cluster"#,
        )
    };
    let a = Tollgate::start(&stored(config(&up.addr(), &cluster, "hybrid", 1000)));
    let b = Tollgate::start(&stored(config(&up.addr(), &cluster, "hybrid", 1000)));
    let r = admin(
        &a,
        "POST",
        "/admin/tokens",
        r#"{"api_key": "cluster-life", "allowed_routes": ["/api/*"], "ttl": "1h"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let token = r.json()["token"].as_str().expect("token").to_string();
    for t in [&a, &b] {
        assert_eq!(call(t, &token).status, 200);
    }

    assert_eq!(
        admin(&b, "DELETE", "/admin/tokens/cluster-life", "").status,
        200
    );
    let start = Instant::now();
    wait_for(
        "revocation on both instances",
        Duration::from_secs(5),
        || {
            [&a, &b]
                .iter()
                .all(|t| call(t, &token).status == 401)
                .then_some(())
        },
    );
    assert!(
        start.elapsed() <= Duration::from_secs(1),
        "revocation took {:?}",
        start.elapsed()
    );
    call(&a, &token).assert_refusal(401, "token_revoked");
}
