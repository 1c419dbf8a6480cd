//! Keys from a JWKS endpoint: rotation, unknown key ids, outages.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use serde_json::json;
use std::time::Duration;

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys");

fn config(upstream: &str, jwks_port: u16) -> String {
    config_url(
        upstream,
        &format!("http://127.0.0.1:{jwks_port}/.well-known/jwks.json"),
        "",
    )
}

/// `extra` goes inside `auth.jwt`, e.g. `jwks_ca_file: ...,`.
fn config_url(upstream: &str, jwks_url: &str, extra: &str) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 1, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock" }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
log: {{ level: info, color: false }}
auth: {{ jwt: {{ algorithms: [RS256], {extra} jwks_url: "{jwks_url}", jwks_refresh: 5m }} }}
upstreams: {{ backend: {{ peers: ["{upstream}"] }} }}
routes: [{{ name: api, path_prefix: /api/, upstream: backend }}]
"#
    )
}

fn rs256(kid: &str) -> String {
    pyjwt(
        json!({"alg": "RS256", "key_file": format!("{KEYS}/rsa_private.pem"), "headers": {"kid": kid},
        "claims": {"api_key": "jwks-user", "exp": unix_now() + 600, "allowed_routes": ["/*"]}}),
    )
}

fn call(t: &Tollgate, token: &str) -> Response {
    request(t.port, &format!("GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")).unwrap()
}

fn set_of(kids: &[&str]) -> String {
    let keys: Vec<serde_json::Value> = kids
        .iter()
        .map(|k| jwk(&format!("{KEYS}/rsa_public.pem"), k, "RS256"))
        .collect();
    json!({ "keys": keys }).to_string()
}

#[test]
fn rotation_and_unknown_key_ids() {
    let up = Recorder::start();
    let server = JsonServer::start(&set_of(&["k1"]));
    let t = Tollgate::start(&config(&up.addr(), server.port));
    assert_eq!(call(&t, &rs256("k1")).status, 200);

    // A new key id appears: the first request carrying it triggers one refetch.
    server.set(&set_of(&["k1", "k2"]), 200);
    let before = server.hits();
    assert_eq!(call(&t, &rs256("k2")).status, 200);
    assert_eq!(server.hits(), before + 1, "one refetch for the new key id");

    // An unknown key id: refused, and refetches are rate-limited (one per
    // 10 s at most; a slow machine may see the loop span a second period).
    let unknown = rs256("k9");
    let before = server.hits();
    let started = std::time::Instant::now();
    for _ in 0..20 {
        call(&t, &unknown).assert_refusal(401, "invalid_token");
    }
    let allowed = 1 + started.elapsed().as_secs() as usize / 10;
    assert!(
        server.hits() <= before + allowed,
        "{} fetches for 20 unknown-kid tokens in {:?}",
        server.hits() - before,
        started.elapsed()
    );

    // A shared-secret token naming a JWKS key id never passes.
    let hs = pyjwt(
        json!({"alg": "HS256", "key": "whatever", "headers": {"kid": "k1"},
        "claims": {"api_key": "x", "exp": unix_now() + 600, "allowed_routes": ["/*"]}}),
    );
    call(&t, &hs).assert_refusal(401, "invalid_token");
    // A token without a kid.
    let nokid = pyjwt(
        json!({"alg": "RS256", "key_file": format!("{KEYS}/rsa_private.pem"),
        "claims": {"api_key": "x", "exp": unix_now() + 600, "allowed_routes": ["/*"]}}),
    );
    call(&t, &nokid).assert_refusal(401, "invalid_token");
}

#[test]
fn a_failing_endpoint_keeps_the_last_good_set() {
    let up = Recorder::start();
    let server = JsonServer::start(&set_of(&["k1"]));
    let t = Tollgate::start(&config(&up.addr(), server.port));
    assert_eq!(call(&t, &rs256("k1")).status, 200);
    server.set("oops", 500);
    // Unknown kid forces a (failing) fetch; known keys keep working.
    call(&t, &rs256("k3")).assert_refusal(401, "invalid_token");
    assert_eq!(call(&t, &rs256("k1")).status, 200);
    t.wait_metric(r#"tollgate_jwks_fetches_total{result="failure"}"#, 1.0);
}

#[test]
fn no_key_set_yet_is_a_503_not_a_401_and_first_requests_wait() {
    let up = Recorder::start();
    let server = JsonServer::start("not yet");
    server.set("down", 503);
    let t = Tollgate::start(&config(&up.addr(), server.port));
    let r = call(&t, &rs256("k1"));
    r.assert_refusal(503, "auth_unavailable");
    // The endpoint recovers: within a second or two tokens pass.
    server.set(&set_of(&["k1"]), 200);
    wait_for("keys after recovery", Duration::from_secs(10), || {
        (call(&t, &rs256("k1")).status == 200).then_some(())
    });
    assert!(metric_value(
        &t.metrics(),
        r#"tollgate_auth_failures_total{reason="invalid_token"}"#
    )
    .is_none());
}

#[test]
fn https_key_sets_are_verified_against_the_configured_ca() {
    let up = Recorder::start();
    let server = JsonServer::start(&set_of(&["k1"]));
    let front = TlsFront::start(server.port);
    let url = format!("https://127.0.0.1:{}/.well-known/jwks.json", front.port);

    let trusting = Tollgate::start(&config_url(
        &up.addr(),
        &url,
        &format!("jwks_ca_file: \"{}\",", front.ca_file()),
    ));
    assert_eq!(call(&trusting, &rs256("k1")).status, 200);
    assert!(server.hits() >= 1);

    // Without the private CA the certificate is not trusted: no key set is
    // loaded, which is a 503 and a counted fetch failure, never a 401.
    let hits = server.hits();
    let system_store = Tollgate::start(&config_url(&up.addr(), &url, ""));
    call(&system_store, &rs256("k1")).assert_refusal(503, "auth_unavailable");
    assert!(
        metric_value(
            &system_store.metrics(),
            r#"tollgate_jwks_fetches_total{result="failure"}"#
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(server.hits(), hits, "no request passed the TLS handshake");
    let log = system_store.proc.log_text();
    assert!(log.to_lowercase().contains("certificate"), "{log}");
}
