//! Property tests: path normalisation and token parsing on arbitrary input.

use proptest::prelude::*;
use tollgate::auth::Verifier;
use tollgate::config::from_str_with_env;
use tollgate::path::normalize;

/// `PROPTEST_CASES` raises the count for a long run (see the README).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn verifier() -> Verifier {
    let config = from_str_with_env(
        r#"
auth: { jwt: { algorithms: [HS256], secret: "prop-secret" } }
upstreams: { b: { peers: ["127.0.0.1:1"] } }
routes: [{ name: a, path_prefix: /, upstream: b, forward_claims: { team: X-Team } }]
"#,
        Vec::new(),
    )
    .unwrap();
    Verifier::new(config.auth.jwt.as_ref().unwrap(), vec!["team".into()], None).unwrap()
}

fn path_strategy() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        Just("".to_string()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just("%2e".to_string()),
        Just("%2E%2e".to_string()),
        Just("%2f".to_string()),
        Just("%".to_string()),
        "[a-zA-Z0-9_~.-]{1,6}",
        "%[0-9a-fA-F]{2}",
        "[ -~]{1,4}",
    ];
    prop::collection::vec(segment, 0..12).prop_map(|s| format!("/{}", s.join("/")))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(20_000), ..ProptestConfig::default() })]

    #[test]
    fn normalised_paths_are_clean_and_stable(raw in path_strategy()) {
        if let Ok(p) = normalize(&raw) {
            prop_assert!(p.starts_with('/'));
            prop_assert!(!p.contains("//"), "{p}");
            for segment in p.split('/') {
                prop_assert!(segment != "." && segment != "..", "{raw} -> {p}");
            }
            prop_assert!(!p.to_ascii_lowercase().contains("%2e"), "{raw} -> {p}");
            prop_assert_eq!(normalize(&p), Ok(p.clone()));
        }
    }

    #[test]
    fn normalise_never_panics(raw in "\\PC{0,64}") {
        let _ = normalize(&raw);
    }

    #[test]
    fn arbitrary_tokens_are_refused_without_panicking(raw in "\\PC{0,300}") {
        prop_assert!(verifier().verify(&raw).is_err());
    }

    #[test]
    fn token_shaped_garbage_is_refused(
        head in "[A-Za-z0-9_-]{0,60}",
        body in "[A-Za-z0-9_-]{0,120}",
        sig in "[A-Za-z0-9_-]{0,60}",
    ) {
        let v = verifier();
        let token = format!("{head}.{body}.{sig}");
        prop_assert!(v.verify(&token).is_err());
    }
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        "\\PC{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(3_000), ..ProptestConfig::default() })]

    /// Correctly signed tokens with claims of any shape: never a panic, and
    /// accepted only when every claim tollgate reads has the right type.
    #[test]
    fn signed_tokens_with_any_claims(
        key in json_value(),
        routes in json_value(),
        rate in json_value(),
        team in json_value(),
    ) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let claims = serde_json::json!({
            "exp": now + 600, "api_key": key, "allowed_routes": routes, "rate_limit": rate, "team": team,
        });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"prop-secret"),
        ).unwrap();
        let result = verifier().verify(&token);
        let well_typed = claims["api_key"].as_str().is_some_and(|s| !s.is_empty() && s.len() <= 256)
            && (claims["allowed_routes"].is_null() || claims["allowed_routes"].is_array())
            && (claims["rate_limit"].is_null() || claims["rate_limit"].is_u64());
        if !well_typed {
            prop_assert!(result.is_err(), "{claims}");
        }
        if let Ok(id) = result {
            if let Some(v) = id.forwarded("team") {
                prop_assert!(v.bytes().all(|b| (0x20..0x7f).contains(&b)), "{v:?}");
            }
        }
    }
}
