//! `require_stored` when the token store cannot answer: real tollgate
//! processes, a real redis-server that is stopped or stalled, a recording
//! upstream that counts what got through.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use serde_json::json;
use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SECRET: &str = "outage-secret-0123456789abcdef";
const ADMIN: &str = "outage-admin-token";

fn config(upstream: &str, redis: &str, on_failure: &str, store_cache: &str) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 2, grace_period: 1s, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock" }}
admin: {{ listen: "127.0.0.1:{{admin}}", token: "{ADMIN}" }}
log: {{ level: warn, color: false }}
redis: {{ url: "{redis}", timeout: 100ms, on_failure: {on_failure} }}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{SECRET}", require_stored: true, store_cache: {store_cache} }} }}
limits: {{ default: [{{ requests: 1000000, window: 1m }}] }}
upstreams:
  backend: {{ peers: ["{upstream}"] }}
routes:
  - {{ name: api, path_prefix: /api/, upstream: backend }}
"#
    )
}

fn call(t: &Tollgate, token: &str) -> Response {
    request(
        t.port,
        &format!("GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"),
    )
    .expect("request")
}

/// Issues and stores a token through the admin API.
fn issue(t: &Tollgate, api_key: &str) -> String {
    let body = format!(r#"{{"api_key": "{api_key}", "allowed_routes": ["/api/*"], "ttl": "1h"}}"#);
    let r = admin_call(t, ADMIN, "POST", "/admin/tokens", &body);
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["token"].as_str().unwrap().to_string()
}

/// A token stored in Redis directly, as `token issue --redis` does it: no
/// message on the revocation channel.
fn stored(redis: &Redis, api_key: &str) -> String {
    let record = r#"{"token":"-","blocked":false}"#;
    let key = format!("tollgate:token:{api_key}");
    assert_eq!(redis.cli(&["SET", &key, record, "EX", "3600"]), "OK");
    pyjwt(json!({"alg": "HS256", "key": SECRET, "claims": {
        "api_key": api_key, "exp": unix_now() + 3600, "allowed_routes": ["/api/*"]}}))
}

/// A token that verifies but was never stored.
fn unstored(api_key: &str) -> String {
    pyjwt(json!({"alg": "HS256", "key": SECRET, "claims": {
        "api_key": api_key, "exp": unix_now() + 600, "allowed_routes": ["/*"]}}))
}

fn assert_not_stored(r: &Response) {
    r.assert_refusal(401, "token_revoked");
    assert_eq!(
        r.json()["message"],
        "the token is not in the token store (revoked, or never stored)"
    );
}

fn assert_store_unavailable(r: &Response) {
    r.assert_refusal(503, "token_store_unavailable");
    assert_eq!(r.header("retry-after"), Some("1"));
}

/// Keeps a redis-server busy with `DEBUG SLEEP` from a client of its own,
/// one stall after another, until dropped.
struct Stalls {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Stalls {
    fn start(port: u16, seconds: &str) -> Stalls {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let command = format!(
            "*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n${}\r\n{seconds}\r\n",
            seconds.len()
        );
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect redis");
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        // The first stall is under way before the test goes on.
        conn.write_all(command.as_bytes()).unwrap();
        let thread = std::thread::spawn(move || {
            let mut stalls = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                assert_eq!(line, "+OK\r\n", "DEBUG SLEEP refused");
                stalls += 1;
                if flag.load(Ordering::Relaxed) {
                    return stalls;
                }
                conn.write_all(command.as_bytes()).unwrap();
            }
        });
        Stalls {
            stop,
            thread: Some(thread),
        }
    }

    /// Ends the stalls; returns how many there were.
    fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("stall thread")
    }
}

