//! The functions every request runs: token check (cold and cached), route
//! match, path normalisation, and the limiter's in-process decision.
//! `cargo bench --bench hot_paths`; results are in the README.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark or example, not the proxy

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::time::Duration;
use tollgate::auth::Verifier;
use tollgate::config::{from_str_with_env, Algorithm, Window};
use tollgate::ratelimit::local::LocalStore;
use tollgate::routes::RouteTable;

const CONFIG: &str = r#"
auth: { jwt: { algorithms: [HS256], secret: "bench-secret-0123456789abcdef" } }
upstreams: { b: { peers: ["127.0.0.1:1"] } }
routes:
  - { name: root, path_prefix: /, upstream: b, auth: none }
  - { name: users, path_prefix: /api/v1/users/, upstream: b }
  - { name: orders, path_prefix: /api/v1/orders/, upstream: b }
  - { name: v2, path_prefix: /api/v2/, upstream: b }
  - { name: login, path: /api/login, methods: [POST], upstream: b }
  - { name: health, path: /status, upstream: b, auth: none }
  - { name: admin, path_prefix: /admin/, host: admin.example.com, upstream: b }
  - { name: api, path_prefix: /api/, upstream: b, forward_claims: { api_key: X-Api-Key } }
"#;

fn token() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "api_key": "bench-key", "exp": now + 3600, "iat": now,
        "allowed_routes": ["/api/v1/*", "/api/v2/*"], "tier": "free", "org_id": "acme"
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"bench-secret-0123456789abcdef"),
    )
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let config = from_str_with_env(CONFIG, Vec::new()).unwrap();
    let jwt = config.auth.jwt.clone().unwrap();
    let token = token();

    let mut cold = jwt.clone();
    cold.cache_size = 0;
    let material = tollgate::auth::KeyMaterial::load(&jwt.key).unwrap();
    let uncached = Verifier::new(&cold, material.clone(), vec!["api_key".into()], None).unwrap();
    c.bench_function("token check, cold (HS256 verify + claims)", |b| {
        b.iter(|| uncached.verify(black_box(&token)).unwrap())
    });
    let cached = Verifier::new(&jwt, material, vec!["api_key".into()], None).unwrap();
    cached.verify(&token).unwrap();
    c.bench_function("token check, cached", |b| {
        b.iter(|| cached.verify(black_box(&token)).unwrap())
    });

    let routes = RouteTable::new(&config.routes);
    let get = http::Method::GET;
    c.bench_function("route match (8 routes)", |b| {
        b.iter(|| {
            routes.find(
                black_box(Some("api.example.com")),
                &get,
                black_box("/api/v2/things/42"),
            )
        })
    });

    c.bench_function("path normalisation, clean path", |b| {
        b.iter(|| tollgate::path::normalize(black_box("/api/v1/users/42/orders")).unwrap())
    });
    c.bench_function("path normalisation, dirty path", |b| {
        b.iter(|| tollgate::path::normalize(black_box("/api//v1/./users/%34%32/../42")).unwrap())
    });

    let store = LocalStore::default();
    let windows = [
        Window::every(1_000_000_000, Duration::from_secs(5)),
        Window::every(1_000_000_000, Duration::from_secs(60)),
    ];
    c.bench_function("limiter decision, in process (2 windows)", |b| {
        b.iter(|| {
            store.acquire(
                Algorithm::FixedWindow,
                black_box("k:bench-key"),
                &windows,
                1,
                tollgate::ratelimit::now_us(),
            )
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
