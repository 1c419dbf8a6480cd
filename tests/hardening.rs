//! Every bad input refused, through the real binary: for each, the status a
//! client sees and that nothing reached the upstream (a recording upstream
//! counts what arrives).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const SECRET: &str = "hardening-secret-0123456789abcdef";
const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys");

/// `server` goes inside `server: { ... }`; `extra_routes` after the routes.
fn config(upstream: &str, server: &str, jwt: &str, extra_routes: &str) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 1, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock", {server} }}
admin: {{ listen: "127.0.0.1:{{admin}}", token: "admin-token" }}
log: {{ level: info, color: false }}
auth: {{ jwt: {jwt} }}
upstreams: {{ backend: {{ peers: ["{upstream}"] }} }}
routes:
  - {{ name: public, path_prefix: /public/, upstream: backend, auth: none }}
  - {{ name: intra, path_prefix: /public/, host: intranet.local, upstream: backend, auth: jwt }}
  - {{ name: api, path_prefix: /api/, upstream: backend, forward_claims: {{ api_key: X-Api-Key }}, cost_from_response_header: X-Cost }}
{extra_routes}"#
    )
}

fn hs() -> String {
    format!("{{ algorithms: [HS256], secret: \"{SECRET}\" }}")
}

fn token(claims: serde_json::Value) -> String {
    pyjwt(json!({"alg": "HS256", "key": SECRET, "claims": claims}))
}

fn good_token(key: &str) -> String {
    token(json!({"api_key": key, "exp": unix_now() + 600, "allowed_routes": ["/*"]}))
}

fn raw(t: &Tollgate, text: &str) -> Response {
    t.request(text)
}

