//! Property tests: path normalisation and token parsing on arbitrary input.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

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
    let jwt = config.auth.jwt.as_ref().unwrap();
    let material = tollgate::auth::KeyMaterial::load(&jwt.key).unwrap();
    Verifier::new(jwt, material, vec!["team".into()], None).unwrap()
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

/// Where a head ends, by the definition: past the empty lines before the
/// request line (which the parser skips), just past the first line feed
/// that closes a line holding nothing but carriage returns, when a line
/// feed came before it.
fn reference_head_end(bytes: &[u8]) -> Option<usize> {
    let start = bytes.iter().position(|b| !matches!(b, b'\r' | b'\n'))?;
    let feeds: Vec<usize> = bytes
        .iter()
        .enumerate()
        .skip(start)
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i)
        .collect();
    feeds
        .windows(2)
        .find(|w| bytes[w[0] + 1..w[1]].iter().all(|b| *b == b'\r'))
        .map(|w| w[1] + 1)
}

fn head_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            Just(b'\r'),
            Just(b'\n'),
            Just(b'a'),
            Just(b':'),
            Just(b' '),
            any::<u8>()
        ],
        0..200,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(3_000), ..ProptestConfig::default() })]

    /// The head-end scanner finds what the definition says, however the
    /// bytes are split into reads.
    #[test]
    fn head_end_is_found_across_any_split(bytes in head_bytes(), cuts in proptest::collection::vec(0usize..200, 0..8)) {
        use tollgate::edge::scan::{HeadScan, Verdict, MAX_LEADING_BLANK};
        let blank = bytes.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
        let mut cuts: Vec<usize> = cuts.into_iter().filter(|c| *c <= bytes.len()).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut scan = HeadScan::new(1 << 20);
        let mut verdict = Verdict::More;
        let mut from = 0;
        for to in cuts.into_iter().chain(std::iter::once(bytes.len())) {
            if verdict == Verdict::More {
                verdict = match scan.feed(&bytes[from..to]) {
                    Verdict::End(i) => Verdict::End(from + i),
                    other => other,
                };
            }
            from = to;
        }
        if blank > MAX_LEADING_BLANK {
            prop_assert_eq!(verdict, Verdict::TooManyBlankLines);
        } else {
            let expected = reference_head_end(&bytes).map_or(Verdict::More, Verdict::End);
            prop_assert_eq!(verdict, expected);
        }
    }

    /// Host normalisation never panics, keeps to the input, and takes a
    /// name back from any port and one trailing dot.
    #[test]
    fn hosts_normalise_to_their_name(
        name in "[a-zA-Z0-9-]{1,20}(\\.[a-zA-Z0-9-]{1,10}){0,3}",
        dot in any::<bool>(),
        port in proptest::option::of(0u32..70000),
        junk in "\\PC{0,40}",
    ) {
        use tollgate::proxy::request::normalize_host;
        let mut host = name.clone();
        if dot { host.push('.'); }
        if let Some(p) = port { host.push_str(&format!(":{p}")); }
        prop_assert_eq!(normalize_host(&host), name.as_str());
        let out = normalize_host(&junk);
        prop_assert!(junk.contains(out));
    }

    /// Whatever a client puts in its target and Host, choosing the host
    /// never panics, and what it picks comes from one of them.
    #[test]
    fn request_host_never_panics(target in "\\PC{0,60}", host in proptest::option::of("\\PC{0,60}"), v11 in any::<bool>()) {
        let Ok(mut req) = pingora::http::RequestHeader::build("GET", target.as_bytes(), None) else {
            return Ok(());
        };
        if !v11 {
            req.set_version(http::Version::HTTP_10);
        }
        if let Some(h) = &host {
            if req.insert_header(http::header::HOST, h.as_str()).is_err() {
                return Ok(());
            }
        }
        if let Ok(Some(picked)) = tollgate::proxy::request::host(&req) {
            prop_assert!(target.contains(picked) || host.as_deref().is_some_and(|h| h.contains(picked)));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(2_000), ..ProptestConfig::default() })]

    /// Through the head guard, a head within the limit and its body arrive
    /// unchanged however the client splits its writes; a larger head never
    /// reaches the reader, and the client gets a 431.
    #[test]
    fn the_head_guard_passes_small_heads_and_refuses_big_ones(
        filler in 0usize..3000,
        body in proptest::collection::vec(any::<u8>(), 0..300),
        cuts in proptest::collection::vec(1usize..4000, 0..10),
        max in 1024usize..2048,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tollgate::edge::head::{HeadGuard, HeadLimits};
        let head = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Fill: {}\r\n\r\n", "f".repeat(filler));
        let mut wire = head.clone().into_bytes();
        wire.extend_from_slice(&body);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (got, answer) = runtime.block_on(async {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let limits = HeadLimits { max_bytes: max, timeout: std::time::Duration::from_secs(30), keepalive: std::time::Duration::from_secs(30) };
            let mut guard = HeadGuard::new(Box::new(server), limits, tokio::time::Instant::now());
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|c| *c < wire.len()).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let chunks: Vec<Vec<u8>> = {
                let mut out = Vec::new();
                let mut from = 0;
                for to in cuts.into_iter().chain(std::iter::once(wire.len())) {
                    out.push(wire[from..to].to_vec());
                    from = to;
                }
                out
            };
            let writer = tokio::spawn(async move {
                for c in chunks {
                    if client.write_all(&c).await.is_err() {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                let _ = client.shutdown().await;
                let mut answer = Vec::new();
                let _ = client.read_to_end(&mut answer).await;
                answer
            });
            let mut got = Vec::new();
            let result = guard.read_to_end(&mut got).await;
            drop(guard);
            let answer = writer.await.unwrap();
            (result.map(|_| got), answer)
        });
        if head.len() <= max {
            prop_assert_eq!(got.unwrap(), wire);
            prop_assert!(answer.is_empty());
        } else {
            prop_assert!(got.is_err());
            prop_assert!(answer.starts_with(b"HTTP/1.1 431 "), "{}", String::from_utf8_lossy(&answer));
        }
    }
}
