//! The admin API against two real instances sharing a real Redis.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

const SECRET: &str = "admin-secret-0123456789abcdef";
const ADMIN: &str = "admin-token-1";

fn config(upstream: &str, redis: &str) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 2, grace_period: 1s, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock" }}
admin: {{ listen: "127.0.0.1:{{admin}}", token: "{ADMIN}" }}
log: {{ level: warn, color: false }}
redis: {{ url: "{redis}", timeout: 200ms }}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{SECRET}", require_stored: true }} }}
limits:
  default: [{{ requests: 100, window: 1m }}]
  tiers: {{ free: [{{ requests: 5, window: 5s }}, {{ requests: 50, window: 1m }}] }}
upstreams:
  backend: {{ peers: ["{upstream}"] }}
routes:
  - {{ name: api, path_prefix: /api/, upstream: backend }}
"#
    )
}

fn admin(t: &Tollgate, method: &str, path: &str, body: Option<&str>) -> Response {
    admin_call(t, ADMIN, method, path, body.unwrap_or(""))
}

fn call(t: &Tollgate, token: &str) -> Response {
    request(
        t.port,
        &format!("GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"),
    )
    .expect("request")
}

/// Waits until every instance answers `status`; returns how long it took.
fn until_all(instances: &[&Tollgate], token: &str, status: u16) -> Duration {
    let start = Instant::now();
    wait_for(
        &format!("status {status} everywhere"),
        Duration::from_secs(5),
        || {
            instances
                .iter()
                .all(|t| call(t, token).status == status)
                .then_some(())
        },
    );
    start.elapsed()
}

fn redis_cli(redis: &Redis, args: &[&str]) -> String {
    redis.cli(args)
}

#[test]
fn admin_needs_its_token_and_is_off_without_one() {
    let up = Recorder::start();
    let redis = Redis::start();
    let t = Tollgate::start(&config(&up.addr(), &redis.url()));
    let r = request(
        t.admin_port,
        "GET /admin/stats/unique HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    r.assert_refusal(401, "missing_token");
    let r = request(t.admin_port, "GET /admin/stats/unique HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer wrong\r\nConnection: close\r\n\r\n").unwrap();
    r.assert_refusal(401, "invalid_token");
    assert_eq!(admin(&t, "GET", "/admin/stats/unique", None).status, 200);

    let off = Tollgate::start(
        &config(&up.addr(), &redis.url()).replace(&format!(", token: \"{ADMIN}\""), ""),
    );
    let r = admin(&off, "GET", "/admin/stats/unique", None);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "no_route");
    assert_eq!(get(off.admin_port, "/metrics").unwrap().status, 200);
}

