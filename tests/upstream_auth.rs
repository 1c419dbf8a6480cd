//! Upstream credentials: an OAuth2 client-credentials token fetched once for
//! the whole fleet (through Redis) and injected towards the upstream.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use std::time::Duration;

fn config(upstream: &str, token_port: u16, redis: Option<&str>, refresh: &str) -> String {
    config_url(
        upstream,
        &format!("http://127.0.0.1:{token_port}/oauth/token"),
        redis,
        refresh,
        "",
    )
}

/// `extra` goes inside `upstream_auth`, e.g. `ca_file: ...,`.
fn config_url(
    upstream: &str,
    token_url: &str,
    redis: Option<&str>,
    refresh: &str,
    extra: &str,
) -> String {
    let redis = redis
        .map(|url| format!("redis: {{ url: \"{url}\" }}\n"))
        .unwrap_or_default();
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 1, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock" }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
log: {{ level: info, color: false }}
{redis}upstreams: {{ backend: {{ peers: ["{upstream}"] }} }}
routes:
  - name: svc
    path_prefix: /svc/
    upstream: backend
    auth: none
    upstream_auth: {{ {extra} token_url: "{token_url}", client_id: "tollgate", client_secret: "s3cret&x", scope: "read write", refresh: {refresh} }}
"#
    )
}

fn call(t: &Tollgate) -> Response {
    request(t.port, "GET /svc/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer client-token\r\nConnection: close\r\n\r\n").unwrap()
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
fn two_instances_share_one_token_fetch() {
    let up = Recorder::start();
    let redis = Redis::start();
    let endpoint = JsonServer::start(
        r#"{"access_token": "up-tok-1", "token_type": "Bearer", "expires_in": 3600}"#,
    );
    let a = Tollgate::start(&config(&up.addr(), endpoint.port, Some(&redis.url()), "5m"));
    let b = Tollgate::start(&config(&up.addr(), endpoint.port, Some(&redis.url()), "5m"));
    for t in [&a, &b, &a, &b] {
        assert_eq!(call(t).status, 200);
        assert_eq!(
            upstream_authorization(&up),
            "Bearer up-tok-1",
            "the client's token must not reach the upstream"
        );
    }
    assert_eq!(
        endpoint.hits(),
        1,
        "the token endpoint was called {} times",
        endpoint.hits()
    );
}

#[test]
fn tokens_are_refreshed_and_a_failed_refresh_keeps_the_last_good_one() {
    let up = Recorder::start();
    let endpoint = JsonServer::start(r#"{"access_token": "up-tok-1", "expires_in": 3600}"#);
    let t = Tollgate::start(&config(&up.addr(), endpoint.port, None, "1s"));
    assert_eq!(call(&t).status, 200);
    assert_eq!(upstream_authorization(&up), "Bearer up-tok-1");

    endpoint.set(r#"{"access_token": "up-tok-2", "expires_in": 3600}"#, 200);
    wait_for("the refreshed token", Duration::from_secs(10), || {
        assert_eq!(call(&t).status, 200);
        (upstream_authorization(&up) == "Bearer up-tok-2").then_some(())
    });

    endpoint.set("no", 500);
    t.wait_metric(
        r#"tollgate_upstream_token_fetches_total{result="failure",route="svc"}"#,
        1.0,
    );
    assert_eq!(call(&t).status, 200);
    assert_eq!(upstream_authorization(&up), "Bearer up-tok-2");
}

#[test]
fn first_requests_wait_for_the_first_token() {
    let up = Recorder::start();
    let endpoint = JsonServer::start("not yet");
    endpoint.set("down", 503);
    let t = Tollgate::start(&config(&up.addr(), endpoint.port, None, "5m"));
    // No token can be had: a bounded wait, then 502, and nothing reaches the upstream.
    call(&t).assert_refusal(502, "upstream_unavailable");
    assert_eq!(up.hits(), 0);
    endpoint.set(r#"{"access_token": "late", "expires_in": 3600}"#, 200);
    wait_for("a token", Duration::from_secs(10), || {
        (call(&t).status == 200).then_some(())
    });
    assert_eq!(upstream_authorization(&up), "Bearer late");
}

#[test]
fn https_token_endpoints_are_verified_against_the_configured_ca() {
    let up = Recorder::start();
    let endpoint = JsonServer::start(
        r#"{"access_token": "tls-tok", "token_type": "Bearer", "expires_in": 3600}"#,
    );
    let front = TlsFront::start(endpoint.port);
    let url = format!("https://127.0.0.1:{}/oauth/token", front.port);
    let t = Tollgate::start(&config_url(
        &up.addr(),
        &url,
        None,
        "5m",
        &format!("ca_file: \"{}\",", front.ca_file()),
    ));
    assert_eq!(call(&t).status, 200);
    assert_eq!(upstream_authorization(&up), "Bearer tls-tok");

    // The system store does not know the private CA: no token, so the
    // route answers 502 instead of calling the upstream without one.
    let hits = endpoint.hits();
    let untrusting = Tollgate::start(&config_url(&up.addr(), &url, None, "5m", ""));
    call(&untrusting).assert_refusal(502, "upstream_unavailable");
    assert_eq!(endpoint.hits(), hits, "no request passed the TLS handshake");
}
