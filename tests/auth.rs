//! Authentication and route permissions through the real binary, with tokens
//! minted by PyJWT (an independent implementation) and by hand for attacks.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use serde_json::json;

const SECRET: &str = "integration-secret-0123456789abcdef";
const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys");

fn config(upstream: &str, jwt: &str) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 1, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock" }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
log: {{ level: info, color: false }}
auth:
  jwt: {jwt}
upstreams:
  backend: {{ peers: ["{upstream}"] }}
routes:
  - name: api
    path_prefix: /api/
    upstream: backend
    forward_claims: {{ api_key: X-Api-Key, team: X-Team }}
  - {{ name: public, path_prefix: /public/, upstream: backend, auth: none }}
"#
    )
}

fn hs_config(upstream: &str) -> String {
    config(
        upstream,
        &format!("{{ algorithms: [HS256], secret: \"{SECRET}\" }}"),
    )
}

fn claims() -> serde_json::Value {
    json!({"api_key": "key-1", "exp": unix_now() + 3600, "allowed_routes": ["/api/*"], "team": "blue"})
}

fn hs256(claims: serde_json::Value) -> String {
    pyjwt(json!({"alg": "HS256", "key": SECRET, "claims": claims}))
}

fn bearer(port: u16, path: &str, token: &str) -> Response {
    request(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"),
    )
    .expect("request")
}

#[test]
fn pyjwt_tokens_pass_and_claims_are_forwarded() {
    let up = Recorder::start();
    let t = Tollgate::start(&hs_config(&up.addr()));
    let token = hs256(claims());
    let r = request(
        t.port,
        &format!("GET /api/things HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nX-Api-Key: forged\r\nX-Team: red\r\nConnection: close\r\n\r\n"),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let head = up.last_head().to_ascii_lowercase();
    assert!(head.contains("x-api-key: key-1\r\n"), "{head}");
    assert!(head.contains("x-team: blue\r\n"), "{head}");
    assert!(
        !head.contains("forged") && !head.contains("x-team: red"),
        "client copies leaked: {head}"
    );

    // A claim the token lacks: the client's copy is still removed.
    let mut c = claims();
    c.as_object_mut().unwrap().remove("team");
    let r = request(
        t.port,
        &format!("GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\nX-Team: red\r\nConnection: close\r\n\r\n", hs256(c)),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert!(
        !up.last_head().to_ascii_lowercase().contains("x-team"),
        "{}",
        up.last_head()
    );

    // Routes with auth: none need no token.
    assert_eq!(t.get("/public/x").status, 200);
}

#[test]
fn missing_expired_and_forbidden_have_the_spec_codes() {
    let up = Recorder::start();
    let t = Tollgate::start(&hs_config(&up.addr()));
    let r = t.get("/api/x");
    r.assert_refusal(401, "missing_token");
    // No token sent: a challenge without an error code (RFC 6750 §3.1).
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"tollgate\"")
    );
    let r = request(
        t.port,
        "GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Basic dTpw\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    r.assert_refusal(401, "missing_token");

    let mut c = claims();
    c["exp"] = json!(unix_now() - 3600);
    let r = bearer(t.port, "/api/x", &hs256(c));
    r.assert_refusal(401, "token_expired");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"tollgate\", error=\"invalid_token\"")
    );

    let mut c = claims();
    c["allowed_routes"] = json!(["/api/reports/*"]);
    bearer(t.port, "/api/admin", &hs256(c)).assert_refusal(403, "route_forbidden");
    assert_eq!(up.hits(), 0);
    t.wait_metric(
        r#"tollgate_auth_failures_total{reason="missing_token"}"#,
        2.0,
    );
    t.wait_metric(
        r#"tollgate_auth_failures_total{reason="token_expired"}"#,
        1.0,
    );
    t.wait_metric(
        r#"tollgate_auth_failures_total{reason="route_forbidden"}"#,
        1.0,
    );
}