#[test]
fn token_lifecycle_reaches_every_instance_within_a_second() {
    let up = Recorder::start();
    let redis = Redis::start();
    let a = Tollgate::start(&config(&up.addr(), &redis.url()));
    let b = Tollgate::start(&config(&up.addr(), &redis.url()));
    let r = admin(
        &a,
        "POST",
        "/admin/tokens",
        Some(r#"{"api_key": "life-1", "allowed_routes": ["/api/*"], "ttl": "1h"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let issued = r.json();
    assert_eq!(issued["api_key"], "life-1");
    let token = issued["token"].as_str().unwrap().to_string();
    assert!(issued["expires_at"].as_u64().unwrap() > unix_now() + 3500);
    let both = [&a, &b];
    until_all(&both, &token, 200);

    // A token that verifies but is not stored is refused.
    let unstored = pyjwt(json!({"alg": "HS256", "key": SECRET, "claims": {
        "api_key": "never-stored", "exp": unix_now() + 600, "allowed_routes": ["/*"]}}));
    call(&a, &unstored).assert_refusal(401, "token_revoked");

    assert_eq!(
        admin(&b, "POST", "/admin/tokens/life-1/block", None).status,
        200
    );
    let took = until_all(&both, &token, 401);
    assert!(took <= Duration::from_secs(1), "blocking took {took:?}");
    let r = call(&a, &token);
    r.assert_refusal(401, "token_revoked");
    assert_eq!(r.json()["message"], "the key is blocked");

    assert_eq!(
        admin(&a, "POST", "/admin/tokens/life-1/unblock", None).status,
        200
    );
    let took = until_all(&both, &token, 200);
    assert!(took <= Duration::from_secs(1), "unblocking took {took:?}");

    assert_eq!(
        admin(&a, "DELETE", "/admin/tokens/life-1", None).status,
        200
    );
    let took = until_all(&both, &token, 401);
    assert!(took <= Duration::from_secs(1), "revocation took {took:?}");
    call(&b, &token).assert_refusal(401, "token_revoked");
    assert_eq!(
        admin(&a, "DELETE", "/admin/tokens/life-1", None).status,
        404
    );
    assert_eq!(
        admin(&a, "POST", "/admin/tokens/life-1/block", None).status,
        404
    );
}

#[test]
fn keep_alive_extends_the_stored_ttl() {
    let up = Recorder::start();
    let redis = Redis::start();
    let t = Tollgate::start(&config(&up.addr(), &redis.url()));
    let r = admin(
        &t,
        "POST",
        "/admin/tokens",
        Some(r#"{"api_key": "ka-1", "ttl": "10m"}"#),
    );
    assert_eq!(r.status, 201);
    let ttl: u64 = redis_cli(&redis, &["TTL", "tollgate:token:ka-1"])
        .parse()
        .unwrap();
    assert!((590..=600).contains(&ttl), "{ttl}");
    let r = admin(
        &t,
        "POST",
        "/admin/tokens/ka-1/keep-alive",
        Some(r#"{"ttl": "2h"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["expires_in"], 7200);
    let ttl: u64 = redis_cli(&redis, &["TTL", "tollgate:token:ka-1"])
        .parse()
        .unwrap();
    assert!((7190..=7200).contains(&ttl), "{ttl}");
    assert_eq!(
        admin(
            &t,
            "POST",
            "/admin/tokens/nobody/keep-alive",
            Some(r#"{"ttl": "1h"}"#)
        )
        .status,
        404
    );
}

#[test]
fn bad_bodies_are_400_json() {
    let up = Recorder::start();
    let redis = Redis::start();
    let t = Tollgate::start(&config(&up.addr(), &redis.url()));
    for (path, body) in [
        ("/admin/tokens", "{not json"),
        ("/admin/tokens", r#"{"api_key": "x", "colour": "red"}"#),
        ("/admin/tokens", r#"{"ttl": "forever"}"#),
        ("/admin/tokens", r#"{"ttl": "0s"}"#),
        ("/admin/tokens", r#"{"rate_limit": "ten"}"#),
        ("/admin/tokens", r#"{"allowed_routes": ["/a*"]}"#),
        ("/admin/tokens/x/keep-alive", r#"{"ttl": "soon"}"#),
        ("/admin/tokens/x/keep-alive", r#"{}"#),
    ] {
        let r = admin(&t, "POST", path, Some(body));
        assert_eq!(r.status, 400, "{path} {body}: {}", r.text());
        assert_eq!(r.json()["error"], "bad_request", "{body}");
        assert!(r.json()["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let r = admin(&t, "GET", "/admin/stats/top?n=zero", None);
    assert_eq!(r.status, 400);
    assert_eq!(admin(&t, "GET", "/admin/nothing", None).status, 404);
}

#[test]
fn quota_shows_every_window_after_traffic() {
    let up = Recorder::start();
    let redis = Redis::start();
    let t = Tollgate::start(&config(&up.addr(), &redis.url()));
    avoid_window_edge(5, Duration::from_secs(2));
    let r = admin(
        &t,
        "POST",
        "/admin/tokens",
        Some(r#"{"api_key": "q-1", "tier": "free"}"#),
    );
    let token = r.json()["token"].as_str().unwrap().to_string();
    for _ in 0..3 {
        assert_eq!(call(&t, &token).status, 200);
    }
    let r = admin(&t, "GET", "/admin/quota/q-1", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let q = r.json();
    assert_eq!(q["stored"], true);
    let windows = q["windows"].as_array().unwrap();
    assert_eq!(windows.len(), 2, "{q}");
    assert_eq!(windows[0]["limit"], 5);
    assert_eq!(windows[0]["window"], "5s");
    assert_eq!(windows[1]["limit"], 50);
    // Used counts leased units: at least the three requests, never past the limit.
    let used = windows[0]["used"].as_u64().unwrap();
    assert!((3..=5).contains(&used), "{q}");
    assert_eq!(windows[0]["remaining"].as_u64().unwrap(), 5 - used);
    assert!(windows[0]["reset"].as_u64().unwrap() <= 5);
}

#[test]
fn top_and_unique_after_traffic_and_flushed_on_stop() {
    let up = Recorder::start();
    let redis = Redis::start();
    let mut t = Tollgate::start(&config(&up.addr(), &redis.url()));
    let mut tokens = Vec::new();
    for (key, n) in [("heavy", 6), ("medium", 3), ("light", 1)] {
        let r = admin(
            &t,
            "POST",
            "/admin/tokens",
            Some(&format!(r#"{{"api_key": "{key}"}}"#)),
        );
        let token = r.json()["token"].as_str().unwrap().to_string();
        for _ in 0..n {
            assert_eq!(call(&t, &token).status, 200);
        }
        tokens.push(token);
    }
    let top = wait_for("analytics flush", Duration::from_secs(5), || {
        let r = admin(&t, "GET", "/admin/stats/top?n=2", None);
        let v = r.json();
        (v["all_time"].as_array().map(Vec::len) == Some(2)).then_some(v)
    });
    assert_eq!(
        top["all_time"][0],
        json!({"api_key": "heavy", "requests": 6})
    );
    assert_eq!(
        top["all_time"][1],
        json!({"api_key": "medium", "requests": 3})
    );
    assert_eq!(
        top["current_hour"][0],
        json!({"api_key": "heavy", "requests": 6})
    );
    assert_eq!(
        admin(&t, "GET", "/admin/stats/unique", None).json()["unique_keys"],
        3
    );

    // Counts still pending at SIGTERM are written before the process exits.
    for _ in 0..4 {
        assert_eq!(call(&t, &tokens[2]).status, 200);
    }
    t.proc.signal(libc::SIGTERM);
    assert_eq!(t.proc.wait_exit(Duration::from_secs(20)), Some(0));
    let score = redis_cli(&redis, &["ZSCORE", "tollgate:{stats}:requests", "light"]);
    assert_eq!(score, "5");
}

#[test]
fn a_flush_of_many_keys_is_written_in_slices_and_counts_them_all() {
    let up = Recorder::start();
    let redis = Redis::start();
    let cfg =
        config(&up.addr(), &redis.url()).replace("require_stored: true", "require_stored: false");
    let t = Tollgate::start(&cfg);
    // 1,200 distinct keys: twelve of the flusher's 100-key slices and more.
    let mint = |key: &str| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &json!({"api_key": key, "exp": unix_now() + 600, "allowed_routes": ["/*"]}),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    for i in 0..1200 {
        assert_eq!(call(&t, &mint(&format!("many-{i}"))).status, 200);
    }
    let busiest = mint("many-busiest");
    for _ in 0..5 {
        assert_eq!(call(&t, &busiest).status, 200);
    }
    // The slices of one flush land one after another: wait for the last.
    let unique = wait_for("every slice flushed", Duration::from_secs(10), || {
        let n = admin(&t, "GET", "/admin/stats/unique", None).json()["unique_keys"].as_u64()?;
        let top = admin(&t, "GET", "/admin/stats/top?n=1", None).json();
        // HyperLogLog: within a few percent of the 1,201 keys.
        let busiest = json!({"api_key": "many-busiest", "requests": 5});
        (n >= 1160 && top["all_time"][0] == busiest).then_some(n)
    });
    assert!(unique <= 1240, "{unique}");
    let top = admin(&t, "GET", "/admin/stats/top?n=1", None).json();
    assert_eq!(
        top["all_time"][0],
        json!({"api_key": "many-busiest", "requests": 5})
    );
    assert_eq!(up.hits(), 1205);
}
