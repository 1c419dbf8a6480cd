//! What a reload must not miss or wait on: CA files rotated in place
//! (upstream `ca_file`, `redis.ca_file`, `jwks_ca_file`, an upstream token
//! endpoint's `ca_file`), upstream tokens fetched with other credentials,
//! and outbound fetches that never finish. Through the real binary, with
//! real TLS peers (Python's ssl, redis-server) and a trickling endpoint.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use serde_json::json;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys");

fn header(extra_server: &str) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 1, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock" {extra_server} }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
log: {{ level: info, color: false }}
"#
    )
}

/// Sends SIGHUP and waits for the `result` series of reloads to reach `n`.
fn sighup(t: &Tollgate, result: &str, n: f64) {
    t.proc.signal(libc::SIGHUP);
    t.wait_metric(
        &format!(r#"tollgate_config_reloads_total{{result="{result}"}}"#),
        n,
    );
}

/// A CA that signed nothing these tests talk to.
fn stranger_ca(dir: &std::path::Path) -> Vec<u8> {
    let c = Certs::make(dir, &["stranger,127.0.0.1"]);
    std::fs::read(c.ca()).unwrap()
}

#[test]
fn an_upstream_ca_rotated_in_place_takes_effect_on_sighup() {
    let echo = Echo::start();
    let front = TlsFront::start(echo.port);
    let dir = tempfile::tempdir().unwrap();
    let stranger = stranger_ca(dir.path());
    let ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca, &stranger).unwrap();
    let text = format!(
        "{}upstreams: {{ tls: {{ peers: [\"127.0.0.1:{}\"], tls: true, ca_file: \"{}\" }} }}\nroutes: [{{ name: good, path_prefix: /good/, upstream: tls, auth: none }}]\n",
        header(""),
        front.port,
        ca.display()
    );
    let t = Tollgate::start(&text);
    t.get("/good/x").assert_refusal(502, "upstream_unavailable");
    // The same path, new contents: the new CA verifies the peer.
    std::fs::copy(front.ca_file(), &ca).unwrap();
    sighup(&t, "success", 1.0);
    let r = t.get("/good/x");
    assert_eq!(r.status, 200, "{}", r.text());
    // And back: a connection pooled under the old CAs is not reused.
    std::fs::write(&ca, &stranger).unwrap();
    sighup(&t, "success", 2.0);
    t.get("/good/x").assert_refusal(502, "upstream_unavailable");
    // A file that no longer holds a certificate refuses the reload.
    std::fs::write(&ca, "not a certificate\n").unwrap();
    sighup(&t, "failure", 1.0);
    assert!(t.proc.log_text().contains("upstreams.tls.ca_file"));
}

fn rs256() -> String {
    pyjwt(
        json!({"alg": "RS256", "key_file": format!("{KEYS}/rsa_private.pem"), "headers": {"kid": "k1"},
        "claims": {"api_key": "ca-user", "exp": unix_now() + 600, "allowed_routes": ["/*"]}}),
    )
}