#[test]
fn attacks_are_refused_and_never_reach_the_upstream() {
    let up = Recorder::start();
    let t = Tollgate::start(&hs_config(&up.addr()));
    let good = hs256(claims());
    let (head, rest) = good.split_once('.').unwrap();
    let (payload, sig) = rest.split_once('.').unwrap();
    let mut admin = claims();
    admin["allowed_routes"] = json!(["/*"]);
    let tampered_payload = hs256(admin).split('.').nth(1).unwrap().to_string();

    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = claims();
        f(&mut c);
        hs256(c)
    };
    let cases: Vec<(&str, String)> = vec![
        (
            "alg none",
            pyjwt(json!({"alg": "none", "claims": claims()})),
        ),
        (
            "disallowed alg HS512",
            pyjwt(json!({"alg": "HS512", "key": SECRET, "claims": claims()})),
        ),
        (
            "RS256 token to an HS256 proxy",
            pyjwt(
                json!({"alg": "RS256", "key_file": format!("{KEYS}/rsa_private.pem"), "claims": claims()}),
            ),
        ),
        (
            "tampered payload",
            format!("{head}.{tampered_payload}.{sig}"),
        ),
        ("empty signature", format!("{head}.{payload}.")),
        ("absent signature", format!("{head}.{payload}")),
        ("garbage", "not-a-token".into()),
        ("two parts", format!("{head}.{payload}")),
        ("bad base64", format!("{head}.%%%%.{sig}")),
        (
            "nbf in the future",
            with(&|c| c["nbf"] = json!(unix_now() + 3600)),
        ),
        (
            "exp as a string",
            with(&|c| c["exp"] = json!((unix_now() + 3600).to_string())),
        ),
        (
            "allowed_routes as a string",
            with(&|c| c["allowed_routes"] = json!("/api/*")),
        ),
        (
            "missing exp",
            with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
        ),
        (
            "CRLF in a forwarded claim",
            with(&|c| c["team"] = json!("blue\r\nX-Admin: yes")),
        ),
        (
            "control char in a forwarded claim",
            with(&|c| c["team"] = json!("blue\u{1}")),
        ),
        (
            "wrong secret",
            pyjwt(json!({"alg": "HS256", "key": "other-secret", "claims": claims()})),
        ),
    ];
    for (what, token) in &cases {
        let r = bearer(t.port, "/api/x", token);
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        r.assert_refusal(401, "invalid_token");
    }
    // A 64 kB Authorization header: refused, never forwarded.
    let huge = "a".repeat(64 * 1024);
    let r = request(
        t.port,
        &format!("GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {huge}\r\nConnection: close\r\n\r\n"),
    );
    if let Ok(r) = r {
        assert!(
            matches!(r.status, 400 | 401 | 413 | 431),
            "64 kB header got {}",
            r.status
        );
    }
    assert_eq!(up.hits(), 0, "an attack reached the upstream");
    // Still serving.
    assert_eq!(bearer(t.port, "/api/x", &good).status, 200);
    assert_eq!(up.hits(), 1);
}

#[test]
fn route_permissions_cannot_be_bypassed() {
    let up = Recorder::start();
    let t = Tollgate::start(&hs_config(&up.addr()));
    let mut c = claims();
    c["allowed_routes"] = json!(["/api/public/*", "/api/me"]);
    let token = hs256(c);
    for allowed in ["/api/public/x", "/api/public", "/api/me"] {
        assert_eq!(bearer(t.port, allowed, &token).status, 200, "{allowed}");
    }
    let hits = up.hits();
    // Dot forms are 400 bad_path under the default `path_policy: strict`
    // (tests/paths.rs runs these under both policies).
    for (trick, status) in [
        ("/api/public/a/../b", 400),
        ("/api/./me", 400),
        ("/api/admin", 403),
        ("/api/public/../admin", 400),
        ("/api/public/%2e%2e/admin", 400),
        ("/api/public/.%2E/admin", 400),
        ("/api//admin", 403),
        ("/api/public%2f..%2fadmin", 400),
        ("/api/me/", 403),
        ("/api/me/x", 403),
        ("/api/mex", 403),
        ("/api/Public/x", 403),
        ("/API/public/x", 404),
        ("/api/public/../../admin", 400),
        ("/api/public/../../../admin", 400),
    ] {
        let r = bearer(t.port, trick, &token);
        assert_eq!(r.status, status, "{trick}: {}", r.text());
    }
    assert_eq!(up.hits(), hits, "a trick reached the upstream");
}

