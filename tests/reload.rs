//! Reload by diff: what a SIGHUP leaves unchanged keeps running (the JWKS key
//! set, the Redis connections, upstreams), what it changes is made ready
//! before the swap, and a reload never makes a request wait or fail.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys");

/// `extra_routes` are appended to the route list; `redis` is a whole
/// `redis:` line or empty.
fn config(upstream: &str, jwks_url: &str, redis: &str, extra_routes: &str, stored: bool) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 2, grace_period: 2s, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock" }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
log: {{ level: info, color: false }}
{redis}
auth: {{ jwt: {{ algorithms: [RS256], jwks_url: "{jwks_url}", jwks_refresh: 5m, require_stored: {stored} }} }}
limits: {{ default: [{{ requests: 1000000, window: 1m }}] }}
upstreams: {{ backend: {{ peers: ["{upstream}"] }} }}
routes:
  - {{ name: api, path_prefix: /api/, upstream: backend }}
{extra_routes}"#
    )
}

fn jwks_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}/.well-known/jwks.json")
}

fn key_set(kid: &str) -> String {
    json!({ "keys": [jwk(&format!("{KEYS}/rsa_public.pem"), kid, "RS256")] }).to_string()
}

fn token(kid: &str, api_key: &str) -> String {
    pyjwt(
        json!({"alg": "RS256", "key_file": format!("{KEYS}/rsa_private.pem"),
        "headers": {"kid": kid},
        "claims": {"api_key": api_key, "exp": unix_now() + 600, "allowed_routes": ["/*"]}}),
    )
}

fn call(t: &Tollgate, token: &str) -> Response {
    request(
        t.port,
        &format!("GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"),
    )
    .expect("answer")
}