#[test]
fn a_host_bound_route_is_chosen_by_authority_and_normalised_host() {
    let up = Recorder::start();
    let t = Tollgate::start(&config(&up.addr(), "", &hs(), ""));
    // Absolute form names the JWT route's host: its rules apply.
    for (what, text) in [
        ("absolute form", "GET http://intranet.local/public/x HTTP/1.1\r\nHost: intranet.local\r\nConnection: close\r\n\r\n"),
        ("trailing dot", "GET /public/x HTTP/1.1\r\nHost: intranet.local.\r\nConnection: close\r\n\r\n"),
        ("case and port", "GET /public/x HTTP/1.1\r\nHost: INTRANET.Local:8080\r\nConnection: close\r\n\r\n"),
        ("absolute form, dot and port", "GET http://intranet.local.:80/public/x HTTP/1.1\r\nHost: intranet.local.:80\r\nConnection: close\r\n\r\n"),
    ] {
        let r = raw(&t, text);
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        r.assert_refusal(401, "missing_token");
    }
    // Absolute form without Host: refused before any route logic.
    raw(
        &t,
        "GET http://intranet.local/public/x HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .assert_refusal(400, "bad_request");
    // An authority and a Host that disagree.
    let r = raw(&t, "GET http://intranet.local/public/x HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n");
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(up.hits(), 0, "nothing reached the upstream");

    // The controls: the public route for other hosts, the JWT route with a token.
    assert_eq!(
        raw(
            &t,
            "GET /public/x HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n"
        )
        .status,
        200
    );
    let tok = good_token("k1");
    let r = raw(&t, &format!("GET http://intranet.local./public/x HTTP/1.1\r\nHost: intranet.local.\r\nAuthorization: Bearer {tok}\r\nConnection: close\r\n\r\n"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.hits(), 2);
}

#[test]
fn http11_without_host_is_refused() {
    let up = Recorder::start();
    let t = Tollgate::start(&config(&up.addr(), "", &hs(), ""));
    raw(&t, "GET /public/x HTTP/1.1\r\nConnection: close\r\n\r\n")
        .assert_refusal(400, "bad_request");
    assert_eq!(up.hits(), 0);
    // HTTP/1.0 has no such rule.
    assert_eq!(raw(&t, "GET /public/x HTTP/1.0\r\n\r\n").status, 200);
    assert_eq!(up.hits(), 1);
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn heads_over_max_header_bytes_get_431_and_their_memory_back() {
    let up = Recorder::start();
    let t = Tollgate::start(&config(&up.addr(), "header_timeout: 20s", &hs(), ""));
    let big = "a".repeat(100 * 1024);
    let r = raw(
        &t,
        &format!("GET /public/x HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n"),
    );
    r.assert_refusal(431, "headers_too_large");
    assert_eq!(r.header("connection"), Some("close"));
    // Just under the limit still passes.
    let fits = "a".repeat(30 * 1024);
    assert_eq!(
        raw(
            &t,
            &format!(
                "GET /public/x HTTP/1.1\r\nHost: a\r\nX-Big: {fits}\r\nConnection: close\r\n\r\n"
            )
        )
        .status,
        200
    );
    assert_eq!(up.hits(), 1);

    // 300 connections each trying to send a 1 MiB head: each is cut off at
    // the limit (431, closed), so memory stays bounded.
    let before = rss_kib(t.proc.pid());
    let chunk = vec![b'a'; 64 * 1024];
    let mut conns = Vec::new();
    for _ in 0..300 {
        let mut s = TcpStream::connect(t.addr()).expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /public/x HTTP/1.1\r\nHost: a\r\nX-Big: ")
            .unwrap();
        // Writes stop succeeding once the proxy has answered and closed.
        for _ in 0..16 {
            if s.write_all(&chunk).is_err() {
                break;
            }
        }
        conns.push(s);
    }
    let peak = rss_kib(t.proc.pid());
    let mut answered = 0;
    for mut s in conns {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = vec![0u8; 64];
        if let Ok(n) = s.read(&mut buf) {
            if buf[..n].starts_with(b"HTTP/1.1 431") {
                answered += 1;
            }
        }
    }
    eprintln!(
        "300 heads of 1 MiB: RSS {before} KiB before, {peak} KiB at the peak, {} KiB after; {answered} answered 431",
        rss_kib(t.proc.pid())
    );
    assert!(answered >= 290, "{answered} of 300 got their 431");
    // Before the limit, this took RSS from 25 MB to 403 MB.
    assert!(
        peak < before + 64 * 1024,
        "RSS grew from {before} KiB to {peak} KiB for 300 cut-off heads"
    );
    assert_eq!(
        up.hits(),
        1,
        "nothing of the big heads reached the upstream"
    );
    let m = t.metrics();
    assert!(
        metric_value(
            &m,
            r#"tollgate_requests_total{route="_invalid",status="431"}"#
        )
        .unwrap_or(0.0)
            >= 290.0,
        "{m}"
    );
}

#[test]
fn a_head_that_trickles_in_is_cut_off_at_header_timeout() {
    let up = Recorder::start();
    let t = Tollgate::start(&config(&up.addr(), "header_timeout: 2s", &hs(), ""));
    // One byte every 200 ms: each read restarts a per-read timeout, but the
    // whole head must arrive within header_timeout.
    let started = Instant::now();
    let mut s = TcpStream::connect(t.addr()).unwrap();
    let head = b"GET /public/x HTTP/1.1\r\nHost: a\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed_at = None;
    for b in head.iter() {
        if s.write_all(&[*b]).is_err() {
            closed_at = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        if started.elapsed() > Duration::from_secs(15) {
            break;
        }
    }
    // The server has closed: reading gives end-of-file (or a reset).
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 16];
    let read = s.read(&mut buf);
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the connection was still open: {read:?}"
    );
    let took = closed_at.unwrap_or(started.elapsed());
    assert!(took < Duration::from_secs(12), "closed only after {took:?}");
    assert_eq!(up.hits(), 0);

    // A head that takes a moment but arrives within the timeout is served.
    let mut s = TcpStream::connect(t.addr()).unwrap();
    s.write_all(b"GET /public/x HTTP/1.1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(b"Host: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(up.hits(), 1);
}

#[test]
fn tokens_naming_critical_extensions_are_refused() {
    let up = Recorder::start();
    let t = Tollgate::start(&config(&up.addr(), "", &hs(), ""));
    let claims = json!({"api_key": "k", "exp": unix_now() + 600, "allowed_routes": ["/*"]});
    let crit = pyjwt(json!({"alg": "HS256", "key": SECRET, "claims": claims,
        "headers": {"crit": ["exp-ext"], "exp-ext": 1}}));
    let r = raw(&t, &format!("GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {crit}\r\nConnection: close\r\n\r\n"));
    r.assert_refusal(401, "invalid_token");
    assert!(r.text().contains("crit"), "{}", r.text());
    assert_eq!(up.hits(), 0);
}

#[test]
fn admin_and_cli_tokens_use_the_configured_claims_issuer_and_audience() {
    let up = Recorder::start();
    let jwt = format!(
        "{{ algorithms: [HS256], secret: \"{SECRET}\", issuer: \"https://id.example\", audience: \"gateway\", claims: {{ key: sub, routes: scopes, rate_limit: rl }} }}"
    );
    let t = Tollgate::start(&config(&up.addr(), "", &jwt, ""));
    let r = admin_call(
        &t,
        "admin-token",
        "POST",
        "/admin/tokens",
        r#"{"api_key": "minted", "allowed_routes": ["/api/*"]}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let tok = r.json()["token"].as_str().unwrap().to_string();
    let call = |tok: &str| {
        raw(&t, &format!("GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {tok}\r\nConnection: close\r\n\r\n"))
    };
    let r = call(&tok);
    assert_eq!(
        r.status,
        200,
        "the proxy refused its own admin token: {}",
        r.text()
    );

    let (code, out, err) = run_cli(
        &[
            "token",
            "issue",
            "-c",
            t.config_path.to_str().unwrap(),
            "--api-key",
            "cli",
            "--routes",
            "/api/*",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let tok = out.lines().next().unwrap();
    assert_eq!(call(tok).status, 200);
    // Explicit flags work without a config.
    let (code, out, err) = run_cli(
        &[
            "token",
            "issue",
            "--secret",
            SECRET,
            "--issuer",
            "https://id.example",
            "--audience",
            "gateway",
            "--api-key",
            "flags",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    // ... but its claim names are the defaults, which this proxy does not read.
    call(out.lines().next().unwrap()).assert_refusal(401, "invalid_token");
    assert_eq!(up.hits(), 2);
}

#[test]
fn a_reported_cost_cannot_wrap_the_counter() {
    let echo = Echo::start();
    let t = Tollgate::start(&config(
        &echo.addr(),
        "",
        &format!("{{ algorithms: [HS256], secret: \"{SECRET}\" }} }}\nlimits: {{ default: [{{ requests: 10, window: 1m }}]"),
        "",
    ));
    avoid_window_edge(60, Duration::from_secs(5));
    let tok = good_token("costly");
    let call = |path: &str| {
        raw(&t, &format!("GET {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {tok}\r\nConnection: close\r\n\r\n"))
    };
    assert_eq!(call("/api/x?cost=18446744073709551615").status, 200);
    // The charge filled the window (capped at its limit): no wraparound.
    for _ in 0..3 {
        call("/api/x").assert_refusal(429, "rate_limited");
    }
}

fn jwk_of(file: &str, kid: &str, alg: &str) -> serde_json::Value {
    jwk(&format!("{KEYS}/{file}"), kid, alg)
}

#[test]
fn a_jwks_may_mix_key_types_and_each_key_verifies_only_its_own() {
    let up = Recorder::start();
    let set = json!({"keys": [
        jwk_of("rsa_public.pem", "rsa", "RS256"),
        jwk_of("ec_public.pem", "ec", "-"),
        jwk_of("ed_public.pem", "ed", "EdDSA"),
    ]});
    let idp = JsonServer::start(&set.to_string());
    let jwt = format!(
        "{{ algorithms: [RS256, ES256, EdDSA], jwks_url: \"http://127.0.0.1:{}/jwks\" }}",
        idp.port
    );
    let t = Tollgate::start(&config(&up.addr(), "", &jwt, ""));
    let sign = |alg: &str, file: &str, kid: &str| {
        pyjwt(
            json!({"alg": alg, "key_file": format!("{KEYS}/{file}"), "headers": {"kid": kid},
            "claims": {"api_key": "k", "exp": unix_now() + 600, "allowed_routes": ["/*"]}}),
        )
    };
    let call = |tok: &str| {
        raw(&t, &format!("GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {tok}\r\nConnection: close\r\n\r\n"))
    };
    assert_eq!(call(&sign("RS256", "rsa_private.pem", "rsa")).status, 200);
    assert_eq!(call(&sign("ES256", "ec_private.pem", "ec")).status, 200);
    assert_eq!(call(&sign("EdDSA", "ed_private.pem", "ed")).status, 200);
    assert_eq!(up.hits(), 3);
    // A token whose algorithm does not fit the key its kid names.
    call(&sign("ES256", "ec_private.pem", "rsa")).assert_refusal(401, "invalid_token");
    call(&sign("PS256", "rsa_private.pem", "rsa")).assert_refusal(401, "invalid_token");
    assert_eq!(up.hits(), 3);

    // A static PEM key is still one family.
    let mixed =
        format!("{{ algorithms: [RS256, ES256], public_key_file: \"{KEYS}/rsa_public.pem\" }}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        render(&config(&up.addr(), "", &mixed, ""), 1, 2, dir.path()),
    )
    .unwrap();
    let (code, _, err) = run_cli(&["check", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("auth.jwt.algorithms: a public_key_file is one key type"),
        "{err}"
    );
}

#[test]
fn challenges_follow_rfc_6750_and_admin_takes_any_case_of_bearer() {
    let up = Recorder::start();
    let t = Tollgate::start(&config(&up.addr(), "", &hs(), ""));
    let r = raw(
        &t,
        "GET /api/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    r.assert_refusal(401, "missing_token");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"tollgate\"")
    );
    let r = raw(&t, "GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer not.a.token\r\nConnection: close\r\n\r\n");
    r.assert_refusal(401, "invalid_token");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"tollgate\", error=\"invalid_token\"")
    );
    assert_eq!(up.hits(), 0);
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let r = request(
            t.admin_port,
            &format!("GET /admin/stats/unique HTTP/1.1\r\nHost: a\r\nAuthorization: {scheme} admin-token\r\nConnection: close\r\n\r\n"),
        )
        .unwrap();
        // No Redis here: authorised, then told Redis is needed.
        assert_eq!(r.status, 409, "{scheme}: {}", r.text());
    }
}

#[test]
fn the_upstream_gets_exactly_what_was_verified() {
    let up = Recorder::start();
    let t = Tollgate::start(&config(&up.addr(), "", &hs(), ""));
    let tok = good_token("real-key");
    let r = raw(&t, &format!(
        "GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {tok}\r\nAuthorization: Bearer forged\r\nX_Api_Key: forged\r\nX-Api_Key: forged\r\nX-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Host: evil.example\r\nConnection: close\r\n\r\n"
    ));
    assert_eq!(r.status, 200, "{}", r.text());
    let head = up.last_head().to_ascii_lowercase();
    let auth: Vec<&str> = head
        .lines()
        .filter(|l| l.starts_with("authorization:"))
        .collect();
    assert_eq!(
        auth,
        [format!(
            "authorization: bearer {}",
            tok.to_ascii_lowercase()
        )],
        "{head}"
    );
    assert!(head.contains("x-api-key: real-key"), "{head}");
    assert!(!head.contains("forged"), "{head}");
    assert!(head.contains("x-forwarded-for: 127.0.0.1\r\n"), "{head}");
    for gone in ["forwarded:", "x-real-ip:", "x-forwarded-host:", "6.6.6.6"] {
        assert!(!head.contains(gone), "{gone} reached the upstream:\n{head}");
    }
}

#[test]
fn upgrades_are_refused_where_a_route_does_not_allow_them() {
    let up = Recorder::start();
    let t = Tollgate::start(&config(&up.addr(), "", &hs(), ""));
    for upgrade in ["websocket", "h2c", "anything"] {
        let r = raw(&t, &format!("GET /public/x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"));
        r.assert_refusal(400, "bad_request");
    }
    assert_eq!(up.hits(), 0);
}