#[test]
fn public_key_proxies_pin_their_algorithm() {
    let up = Recorder::start();
    let rs = config(
        &up.addr(),
        &format!("{{ algorithms: [RS256], public_key_file: \"{KEYS}/rsa_public.pem\" }}"),
    );
    let t = Tollgate::start(&rs);
    let good = pyjwt(
        json!({"alg": "RS256", "key_file": format!("{KEYS}/rsa_private.pem"), "claims": claims()}),
    );
    assert_eq!(bearer(t.port, "/api/x", &good).status, 200);
    let forged = pyjwt(
        json!({"hmac_with_key_file": true, "key_file": format!("{KEYS}/rsa_public.pem"), "claims": claims()}),
    );
    bearer(t.port, "/api/x", &forged).assert_refusal(401, "invalid_token");
    let ps = pyjwt(
        json!({"alg": "PS256", "key_file": format!("{KEYS}/rsa_private.pem"), "claims": claims()}),
    );
    bearer(t.port, "/api/x", &ps).assert_refusal(401, "invalid_token");
    assert_eq!(up.hits(), 1);

    let es = config(
        &up.addr(),
        &format!("{{ algorithms: [ES256], public_key_file: \"{KEYS}/ec_public.pem\" }}"),
    );
    let t = Tollgate::start(&es);
    let good = pyjwt(
        json!({"alg": "ES256", "key_file": format!("{KEYS}/ec_private.pem"), "claims": claims()}),
    );
    assert_eq!(bearer(t.port, "/api/x", &good).status, 200);

    let ed = config(
        &up.addr(),
        &format!("{{ algorithms: [EdDSA], public_key_file: \"{KEYS}/ed_public.pem\" }}"),
    );
    let t = Tollgate::start(&ed);
    let good = pyjwt(
        json!({"alg": "EdDSA", "key_file": format!("{KEYS}/ed_private.pem"), "claims": claims()}),
    );
    assert_eq!(bearer(t.port, "/api/x", &good).status, 200);
}

#[test]
fn token_issue_mints_what_the_proxy_and_pyjwt_accept() {
    let up = Recorder::start();
    let t = Tollgate::start(&hs_config(&up.addr()));
    let (code, out, err) = run_cli(
        &[
            "token",
            "issue",
            "--secret",
            SECRET,
            "--api-key",
            "cli-key",
            "--limit",
            "5",
            "--routes",
            "/api/*,/status",
            "--ttl",
            "1h",
            "--tier",
            "free",
            "--org",
            "acme",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let token = out.lines().next().unwrap().to_string();
    assert!(out.contains("api_key:    cli-key"), "{out}");
    assert!(out.contains("expires_at:"), "{out}");
    assert!(
        out.contains(&format!("curl -H 'Authorization: Bearer {token}'")),
        "{out}"
    );
    assert_eq!(bearer(t.port, "/api/x", &token).status, 200);
    assert!(
        up.last_head().contains("X-Api-Key: cli-key")
            || up
                .last_head()
                .to_ascii_lowercase()
                .contains("x-api-key: cli-key")
    );

    // Independent decode with PyJWT.
    let script = format!(
        "import jwt,json,sys; print(json.dumps(jwt.decode(sys.argv[1], {SECRET:?}, algorithms=['HS256'])))"
    );
    let out = std::process::Command::new(python3())
        .args(["-c", &script, &token])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(claims["api_key"], "cli-key");
    assert_eq!(claims["rate_limit"], 5);
    assert_eq!(claims["tier"], "free");
    assert_eq!(claims["org_id"], "acme");
    assert_eq!(claims["allowed_routes"], json!(["/api/*", "/status"]));
    let ttl = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert_eq!(ttl, 3600);

    // Without --api-key a random url-safe one is generated.
    let (_, out, _) = run_cli(&["token", "issue", "--secret", SECRET], &[]);
    let key = out
        .lines()
        .find_map(|l| l.strip_prefix("api_key:    "))
        .unwrap();
    assert_eq!(key.len(), 24);
    assert!(
        key.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{key}"
    );

    let (code, _, err) = run_cli(
        &["token", "issue", "--secret", SECRET, "--ttl", "soon"],
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("--ttl"), "{err}");
}

#[test]
fn token_issue_stores_in_redis_with_the_same_ttl() {
    let redis = Redis::start();
    let (code, out, err) = run_cli(
        &[
            "token",
            "issue",
            "--secret",
            SECRET,
            "--api-key",
            "stored-1",
            "--ttl",
            "2h",
            "--redis",
            &redis.url(),
            "--prefix",
            "tg:",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("stored as:  tg:token:stored-1"), "{out}");
    let cli = |args: &[&str]| redis.cli(args);
    let ttl: u64 = cli(&["TTL", "tg:token:stored-1"]).parse().unwrap();
    assert!((7190..=7200).contains(&ttl), "ttl {ttl}");
    let record: serde_json::Value =
        serde_json::from_str(&cli(&["GET", "tg:token:stored-1"])).unwrap();
    assert_eq!(record["token"], out.lines().next().unwrap());
    assert_eq!(record["claims"]["api_key"], "stored-1");
}
