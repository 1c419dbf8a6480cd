//! gRPC refusals in the trailers-only form: `grpc-status` and
//! `grpc-message` in the response headers (one HEADERS frame with
//! END_STREAM on HTTP/2, an empty-bodied head on HTTP/1.1), counted in
//! metrics and the access log with the HTTP status they stand for.
//! Through the real binary: a grpcio client, nghttp's frame log and a raw
//! HTTP/1.1 request.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use serde_json::json;
use std::process::Command;
use std::time::Duration;

const SECRET: &str = "grpc-refusals-secret-0123456789";

fn config(grpc: &str) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], h2c: true, threads: 1, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock" }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
log: {{ level: info, color: false }}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{SECRET}" }} }}
limits: {{ claim_window: 1h }}
upstreams: {{ grpc: {{ peers: ["{grpc}"], protocol: h2 }} }}
routes:
  - {{ name: echo, path_prefix: /tollgate.test.Echo/, upstream: grpc }}
"#
    )
}

fn token(key: &str, rate_limit: u64) -> String {
    pyjwt(json!({"alg": "HS256", "key": SECRET, "claims": {
        "api_key": key, "exp": unix_now() + 600, "allowed_routes": ["/tollgate.test.Echo/*"],
        "rate_limit": rate_limit,
    }}))
}

fn requests(t: &Tollgate, status: &str) -> f64 {
    metric_value(
        &t.metrics(),
        &format!(r#"tollgate_requests_total{{route="echo",status="{status}",protocol="grpc"}}"#),
    )
    .unwrap_or(0.0)
}

#[test]
fn grpcio_sees_the_status_in_the_headers_and_metrics_see_the_refusal() {
    let grpc = GrpcServer::start();
    let t = Tollgate::start(&config(&grpc.addr()));
    let target = format!("127.0.0.1:{}", t.port);
    avoid_window_edge(3600, Duration::from_secs(10));

    let r = grpc_call(&target, "unary", "x", None, None);
    assert_eq!(r["code"], "UNAUTHENTICATED", "{r}");
    assert_eq!(r["details"], "a bearer token is required", "{r}");
    // Trailers-only: grpcio hands the one header block over as trailing
    // metadata, with tollgate's request id in it, and no initial metadata.
    assert_eq!(r["initial"], json!({}), "{r}");
    assert_eq!(
        r["trailing"]["x-request-id"].as_str().map(str::len),
        Some(32),
        "{r}"
    );

    let tok = token("grpc-refused", 1);
    let r = grpc_call(&target, "unary", "first", Some(&tok), None);
    assert_eq!(r["code"], "OK", "{r}");
    let r = grpc_call(&target, "unary", "second", Some(&tok), None);
    assert_eq!(r["code"], "RESOURCE_EXHAUSTED", "{r}");
    assert_eq!(r["details"], "limit of 1 requests per 1h exceeded", "{r}");
    assert!(
        r["trailing"]["ratelimit"]
            .as_str()
            .is_some_and(|v| v.contains("r=0")),
        "{r}"
    );
    // Counted with the status each refusal stands for, not the HTTP 200 on
    // the wire: alerts on 401 and 429 see them.
    t.wait_metric(
        r#"tollgate_requests_total{route="echo",status="401",protocol="grpc"}"#,
        1.0,
    );
    assert_eq!(requests(&t, "429"), 1.0);
    assert_eq!(requests(&t, "200"), 1.0);
    let log = t.proc.log_text();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("route=echo") && l.contains("error=rate_limited"))
        .collect();
    assert_eq!(refused.len(), 1, "{log}");
    assert!(refused.iter().all(|l| l.contains("status=429")), "{log}");
}

/// nghttp's frame log of one h2c request with `content-type: application/grpc`.
fn nghttp(port: u16, path: &str, headers: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    // One empty gRPC message: no compression flag, length 0.
    std::fs::write(&body, [0u8; 5]).unwrap();
    let mut cmd = Command::new("nghttp");
    cmd.args([
        "-nv",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
    ])
    .arg("-d")
    .arg(&body);
    for h in headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(format!("http://127.0.0.1:{port}{path}"));
    let out = cmd
        .output()
        .expect("nghttp (nghttp2-client) must be installed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn over_http2_the_refusal_is_one_headers_frame_that_ends_the_stream() {
    let grpc = GrpcServer::start();
    let t = Tollgate::start(&config(&grpc.addr()));
    for (path, headers, status) in [
        ("/tollgate.test.Echo/Unary", vec![], "16"),
        (
            "/tollgate.test.Echo/..;/Unary",
            vec!["authorization: Bearer x"],
            "3",
        ),
        ("/other/Unary", vec![], "12"),
    ] {
        let log = nghttp(t.port, path, &headers);
        // The answer is one HEADERS frame that ends the stream: no DATA, no
        // second (trailer) block.
        let received: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("recv ") && l.contains(" frame <"))
            .filter(|l| !l.contains("stream_id=0>"))
            .collect();
        assert_eq!(received.len(), 1, "{path}: one frame on the stream:\n{log}");
        assert!(received[0].contains("recv HEADERS frame"), "{log}");
        let flags = log
            .lines()
            .skip_while(|l| !l.contains("recv HEADERS frame"))
            .nth(1)
            .unwrap_or_default();
        assert!(
            flags.contains("END_STREAM") && flags.contains("END_HEADERS"),
            "{path}: {flags}\n{log}"
        );
        assert!(log.contains(&format!("grpc-status: {status}")), "{log}");
        assert!(log.contains("grpc-message: "), "{log}");
        assert!(log.contains(":status: 200"), "{log}");
        assert!(log.contains("content-type: application/grpc"), "{log}");
    }
}

#[test]
fn over_http11_the_status_is_in_the_head() {
    let grpc = GrpcServer::start();
    let t = Tollgate::start(&config(&grpc.addr()));
    for (path, status, message) in [
        (
            "/tollgate.test.Echo/Unary",
            "16",
            "a bearer token is required",
        ),
        (
            "/tollgate.test.Echo/%2e%2e/Unary",
            "3",
            "the path has a '.' or '..' segment",
        ),
    ] {
        let r = t.request(&format!(
            "POST {path} HTTP/1.1\r\nHost: a\r\nContent-Type: application/grpc\r\nContent-Length: 5\r\n\r\n\0\0\0\0\0"
        ));
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type"), Some("application/grpc"));
        assert_eq!(r.header("grpc-status"), Some(status), "{path}");
        assert_eq!(r.header("grpc-message"), Some(message), "{path}");
        assert_eq!(r.header("content-length"), Some("0"));
        assert!(r.body.is_empty());
    }
    t.wait_metric(
        r#"tollgate_requests_total{route="echo",status="401",protocol="grpc"}"#,
        1.0,
    );
    t.wait_metric(
        r#"tollgate_requests_total{route="_invalid",status="400",protocol="grpc"}"#,
        1.0,
    );
}