fn reload(t: &Tollgate, template: &str, result: &str, n: f64) {
    t.rewrite_config(template);
    t.proc.signal(libc::SIGHUP);
    t.wait_metric(
        &format!(r#"tollgate_config_reloads_total{{result="{result}"}}"#),
        n,
    );
}

fn jwks_attempts(t: &Tollgate) -> f64 {
    metric_value(
        &t.metrics(),
        r#"tollgate_jwks_fetches_total{result="attempt"}"#,
    )
    .unwrap_or(0.0)
}

#[test]
fn a_reload_with_the_identity_provider_down_keeps_the_key_set() {
    let up = Recorder::start();
    let idp = JsonServer::start(&key_set("k1"));
    let base = config(&up.addr(), &jwks_url(idp.port), "", "", false);
    let t = Tollgate::start(&base);
    assert_eq!(call(&t, &token("k1", "before")).status, 200);
    let tokens: Vec<String> = (0..20)
        .map(|i| token("k1", &format!("after-{i}")))
        .collect();

    // The identity provider goes down; the reload does not touch auth.
    idp.set("unavailable", 503);
    let attempts = jwks_attempts(&t);
    let changed = config(
        &up.addr(),
        &jwks_url(idp.port),
        "",
        "  - { name: extra, path_prefix: /extra/, upstream: backend, auth: none }\n",
        false,
    );
    reload(&t, &changed, "success", 1.0);
    let mut slowest = Duration::ZERO;
    for tok in &tokens {
        let started = Instant::now();
        let r = call(&t, tok);
        let took = started.elapsed();
        assert_eq!(r.status, 200, "{}", r.text());
        slowest = slowest.max(took);
    }
    // Before the key set was kept, each of these waited 1-2 s for a fetch
    // and got a 503; no fetch is tried now (asserted below).
    eprintln!("20 requests after the reload, slowest {slowest:?}");
    assert!(
        slowest < Duration::from_millis(200),
        "a request took {slowest:?}"
    );
    assert_eq!(t.get("/extra/x").status, 200, "the reload took effect");
    assert_eq!(
        jwks_attempts(&t),
        attempts,
        "nobody fetched the key set again"
    );
}

#[test]
fn a_new_jwks_url_is_fetched_before_the_swap_or_the_reload_is_refused() {
    let up = Recorder::start();
    let first = JsonServer::start(&key_set("k1"));
    let t = Tollgate::start(&config(&up.addr(), &jwks_url(first.port), "", "", false));
    assert_eq!(call(&t, &token("k1", "a")).status, 200);

    // A new endpoint that does not answer: refused, the old config serves.
    let dead = free_port();
    reload(
        &t,
        &config(&up.addr(), &jwks_url(dead), "", "", false),
        "failure",
        1.0,
    );
    assert_eq!(call(&t, &token("k1", "b")).status, 200);
    assert!(
        t.proc
            .log_text()
            .contains("the new key set could not be fetched"),
        "{}",
        t.proc.log_text()
    );

    // A new endpoint that answers: fetched during the reload, so the first
    // request with one of its keys needs no fetch.
    let second = JsonServer::start(&key_set("k2"));
    reload(
        &t,
        &config(&up.addr(), &jwks_url(second.port), "", "", false),
        "success",
        1.0,
    );
    assert_eq!(second.hits(), 1, "fetched before the swap");
    assert_eq!(call(&t, &token("k2", "c")).status, 200);
    assert_eq!(second.hits(), 1, "no fetch on the request path");
    call(&t, &token("k1", "d")).assert_refusal(401, "invalid_token");
}

fn redis_clients(redis: &Redis) -> usize {
    redis
        .cli(&["client", "list"])
        .lines()
        .filter(|l| !l.contains("cmd=client"))
        .count()
}

#[test]
fn ten_reloads_under_kept_alive_load_with_jwks_redis_and_stored_tokens() {
    let up = Echo::start();
    let idp = JsonServer::start(&key_set("k1"));
    let redis = Redis::start();
    let redis_line = format!("redis: {{ url: \"{}\", timeout: 250ms }}", redis.url());
    let a = config(&up.addr(), &jwks_url(idp.port), &redis_line, "", true);
    let b = config(
        &up.addr(),
        &jwks_url(idp.port),
        &redis_line,
        "  - { name: extra, path_prefix: /extra/, upstream: backend, auth: none }\n",
        true,
    );
    let t = Tollgate::start(&a);
    redis.cli(&[
        "set",
        "tollgate:token:stored-user",
        r#"{"token":"t","claims":{},"blocked":false}"#,
    ]);
    let tok = token("k1", "stored-user");
    let header = format!("Authorization: Bearer {tok}\r\n");
    wait_for("ready", Duration::from_secs(10), || {
        (t.get("/ready").status == 200).then_some(())
    });
    let loads: Vec<Load> = (0..3)
        .map(|_| Load::start(t.port, "/api/x", &header, true, 200))
        .collect();
    wait_for("traffic", Duration::from_secs(10), || {
        metric_value(
            &t.metrics(),
            r#"tollgate_requests_total{route="api",status="200"}"#,
        )
        .filter(|n| *n > 100.0)
    });
    // Every connection is made: the proxy's, the probe's, the revocation
    // listener's and the analytics flusher's (its first flush).
    wait_for("an analytics flush", Duration::from_secs(10), || {
        metric_value(
            &t.metrics(),
            r#"tollgate_redis_calls_total{op="analytics"}"#,
        )
    });
    let clients = redis_clients(&redis);
    let attempts = jwks_attempts(&t);
    for i in 1..=10 {
        reload(&t, if i % 2 == 1 { &b } else { &a }, "success", i as f64);
        // Let requests run on the new config before the next reload.
        let served = metric_value(
            &t.metrics(),
            r#"tollgate_requests_total{route="api",status="200"}"#,
        )
        .unwrap_or(0.0);
        wait_for(
            "requests on the new config",
            Duration::from_secs(10),
            || {
                metric_value(
                    &t.metrics(),
                    r#"tollgate_requests_total{route="api",status="200"}"#,
                )
                .filter(|n| *n > served + 20.0)
            },
        );
    }
    for (i, load) in loads.into_iter().enumerate() {
        let report = load.report();
        eprintln!(
            "client {i}: {} answered, {} failed",
            report.ok,
            report.failures.len()
        );
        assert!(report.ok > 20, "client {i}: {report:?}");
        assert!(
            report.failures.is_empty(),
            "client {i}: {} failed: {:?}",
            report.failures.len(),
            &report.failures[..report.failures.len().min(5)]
        );
    }
    assert_eq!(jwks_attempts(&t), attempts, "the key set was kept");
    assert_eq!(
        redis_clients(&redis),
        clients,
        "the Redis connections were kept:\n{}",
        redis.cli(&["client", "list"])
    );
}

#[test]
fn peers_may_be_names_and_a_name_that_does_not_resolve_is_a_warning() {
    let up = Echo::start();
    let text = format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock" }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
upstreams:
  named: {{ peers: ["localhost:{port}", "no-such-host.invalid:80"] }}
  lost: {{ peers: ["no-such-host.invalid:80"] }}
routes:
  - {{ name: named, path_prefix: /named/, upstream: named, auth: none }}
  - {{ name: lost, path_prefix: /lost/, upstream: lost, auth: none }}
"#,
        port = up.port
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, render(&text, free_port(), free_port(), dir.path())).unwrap();
    let (code, out, err) = run_cli(&["check", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("warning: upstreams.named.peers: cannot resolve \"no-such-host.invalid:80\""),
        "{err}"
    );

    let t = Tollgate::start(&text);
    for _ in 0..4 {
        let r = t.get("/named/x");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    t.get("/lost/x").assert_refusal(502, "upstream_unavailable");
    assert!(t.proc.log_text().contains("stays out of rotation"));
}

#[test]
fn rediss_with_a_private_ca_is_ready_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path(), &["redis,127.0.0.1,localhost"]);
    let redis = Redis::start_with(&[
        "--tls-port",
        "--tls-cert-file",
        &certs.cert("redis"),
        "--tls-key-file",
        &certs.key("redis"),
        "--tls-ca-cert-file",
        &certs.ca(),
        "--tls-auth-clients",
        "no",
    ]);
    let up = Echo::start();
    let secret = "rediss-secret-0123456789abcdef";
    let text = format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock" }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
redis: {{ url: "rediss://127.0.0.1:{}", ca_file: "{}", timeout: 500ms, on_failure: closed }}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{secret}" }} }}
limits: {{ sync: exact, default: [{{ requests: 5, window: 1m }}] }}
upstreams: {{ backend: {{ peers: ["{}"] }} }}
routes: [{{ name: api, path_prefix: /api/, upstream: backend }}]
"#,
        redis.port,
        certs.ca(),
        up.addr()
    );
    let t = Tollgate::start(&text);
    wait_for("ready over TLS", Duration::from_secs(10), || {
        (t.get("/ready").status == 200).then_some(())
    });
    avoid_window_edge(60, Duration::from_secs(5));
    let tok = pyjwt(json!({"alg": "HS256", "key": secret,
        "claims": {"api_key": "tls-user", "exp": unix_now() + 600, "allowed_routes": ["/*"]}}));
    let statuses: Vec<u16> = (0..7).map(|_| call(&t, &tok).status).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429]);
    let keys = redis_tls_cli(&redis, &certs, &["keys", "tollgate:rl:*"]);
    assert!(keys.contains("tollgate:rl:{k:tls-user}:60"), "{keys}");

    // `token issue` stores through the same layer, over TLS, from the config.
    let (code, out, err) = run_cli(
        &[
            "token",
            "issue",
            "-c",
            t.config_path.to_str().unwrap(),
            "--api-key",
            "cli-user",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("stored as:  tollgate:token:cli-user"), "{out}");
    let stored = redis_tls_cli(&redis, &certs, &["get", "tollgate:token:cli-user"]);
    assert!(stored.contains("\"api_key\":\"cli-user\""), "{stored}");

    // Without the CA, the server's certificate is not trusted: not ready.
    let untrusted = text.replace(&format!(", ca_file: \"{}\"", certs.ca()), "");
    let t2 = Tollgate::start(&untrusted);
    std::thread::sleep(Duration::from_millis(10));
    wait_for("the probe to fail", Duration::from_secs(10), || {
        t2.proc
            .log_text()
            .contains("redis unreachable")
            .then_some(())
    });
    assert_eq!(t2.get("/ready").status, 503);
}

fn redis_tls_cli(redis: &Redis, certs: &Certs, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "--tls",
            "--cacert",
            &certs.ca(),
        ])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