fn bearer(t: &Tollgate, token: &str) -> Response {
    t.request(&format!(
        "GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    ))
}

#[test]
fn a_jwks_ca_rotated_in_place_takes_effect_on_sighup() {
    let up = Recorder::start();
    let jwks = JsonServer::start(
        &json!({"keys": [jwk(&format!("{KEYS}/rsa_public.pem"), "k1", "RS256")]}).to_string(),
    );
    let front = TlsFront::start(jwks.port);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("jwks-ca.pem");
    std::fs::write(&ca, stranger_ca(dir.path())).unwrap();
    let text = format!(
        "{}auth: {{ jwt: {{ algorithms: [RS256], jwks_url: \"https://127.0.0.1:{}/jwks\", jwks_ca_file: \"{}\" }} }}\nupstreams: {{ b: {{ peers: [\"{}\"] }} }}\nroutes: [{{ name: api, path_prefix: /api/, upstream: b }}]\n",
        header(""),
        front.port,
        ca.display(),
        up.addr()
    );
    let t = Tollgate::start(&text);
    let tok = rs256();
    // No key set can be fetched through the wrong CA: 503, not 401.
    bearer(&t, &tok).assert_refusal(503, "auth_unavailable");
    std::fs::copy(front.ca_file(), &ca).unwrap();
    sighup(&t, "success", 1.0);
    let r = bearer(&t, &tok);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.hits(), 1);
}

#[test]
fn a_redis_ca_rotated_in_place_takes_effect_on_sighup() {
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
    let other = tempfile::tempdir().unwrap();
    let ca = dir.path().join("redis-ca.pem");
    std::fs::write(&ca, stranger_ca(other.path())).unwrap();
    let up = Echo::start();
    let text = format!(
        "{}redis: {{ url: \"rediss://127.0.0.1:{}\", ca_file: \"{}\", timeout: 500ms }}\nupstreams: {{ b: {{ peers: [\"{}\"] }} }}\nroutes: [{{ name: open, path_prefix: /, upstream: b, auth: none }}]\n",
        header(""),
        redis.port,
        ca.display(),
        up.addr()
    );
    let t = Tollgate::start(&text);
    wait_for("the probe to fail", Duration::from_secs(10), || {
        t.proc
            .log_text()
            .contains("redis unreachable")
            .then_some(())
    });
    assert_eq!(t.get("/ready").status, 503);
    std::fs::copy(certs.ca(), &ca).unwrap();
    sighup(&t, "success", 1.0);
    wait_for("ready over TLS", Duration::from_secs(10), || {
        (t.get("/ready").status == 200).then_some(())
    });
}

fn token_route(endpoint: &str, client_id: &str, scope: &str) -> String {
    format!(
        "routes:\n  - name: svc\n    path_prefix: /svc/\n    upstream: b\n    auth: none\n    upstream_auth: {{ token_url: \"{endpoint}\", client_id: \"{client_id}\", client_secret: \"s3cret\", scope: \"{scope}\", refresh: 5m }}\n"
    )
}

fn upstream_authorization(up: &Recorder) -> String {
    up.last_head()
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("authorization")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default()
}

#[test]
fn changed_credentials_get_a_new_token_also_through_redis() {
    let up = Recorder::start();
    let redis = Redis::start();
    let endpoint = JsonServer::start(r#"{"access_token": "tok-a", "expires_in": 3600}"#);
    let url = format!("http://127.0.0.1:{}/oauth/token", endpoint.port);
    let base = format!(
        "{}redis: {{ url: \"{}\" }}\nupstreams: {{ b: {{ peers: [\"{}\"] }} }}\n",
        header(""),
        redis.url(),
        up.addr()
    );
    let t = Tollgate::start(&format!("{base}{}", token_route(&url, "client-a", "read")));
    let call = || {
        let r = t.request("GET /svc/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        assert_eq!(r.status, 200, "{}", r.text());
        upstream_authorization(&up)
    };
    assert_eq!(call(), "Bearer tok-a");
    assert_eq!(endpoint.hits(), 1);

    // Another client id: the endpoint is asked again (the token shared in
    // Redis belongs to the old client), and the new token is used.
    endpoint.set(r#"{"access_token": "tok-b", "expires_in": 3600}"#, 200);
    t.rewrite_config(&format!("{base}{}", token_route(&url, "client-b", "read")));
    sighup(&t, "success", 1.0);
    assert_eq!(call(), "Bearer tok-b");
    assert_eq!(endpoint.hits(), 2);
    // Another scope, likewise.
    endpoint.set(r#"{"access_token": "tok-c", "expires_in": 3600}"#, 200);
    t.rewrite_config(&format!("{base}{}", token_route(&url, "client-b", "write")));
    sighup(&t, "success", 2.0);
    assert_eq!(call(), "Bearer tok-c");
    assert_eq!(endpoint.hits(), 3);
    // Back to the first credentials: their token is still in Redis, shared
    // by the fleet, and still good.
    t.rewrite_config(&format!("{base}{}", token_route(&url, "client-a", "read")));
    sighup(&t, "success", 3.0);
    assert_eq!(call(), "Bearer tok-a");
    assert_eq!(endpoint.hits(), 3);
    let keys = redis.cli(&["keys", "tollgate:upstream_token:*"]);
    assert!(
        !keys.contains("client") && !keys.contains("s3cret"),
        "{keys}"
    );
    let tokens = keys.lines().filter(|k| !k.ends_with(":lock")).count();
    assert_eq!(tokens, 3, "one shared token per set of credentials: {keys}");
}

/// An HTTP endpoint that answers every request with a head and then one
/// byte of body every 100 ms, forever: each read succeeds, none finishes.
fn trickler() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let mut stream = reader.into_inner();
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{";
                if stream.write_all(head.as_bytes()).is_err() {
                    return;
                }
                while stream.write_all(b" ").is_ok() {
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
    });
    port
}

fn jwks_config(url: &str, up: &str, reload_timeout: &str) -> String {
    format!(
        "{}auth: {{ jwt: {{ algorithms: [RS256], jwks_url: \"{url}\" }} }}\nupstreams: {{ b: {{ peers: [\"{up}\"] }} }}\nroutes: [{{ name: api, path_prefix: /api/, upstream: b }}]\n",
        header(&format!(", reload_timeout: {reload_timeout}"))
    )
}

#[test]
fn a_trickling_jwks_endpoint_fails_the_reload_within_reload_timeout() {
    let up = Recorder::start();
    let good = JsonServer::start(
        &json!({"keys": [jwk(&format!("{KEYS}/rsa_public.pem"), "k1", "RS256")]}).to_string(),
    );
    let good_url = format!("http://127.0.0.1:{}/jwks", good.port);
    let slow_url = format!("http://127.0.0.1:{}/jwks", trickler());
    let t = Tollgate::start(&jwks_config(&good_url, &up.addr(), "1s"));
    let tok = rs256();
    assert_eq!(bearer(&t, &tok).status, 200);

    t.rewrite_config(&jwks_config(&slow_url, &up.addr(), "1s"));
    let started = Instant::now();
    sighup(&t, "failure", 1.0);
    let took = started.elapsed();
    // Refused by the 1 s reload_timeout, not by the fetch's own 5 s deadline.
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "the reload failed after {took:?}"
    );
    assert!(
        t.proc
            .log_text()
            .contains("not ready within server.reload_timeout (1s)"),
        "{}",
        t.proc.log_text()
    );
    // The old config keeps serving, and the next SIGHUP is not stuck.
    assert_eq!(bearer(&t, &tok).status, 200);
    t.rewrite_config(&jwks_config(&good_url, &up.addr(), "2s"));
    sighup(&t, "success", 1.0);
    assert_eq!(bearer(&t, &tok).status, 200);

    // With a long reload_timeout, the fetch's own total deadline (5 s)
    // ends it: every read succeeding does not keep it alive.
    t.rewrite_config(&jwks_config(&good_url, &up.addr(), "1m"));
    sighup(&t, "success", 2.0);
    t.rewrite_config(&jwks_config(&slow_url, &up.addr(), "1m"));
    let started = Instant::now();
    sighup(&t, "failure", 2.0);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(4500) && took < Duration::from_secs(20),
        "the fetch ended after {took:?}"
    );
    assert!(
        t.proc.log_text().contains("no complete answer within 5s"),
        "{}",
        t.proc.log_text()
    );
    assert_eq!(bearer(&t, &tok).status, 200);
}
