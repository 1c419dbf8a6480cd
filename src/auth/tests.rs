use super::*;
use crate::config::ClaimNames;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;
use std::time::Duration;

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys");

fn key_file(name: &str) -> Vec<u8> {
    std::fs::read(format!("{KEYS}/{name}")).unwrap()
}

fn key_path(name: &str) -> std::path::PathBuf {
    format!("{KEYS}/{name}").into()
}

/// A verifier whose key is loaded as the live state would load it.
fn build(settings: &JwtSettings, forwarded: Vec<String>) -> Result<Verifier, ConfigProblem> {
    Verifier::new(settings, KeyMaterial::load(&settings.key)?, forwarded, None)
}

fn settings(algorithms: &[&str], key: KeySource) -> JwtSettings {
    JwtSettings {
        algorithms: algorithms.iter().map(|s| s.parse().unwrap()).collect(),
        key,
        jwks_refresh: Duration::from_secs(300),
        issuer: None,
        audience: None,
        leeway: Duration::from_secs(5),
        claims: ClaimNames {
            key: "api_key".into(),
            rate_limit: "rate_limit".into(),
            routes: "allowed_routes".into(),
            tier: "tier".into(),
            org: "org_id".into(),
        },
        require_stored: false,
        cache_size: 100,
        store_cache: Duration::from_secs(30),
    }
}

fn hs() -> Verifier {
    build(
        &settings(&["HS256"], KeySource::Secret(b"secret".to_vec())),
        vec!["api_key".into(), "team".into()],
    )
    .unwrap()
}

fn claims() -> serde_json::Value {
    json!({"api_key": "k1", "exp": now_secs() + 3600, "allowed_routes": ["/api/*"], "tier": "free", "org_id": "o1", "rate_limit": 7})
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &serde_json::Value) -> String {
    encode(&Header::new(alg), claims, key).unwrap()
}

fn hs_token(claims: &serde_json::Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"secret"),
        claims,
    )
}

fn code(r: Result<Arc<Identity>, Refusal>) -> &'static str {
    r.map(|_| "ok").unwrap_or_else(|e| e.code())
}

#[test]
fn a_good_token_yields_its_claims() {
    let id = hs().verify(&hs_token(&claims())).unwrap();
    assert_eq!(id.key, "k1");
    assert_eq!(id.rate_limit, Some(7));
    assert_eq!(id.tier.as_deref(), Some("free"));
    assert_eq!(id.org.as_deref(), Some("o1"));
    assert!(id.routes.allows("/api/x"));
    assert!(!id.routes.allows("/admin"));
    assert_eq!(id.forwarded("api_key"), Some("k1"));
}

#[test]
fn expiry_and_validity_window() {
    let v = hs();
    let mut c = claims();
    c["exp"] = json!(now_secs() - 60);
    assert_eq!(code(v.verify(&hs_token(&c))), "token_expired");
    c["exp"] = json!(now_secs() - 2); // within leeway
    assert_eq!(code(v.verify(&hs_token(&c))), "ok");
    let mut c = claims();
    c["nbf"] = json!(now_secs() + 600);
    assert_eq!(code(v.verify(&hs_token(&c))), "invalid_token");
    let mut c = claims();
    c["iat"] = json!(now_secs() + 600);
    assert_eq!(code(v.verify(&hs_token(&c))), "invalid_token");
    let mut c = claims();
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(code(v.verify(&hs_token(&c))), "invalid_token");
}

#[test]
fn wrong_claim_types_are_invalid() {
    let v = hs();
    for (claim, value) in [
        ("exp", json!("9999999999")),
        ("allowed_routes", json!("/api/*")),
        ("allowed_routes", json!([1, 2])),
        ("rate_limit", json!("10")),
        ("rate_limit", json!(-1)),
        ("api_key", json!(5)),
        ("tier", json!(["free"])),
        ("team", json!({"a": 1})),
        ("api_key", json!("line\r\nX-Injected: 1")),
    ] {
        let mut c = claims();
        c[claim] = value.clone();
        assert_eq!(
            code(v.verify(&hs_token(&c))),
            "invalid_token",
            "{claim} = {value}"
        );
    }
}

#[test]
fn signatures_and_algorithms_are_enforced() {
    let v = hs();
    let good = hs_token(&claims());
    let other_key = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"other"),
        &claims(),
    );
    assert_eq!(code(v.verify(&other_key)), "invalid_token");
    let hs512 = sign(
        Algorithm::HS512,
        &EncodingKey::from_secret(b"secret"),
        &claims(),
    );
    assert_eq!(
        code(v.verify(&hs512)),
        "invalid_token",
        "HS512 is not in the list"
    );
    let (head, rest) = good.split_once('.').unwrap();
    let (_, sig) = rest.split_once('.').unwrap();
    let none_header = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        br#"{"alg":"none","typ":"JWT"}"#,
    );
    let mut tampered = claims();
    tampered["allowed_routes"] = json!(["/*"]);
    let payload = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        tampered.to_string(),
    );
    for bad in [
        format!("{none_header}.{payload}."),
        format!("{head}.{payload}.{sig}"), // payload swapped under the old signature
        format!("{head}.{payload}"),
        format!("{head}.{payload}."),
        "garbage".to_string(),
        "a.b.c".to_string(),
        format!("{head}.!!!.{sig}"),
        "x".repeat(MAX_TOKEN_LEN + 1),
    ] {
        assert_eq!(code(v.verify(&bad)), "invalid_token", "{bad:.60}");
    }
}

