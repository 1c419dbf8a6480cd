//! `limits.concurrency`: requests in flight per api_key across instances,
//! with a real redis-server, two real tollgate processes and an upstream
//! that records how many requests it is answering at once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use serde_json::json;
use std::time::Duration;

const SECRET: &str = "concurrency-secret-0123456789abcdef";

fn config(upstream: &str, redis: &str) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 2, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock" }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
log: {{ level: info, color: false }}
{redis}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{SECRET}" }} }}
limits:
  default: [{{ requests: 1000000, window: 1m }}]
  concurrency: {{ default: 3, tiers: {{ free: 1 }} }}
upstreams: {{ backend: {{ peers: ["{upstream}"], read_timeout: 10s }} }}
routes: [{{ name: api, path_prefix: /api/, upstream: backend }}]
"#
    )
}

fn token(key: &str, tier: Option<&str>) -> String {
    let mut claims = json!({"api_key": key, "exp": unix_now() + 600, "allowed_routes": ["/*"]});
    if let Some(t) = tier {
        claims["tier"] = json!(t);
    }
    pyjwt(json!({"alg": "HS256", "key": SECRET, "claims": claims}))
}

/// `n` requests at once, spread over the instances; returns the statuses.
fn burst(ports: &[u16], token: &str, n: usize) -> Vec<u16> {
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let port = ports[i % ports.len()];
            let raw = format!("GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n");
            std::thread::spawn(move || request(port, &raw).map(|r| {
                if r.status == 429 {
                    r.assert_refusal(429, "concurrency_limited");
                }
                r.status
            }))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap().expect("an answer"))
        .collect()
}

#[test]
fn two_instances_never_have_more_than_the_limit_in_flight() {
    let slow = Recorder::start_slow(Duration::from_millis(1000));
    let redis = Redis::start();
    let redis_line = format!("redis: {{ url: \"{}\", timeout: 500ms }}", redis.url());
    let a = Tollgate::start(&config(&slow.addr(), &redis_line));
    let b = Tollgate::start(&config(&slow.addr(), &redis_line));
    let ports = [a.port, b.port];
    let tok = token("busy", None);

    let statuses = burst(&ports, &tok, 16);
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(
        ok + statuses.iter().filter(|s| **s == 429).count(),
        16,
        "{statuses:?}"
    );
    assert!(ok >= 3, "the limit's worth got in: {statuses:?}");
    assert!(
        slow.max_in_flight() <= 3,
        "{} in flight at once",
        slow.max_in_flight()
    );

    // Every slot comes back (each when its request has ended): three at
    // once pass again, on both instances.
    wait_for("every slot back", Duration::from_secs(10), || {
        (burst(&ports, &tok, 3) == [200, 200, 200]).then_some(())
    });
    // A tier's own limit.
    let free = token("free-user", Some("free"));
    let statuses = burst(&ports, &free, 4);
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert!(slow.max_in_flight() <= 3);
}

#[test]
fn a_client_that_goes_away_gives_its_slot_back_and_a_dead_instance_frees_its_slots() {
    let slow = Recorder::start_slow(Duration::from_millis(1500));
    let redis = Redis::start();
    let redis_line = format!("redis: {{ url: \"{}\", timeout: 500ms }}", redis.url());
    let mut a = Tollgate::start(&config(&slow.addr(), &redis_line));
    let b = Tollgate::start(&config(&slow.addr(), &redis_line));
    let tok = token("leaver", Some("free"));

    // A client sends and leaves before its answer; once the upstream has
    // answered, the slot is free for the next one.
    let mut c = Client::connect(b.port).unwrap();
    c.send_raw(
        format!("GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {tok}\r\n\r\n").as_bytes(),
    )
    .unwrap();
    wait_for(
        "the request to reach the upstream",
        Duration::from_secs(10),
        || (slow.hits() == 1).then_some(()),
    );
    drop(c);
    wait_for("the slot to come back", Duration::from_secs(10), || {
        (burst(&[b.port], &tok, 1) == [200]).then_some(())
    });

    // An instance dies holding the key's slot: the other gets it back
    // within the lease (30 s).
    let port = a.port;
    let raw = format!("GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {tok}\r\n\r\n");
    let held = std::thread::spawn(move || request(port, &raw));
    wait_for(
        "the request to reach the upstream",
        Duration::from_secs(10),
        || (slow.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 1).then_some(()),
    );
    a.proc.signal(libc::SIGKILL);
    let _ = a.proc.wait_exit(Duration::from_secs(10));
    let _ = held.join();
    assert_eq!(
        burst(&[b.port], &tok, 1),
        [429],
        "the dead instance's slot is still held"
    );
    let started = std::time::Instant::now();
    wait_for(
        "the dead instance's slot to expire",
        Duration::from_secs(40),
        || (burst(&[b.port], &tok, 1) == [200]).then_some(()),
    );
    assert!(
        started.elapsed() <= Duration::from_secs(35),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn without_redis_the_count_is_the_instances_own() {
    let slow = Recorder::start_slow(Duration::from_millis(1500));
    let t = Tollgate::start(&config(&slow.addr(), ""));
    let statuses = burst(&[t.port], &token("solo", None), 8);
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        3,
        "{statuses:?}"
    );
    assert!(slow.max_in_flight() <= 3);
}