impl Drop for Stalls {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn debuggable_redis() -> Redis {
    Redis::start_with(&["--enable-debug-command", "local"])
}

/// Redis stopped, `on_failure: open`: a token Redis confirmed just before
/// the outage keeps working for `store_cache` after that confirmation, then
/// gets 503; a token last seen not stored stays refused (401 while that is
/// remembered, then 503); a token never seen gets 503.
#[test]
fn a_stopped_store_admits_only_recent_confirmations() {
    let up = Recorder::start();
    let mut redis = Redis::start();
    let store_cache = Duration::from_secs(5);
    let t = Tollgate::start(&config(&up.addr(), &redis.url(), "open", "5s"));
    // Stored without a message on the revocation channel, which could
    // arrive after the first lookup and drop its answer.
    let active = stored(&redis, "active-1");
    let revoked = stored(&redis, "revoked-1");
    let seen_unstored = unstored("seen-unstored");
    let never_seen = unstored("never-seen");
    assert_eq!(
        admin_call(&t, ADMIN, "DELETE", "/admin/tokens/revoked-1", "").status,
        200
    );
    wait_for("revocation seen", Duration::from_secs(5), || {
        (call(&t, &revoked).status == 401).then_some(())
    });
    assert_not_stored(&call(&t, &seen_unstored));
    // The first request of this token asks Redis: its answer comes between
    // sending and receiving.
    let sent = Instant::now();
    assert_eq!(call(&t, &active).status, 200);
    let confirmed_by = Instant::now();
    let hits = up.hits();

    redis.stop();
    let mut admitted = 0;
    loop {
        let before = Instant::now();
        let r = call(&t, &active);
        let after = Instant::now();
        if r.status == 503 {
            assert_store_unavailable(&r);
            // Refused only once store_cache had passed since the confirmation.
            assert!(after >= sent + store_cache, "503 too early");
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        // Admitted only while the confirmation was younger than store_cache.
        assert!(before < confirmed_by + store_cache, "200 after store_cache");
        admitted += 1;
        assert!(
            after < confirmed_by + store_cache + Duration::from_secs(20),
            "never refused"
        );
        // Tokens not stored: never admitted.
        for token in [&revoked, &seen_unstored] {
            let r = call(&t, token);
            if r.status != 503 {
                assert_not_stored(&r);
            }
        }
        assert_store_unavailable(&call(&t, &never_seen));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(admitted > 0, "the confirmed token was refused at once");
    // And stays refused while the store is down.
    for _ in 0..5 {
        assert_store_unavailable(&call(&t, &active));
    }
    assert_eq!(
        up.hits(),
        hits + admitted,
        "the upstream saw other requests"
    );
    let metrics = t.metrics();
    let answers = |a: &str| {
        metric_value(
            &metrics,
            &format!("tollgate_token_store_outage_answers_total{{answer=\"{a}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(answers("confirmed") >= 1.0, "{metrics}");
    // The token seen not stored, asked again after a second: remembered.
    assert!(answers("refused") >= 1.0, "{metrics}");
    assert!(answers("unavailable") >= 6.0, "{metrics}");

    // Back: a token stored now works, the revoked one does not.
    redis.restart();
    let fresh = wait_for("the store answers again", Duration::from_secs(10), || {
        let r = admin_call(
            &t,
            ADMIN,
            "POST",
            "/admin/tokens",
            r#"{"api_key": "after-1"}"#,
        );
        (r.status == 201).then(|| r.json()["token"].as_str().unwrap().to_string())
    });
    wait_for("a stored token passes", Duration::from_secs(5), || {
        (call(&t, &fresh).status == 200).then_some(())
    });
    assert_not_stored(&call(&t, &revoked));
}

/// Redis stalled again and again (`DEBUG SLEEP` from another client), the
/// default `on_failure: local`: a revoked token and a token never stored
/// get through not once in 200 requests.
#[test]
fn a_stalling_store_never_admits_a_revoked_token() {
    let up = Recorder::start();
    let redis = debuggable_redis();
    let t = Tollgate::start(&config(&up.addr(), &redis.url(), "local", "30s"));
    let active = stored(&redis, "stall-active");
    let revoked = stored(&redis, "stall-revoked");
    assert_eq!(call(&t, &active).status, 200);
    assert_eq!(
        admin_call(&t, ADMIN, "DELETE", "/admin/tokens/stall-revoked", "").status,
        200
    );
    wait_for("revocation seen", Duration::from_secs(5), || {
        (call(&t, &revoked).status == 401).then_some(())
    });
    let never = unstored("stall-never");
    let hits = up.hits();
    let errors_before = metric_value(&t.metrics(), "tollgate_redis_errors_total").unwrap_or(0.0);

    let stalls = Stalls::start(redis.port, "0.5");
    let mut statuses = std::collections::BTreeMap::new();
    let mut slowest = Duration::ZERO;
    let mut took = Vec::new();
    // Paced over about four seconds: several lookups fall into stalls.
    for i in 0..200 {
        let token = if i % 2 == 0 { &revoked } else { &never };
        let start = Instant::now();
        let r = call(&t, token);
        took.push(start.elapsed());
        slowest = slowest.max(start.elapsed());
        *statuses.entry(r.status).or_insert(0) += 1;
        match r.status {
            401 => assert_not_stored(&r),
            503 => assert_store_unavailable(&r),
            s => panic!("status {s} for a token that is not stored: {}", r.text()),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let stall_count = stalls.stop();
    assert_eq!(
        up.hits(),
        hits,
        "a token that is not stored reached the upstream"
    );
    let errors = metric_value(&t.metrics(), "tollgate_redis_errors_total").unwrap_or(0.0);
    assert!(
        errors > errors_before,
        "the stalls never made a lookup fail ({stall_count} stalls): the test proved nothing"
    );
    // Lookups skip Redis for a second after a failure instead of each
    // waiting on a timeout: most answers do not wait on Redis at all.
    took.sort();
    let median = took[took.len() / 2];
    eprintln!(
        "statuses {statuses:?}, median {median:?}, slowest {slowest:?}, {stall_count} stalls"
    );
    assert!(median < Duration::from_millis(100), "median {median:?}");
    // The token confirmed before is not locked out once Redis answers again.
    wait_for("the confirmed token passes", Duration::from_secs(5), || {
        (call(&t, &active).status == 200).then_some(())
    });
}

/// A revocation through the admin API evicts the confirmation at once: with
/// the store stalling right after it, the token confirmed a moment ago is
/// refused within a second on every instance (not admitted for
/// `store_cache` on the strength of that confirmation).
#[test]
fn a_revocation_evicts_the_confirmation_on_every_instance() {
    let up = Recorder::start();
    let redis = debuggable_redis();
    let cfg = config(&up.addr(), &redis.url(), "local", "30s");
    let a = Tollgate::start(&cfg);
    let b = Tollgate::start(&cfg);
    let token = issue(&a, "evict-1");
    for t in [&a, &b] {
        wait_for("token accepted", Duration::from_secs(5), || {
            (call(t, &token).status == 200).then_some(())
        });
    }
    let revoked_at = Instant::now();
    let r = admin_call(&b, ADMIN, "DELETE", "/admin/tokens/evict-1", "");
    assert_eq!(r.status, 200, "{}", r.text());
    let stalls = Stalls::start(redis.port, "0.5");
    for t in [&a, &b] {
        let refused_at = wait_for("refused", Duration::from_secs(5), || {
            (call(t, &token).status != 200).then(Instant::now)
        });
        assert!(
            refused_at - revoked_at <= Duration::from_secs(1),
            "refused only after {:?}",
            refused_at - revoked_at
        );
    }
    let hits = up.hits();
    // Past the one-second lookup cache, the store still stalling: the token
    // stays refused (401 when a lookup got through, else 503).
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for t in [&a, &b] {
            let r = call(t, &token);
            assert!(matches!(r.status, 401 | 503), "{}: {}", r.status, r.text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stalls.stop();
    assert_eq!(up.hits(), hits);
}

/// The revocation channel drops and comes back (a gap in which messages
/// may have been missed): every key is asked of Redis again, but a token
/// confirmed before still passes while Redis then cannot answer.
#[test]
fn a_gap_in_the_channel_does_not_drop_confirmations() {
    let up = Recorder::start();
    let redis = Redis::start();
    let t = Tollgate::start(&config(&up.addr(), &redis.url(), "local", "30s"));
    let token = stored(&redis, "gap-1");
    assert_eq!(call(&t, &token).status, 200);
    // The id of tollgate's subscriber connection.
    let subscriber = || {
        let list = redis.cli(&["CLIENT", "LIST", "TYPE", "pubsub"]);
        let id = list.split_whitespace().next()?.strip_prefix("id=")?;
        Some(id.to_string())
    };
    let before = wait_for("a subscription", Duration::from_secs(10), subscriber);
    assert_eq!(redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]), "1");
    // Subscribed again (and so resynchronised) on a new connection.
    wait_for("a new subscription", Duration::from_secs(10), || {
        subscriber().filter(|id| *id != before)
    });
    // Redis frozen: every lookup times out.
    let server = redis.proc.as_ref().unwrap();
    server.signal(libc::SIGSTOP);
    let statuses: Vec<u16> = (0..5).map(|_| call(&t, &token).status).collect();
    server.signal(libc::SIGCONT);
    assert_eq!(statuses, [200; 5]);
    let confirmed = metric_value(
        &t.metrics(),
        "tollgate_token_store_outage_answers_total{answer=\"confirmed\"}",
    )
    .unwrap_or(0.0);
    assert!(confirmed >= 1.0, "Redis was never asked after the gap");
}