#[test]
fn public_key_algorithms_are_pinned() {
    let rsa_priv = EncodingKey::from_rsa_pem(&key_file("rsa_private.pem")).unwrap();
    let rs = build(
        &settings(
            &["RS256", "PS256"],
            KeySource::PublicKeyFile(key_path("rsa_public.pem")),
        ),
        vec![],
    )
    .unwrap();
    assert_eq!(
        code(rs.verify(&sign(Algorithm::RS256, &rsa_priv, &claims()))),
        "ok"
    );
    assert_eq!(
        code(rs.verify(&sign(Algorithm::PS256, &rsa_priv, &claims()))),
        "ok"
    );
    assert_eq!(
        code(rs.verify(&sign(Algorithm::RS512, &rsa_priv, &claims()))),
        "invalid_token"
    );
    // The classic confusion: HS256 keyed with the RSA public key's bytes.
    let forged = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&key_file("rsa_public.pem")),
        &claims(),
    );
    assert_eq!(code(rs.verify(&forged)), "invalid_token");

    let ec = build(
        &settings(
            &["ES256"],
            KeySource::PublicKeyFile(key_path("ec_public.pem")),
        ),
        vec![],
    )
    .unwrap();
    let ec_priv = EncodingKey::from_ec_pem(&key_file("ec_private.pem")).unwrap();
    assert_eq!(
        code(ec.verify(&sign(Algorithm::ES256, &ec_priv, &claims()))),
        "ok"
    );

    let ed = build(
        &settings(
            &["EdDSA"],
            KeySource::PublicKeyFile(key_path("ed_public.pem")),
        ),
        vec![],
    )
    .unwrap();
    let ed_priv = EncodingKey::from_ed_pem(&key_file("ed_private.pem")).unwrap();
    assert_eq!(
        code(ed.verify(&sign(Algorithm::EdDSA, &ed_priv, &claims()))),
        "ok"
    );
    assert_eq!(
        code(ed.verify(&sign(Algorithm::ES256, &ec_priv, &claims()))),
        "invalid_token"
    );
}

#[test]
fn key_files_of_the_wrong_kind_are_config_errors() {
    let e = build(
        &settings(
            &["RS256"],
            KeySource::PublicKeyFile(key_path("ec_public.pem")),
        ),
        vec![],
    );
    assert!(e.is_err());
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a pem").unwrap();
    let e = build(
        &settings(&["ES256"], KeySource::PublicKeyFile(junk)),
        vec![],
    );
    assert!(e
        .err()
        .unwrap()
        .to_string()
        .starts_with("auth.jwt.public_key_file: not a"));
    let e = build(
        &settings(
            &["ES256"],
            KeySource::PublicKeyFile("/nonexistent.pem".into()),
        ),
        vec![],
    );
    assert!(e
        .err()
        .unwrap()
        .to_string()
        .starts_with("auth.jwt.public_key_file: cannot read /nonexistent.pem"));
}

#[test]
fn issuer_and_audience_when_configured() {
    let mut s = settings(&["HS256"], KeySource::Secret(b"secret".to_vec()));
    s.issuer = Some("https://issuer".into());
    s.audience = Some("tollgate".into());
    let v = build(&s, vec![]).unwrap();
    let mut c = claims();
    assert_eq!(code(v.verify(&hs_token(&c))), "invalid_token");
    c["iss"] = json!("https://issuer");
    c["aud"] = json!("tollgate");
    assert_eq!(code(v.verify(&hs_token(&c))), "ok");
    c["aud"] = json!("someone-else");
    assert_eq!(code(v.verify(&hs_token(&c))), "invalid_token");
}

#[test]
fn repeated_tokens_come_from_the_cache() {
    let v = hs();
    let t = hs_token(&claims());
    let a = v.verify(&t).unwrap();
    let b = v.verify(&t).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(v.cached_tokens(), 1);
    // A bad token is never cached as good.
    let _ = v.verify("a.b.c");
    assert_eq!(v.cached_tokens(), 1);
}

#[test]
fn bearer_header_parsing() {
    assert_eq!(bearer_token(Some(b"Bearer abc")), Some("abc"));
    assert_eq!(bearer_token(Some(b"bearer   abc ")), Some("abc"));
    assert_eq!(bearer_token(Some(b"Basic abc")), None);
    assert_eq!(bearer_token(Some(b"Bearer ")), None);
    assert_eq!(bearer_token(Some(b"Bearer")), None);
    assert_eq!(bearer_token(None), None);
}
