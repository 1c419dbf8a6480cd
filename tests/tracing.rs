//! Tracing through the real binary: W3C trace context continued from
//! trusted proxies only and forwarded with tollgate's span as the parent,
//! spans received by a real OTLP receiver (tests/support/otlp_receiver.py,
//! OTLP/gRPC and OTLP/HTTP), export that never holds a request up, and
//! `check` on bad tracing settings.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::BufRead;
use std::time::Duration;

const SECRET: &str = "tracing-secret-0123456789abcdef";
const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// The OTLP receiver: its ports and the JSON lines it writes, one a span.
struct Receiver {
    grpc: u16,
    http: u16,
    out: std::path::PathBuf,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl Receiver {
    fn start() -> Receiver {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("spans.jsonl");
        let (log, file) = log_file(dir.path(), "receiver.log");
        let mut child = std::process::Command::new(python3())
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/support/otlp_receiver.py"
            ))
            .arg(&out)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(file)
            .spawn()
            .expect("python3 (make setup installs opentelemetry-proto and grpcio)");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("receiver ports");
        let proc = Proc { child, log };
        let ports: Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("receiver did not start: {line}\n{}", proc.log_text()));
        Receiver {
            grpc: ports["grpc"].as_u64().unwrap() as u16,
            http: ports["http"].as_u64().unwrap() as u16,
            out,
            _proc: proc,
            _dir: dir,
        }
    }

    fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("span JSON"))
            .collect()
    }

    /// The spans of `trace_id`, once its server span and `children` more
    /// have arrived.
    fn trace(&self, trace_id: &str, children: usize) -> Vec<Value> {
        wait_for(
            &format!("the spans of trace {trace_id}"),
            Duration::from_secs(30),
            || {
                let spans: Vec<Value> = self
                    .spans()
                    .into_iter()
                    .filter(|s| s["trace_id"] == trace_id)
                    .collect();
                let server = spans.iter().any(|s| s["kind"] == 2);
                (server && spans.len() > children).then_some(spans)
            },
        )
    }
}

const KIND_SERVER: u64 = 2;
const KIND_CLIENT: u64 = 3;

fn config(upstream: &str, tracing: &str, trusted: &str) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], h2c: true, threads: 1, trusted_proxies: [{trusted}], pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock" }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
log: {{ level: info, color: false }}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{SECRET}" }} }}
limits: {{ default: [{{ requests: 1000000, window: 1m }}] }}
upstreams: {{ backend: {{ peers: ["{upstream}"] }} }}
routes:
  - {{ name: api, path_prefix: /api/, upstream: backend }}
  - {{ name: open, path_prefix: /open/, upstream: backend, auth: none }}
telemetry:
  tracing: {tracing}
"#
    )
}

fn grpc_to(r: &Receiver, ratio: f64) -> String {
    format!(
        "{{ endpoint: \"http://127.0.0.1:{}\", sample_ratio: {ratio}, service_name: edge-test, timeout: 2s }}",
        r.grpc
    )
}

fn token(key: &str) -> String {
    pyjwt(json!({"alg": "HS256", "key": SECRET, "claims": {
        "api_key": key, "exp": unix_now() + 600, "allowed_routes": ["/api/*"],
    }}))
}

fn call(t: &Tollgate, path: &str, headers: &str) -> Response {
    request(
        t.port,
        &format!("GET {path} HTTP/1.1\r\nHost: edge.test\r\nUser-Agent: trace-test/1\r\n{headers}Connection: close\r\n\r\n"),
    )
    .expect("answer")
}

/// The `traceparent` the upstream (a Recorder) saw last: (trace id, parent id, flags).
fn upstream_traceparent(rec: &Recorder) -> (String, String, String) {
    let head = rec.last_head().to_ascii_lowercase();
    let line = head
        .lines()
        .find_map(|l| l.strip_prefix("traceparent: "))
        .unwrap_or_else(|| panic!("no traceparent upstream:\n{head}"))
        .trim()
        .to_string();
    let parts: Vec<&str> = line.split('-').collect();
    assert_eq!(parts.len(), 4, "{line}");
    assert_eq!(parts[0], "00", "{line}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

fn counter(t: &Tollgate, name: &str) -> f64 {
    metric_value(&t.metrics(), name).unwrap_or(0.0)
}

#[test]
fn each_request_has_one_server_span_with_http_attributes_and_children_under_it() {
    let receiver = Receiver::start();
    let rec = Recorder::start();
    let t = Tollgate::start(&config(&rec.addr(), &grpc_to(&receiver, 1.0), ""));
    let secret_token = token("key-of-a-caller");

    let r = call(
        &t,
        "/api/items?q=1",
        &format!("Authorization: Bearer {secret_token}\r\n"),
    );
    assert_eq!(r.status, 200);
    let (trace_id, upstream_parent, flags) = upstream_traceparent(&rec);
    assert_eq!(flags, "01");
    let spans = receiver.trace(&trace_id, 3);
    let servers: Vec<&Value> = spans.iter().filter(|s| s["kind"] == KIND_SERVER).collect();
    assert_eq!(servers.len(), 1, "{spans:#?}");
    let server = servers[0];
    assert_eq!(server["name"], "GET api");
    assert_eq!(server["parent_span_id"], "");
    assert_eq!(server["service_name"], "edge-test");
    assert_eq!(attr(server, "http.request.method"), "GET");
    assert_eq!(attr(server, "http.route"), "api");
    assert_eq!(attr(server, "url.path"), "/api/items");
    assert_eq!(attr(server, "http.response.status_code"), 200);
    assert_eq!(attr(server, "network.protocol.version"), "1.1");
    assert_eq!(attr(server, "server.address"), "edge.test");
    assert_eq!(attr(server, "client.address"), "127.0.0.1");
    assert_eq!(attr(server, "user_agent.original"), "trace-test/1");
    assert_eq!(
        attr(server, "tollgate.request_id").as_str(),
        r.header("x-request-id")
    );
    assert_eq!(server["status"], 0, "a 200 is no error");

    // Children: authentication, the limit decision and the upstream call.
    let child = |name: &str| {
        spans
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no {name} span: {spans:#?}"))
    };
    for name in ["auth", "rate limit", "upstream"] {
        assert_eq!(child(name)["parent_span_id"], server["span_id"], "{name}");
    }
    assert_eq!(attr(child("auth"), "tollgate.auth.cache_hit"), false);
    assert_eq!(
        attr(child("rate limit"), "tollgate.ratelimit.decision"),
        "allowed"
    );
    assert_eq!(
        attr(child("rate limit"), "tollgate.ratelimit.source"),
        "local"
    );
    let upstream = child("upstream");
    assert_eq!(upstream["kind"], KIND_CLIENT);
    assert_eq!(
        upstream["span_id"],
        upstream_parent.as_str(),
        "the upstream's parent is tollgate's call"
    );
    assert_eq!(attr(upstream, "server.port"), rec.port);
    assert!(attr(upstream, "tollgate.upstream.ttfb_ms")
        .as_f64()
        .is_some());

    // Nothing of the token or the api key in any span.
    let all = serde_json::to_string(&spans).unwrap();
    assert!(!all.contains(&secret_token) && !all.contains("key-of-a-caller"));

    // The trace id joins the access log line to the trace.
    wait_for("the access log line", Duration::from_secs(10), || {
        t.proc
            .log_text()
            .lines()
            .any(|l| l.contains(&format!("trace_id={trace_id}")))
            .then_some(())
    });

    // A second call: a cache hit. A refusal: its error code, no error status.
    let r = call(
        &t,
        "/api/items",
        &format!("Authorization: Bearer {secret_token}\r\n"),
    );
    assert_eq!(r.status, 200);
    let (second, _, _) = upstream_traceparent(&rec);
    let spans = receiver.trace(&second, 3);
    let auth = spans.iter().find(|s| s["name"] == "auth").unwrap();
    assert_eq!(attr(auth, "tollgate.auth.cache_hit"), true);

    let r = call(&t, "/api/items", "Authorization: Bearer not-a-token\r\n");
    assert_eq!(r.status, 401);
    let refused = wait_for(
        "the refused request's span",
        Duration::from_secs(30),
        || {
            receiver
                .spans()
                .into_iter()
                .find(|s| s["kind"] == KIND_SERVER && attr(s, "http.response.status_code") == 401)
        },
    );
    assert_eq!(attr(&refused, "tollgate.error.code"), "invalid_token");
    assert_eq!(refused["status"], 0, "4xx leaves a server span unset");
    let trace = refused["trace_id"].as_str().unwrap();
    let spans = receiver.trace(trace, 1);
    let auth = spans.iter().find(|s| s["name"] == "auth").unwrap();
    assert_eq!(attr(auth, "tollgate.error.code"), "invalid_token");
    assert!(!spans.iter().any(|s| s["name"] == "upstream"));
}

#[test]
fn upstream_failure_is_an_error_span() {
    let receiver = Receiver::start();
    let closed = free_port();
    let t = Tollgate::start(&config(
        &format!("127.0.0.1:{closed}"),
        &grpc_to(&receiver, 1.0),
        "",
    ));
    let r = call(&t, "/open/x", "");
    assert_eq!(r.status, 502);
    let server = wait_for("the 502's span", Duration::from_secs(30), || {
        receiver
            .spans()
            .into_iter()
            .find(|s| s["kind"] == KIND_SERVER)
    });
    assert_eq!(server["status"], 2, "5xx: error status");
    assert_eq!(attr(&server, "tollgate.error.code"), "upstream_unavailable");
}

#[test]
fn a_trusted_proxys_traceparent_is_continued_and_passed_on_with_tollgates_span() {
    let receiver = Receiver::start();
    let rec = Recorder::start();
    let t = Tollgate::start(&config(
        &rec.addr(),
        &grpc_to(&receiver, 0.0),
        "127.0.0.1/32",
    ));
    // Ratio 0, but the trusted caller sampled the trace: parent-based.
    let r = call(
        &t,
        "/open/x",
        &format!("traceparent: {PARENT}\r\ntracestate: vendor=abc,other=1\r\n"),
    );
    assert_eq!(r.status, 200);
    let (trace_id, parent, flags) = upstream_traceparent(&rec);
    assert_eq!(trace_id, TRACE);
    assert_eq!(flags, "01");
    assert_ne!(
        parent, "00f067aa0ba902b7",
        "the caller's span is not the upstream's parent"
    );
    assert!(rec
        .last_head()
        .to_ascii_lowercase()
        .contains("tracestate: vendor=abc,other=1"));
    let spans = receiver.trace(TRACE, 1);
    let server = spans.iter().find(|s| s["kind"] == KIND_SERVER).unwrap();
    assert_eq!(server["parent_span_id"], "00f067aa0ba902b7");
    let upstream = spans.iter().find(|s| s["name"] == "upstream").unwrap();
    assert_eq!(upstream["span_id"], parent.as_str());
    assert_eq!(upstream["parent_span_id"], server["span_id"]);

    // Not sampled by the caller: still continued, no spans.
    let unsampled = PARENT.replace("-01", "-00").replace("4bf9", "5bf9");
    let r = call(&t, "/open/x", &format!("traceparent: {unsampled}\r\n"));
    assert_eq!(r.status, 200);
    let (trace_id, _, flags) = upstream_traceparent(&rec);
    assert_eq!(trace_id, TRACE.replace("4bf9", "5bf9"));
    assert_eq!(flags, "00");
}

#[test]
fn an_untrusted_callers_traceparent_starts_a_new_trace_and_cannot_force_sampling() {
    let receiver = Receiver::start();
    let rec = Recorder::start();
    let t = Tollgate::start(&config(&rec.addr(), &grpc_to(&receiver, 0.0), "10.0.0.0/8"));
    for _ in 0..5 {
        let r = call(
            &t,
            "/open/x",
            &format!("traceparent: {PARENT}\r\ntracestate: vendor=abc\r\n"),
        );
        assert_eq!(r.status, 200);
        let (trace_id, parent, flags) = upstream_traceparent(&rec);
        assert_ne!(trace_id, TRACE);
        assert_ne!(parent, "00f067aa0ba902b7");
        assert_eq!(flags, "00", "ratio 0: a new trace is not sampled");
        assert!(!rec.last_head().to_ascii_lowercase().contains("tracestate"));
        let log_line = format!("trace_id={trace_id}");
        wait_for("the access log line", Duration::from_secs(10), || {
            t.proc.log_text().contains(&log_line).then_some(())
        });
    }
    // Ratio 1 (a reload, same receiver): every request has its span, and
    // none of the five before had any.
    t.rewrite_config(&config(&rec.addr(), &grpc_to(&receiver, 1.0), "10.0.0.0/8"));
    t.proc.signal(libc::SIGHUP);
    t.wait_metric(r#"tollgate_config_reloads_total{result="success"}"#, 1.0);
    let mut traces = Vec::new();
    for _ in 0..5 {
        assert_eq!(
            call(&t, "/open/x", &format!("traceparent: {PARENT}\r\n")).status,
            200
        );
        let (trace_id, _, flags) = upstream_traceparent(&rec);
        assert_eq!(flags, "01");
        assert_ne!(trace_id, TRACE);
        traces.push(trace_id);
    }
    for trace in &traces {
        let spans = receiver.trace(trace, 1);
        let server = spans.iter().find(|s| s["kind"] == KIND_SERVER).unwrap();
        assert_eq!(server["parent_span_id"], "", "a new trace has no parent");
    }
    let servers: Vec<String> = receiver
        .spans()
        .into_iter()
        .filter(|s| s["kind"] == KIND_SERVER)
        .map(|s| s["trace_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(servers.len(), 5, "ratio 0 made no span: {servers:?}");
    assert_eq!(counter(&t, "tollgate_trace_spans_dropped_total"), 0.0);
}

#[test]
fn malformed_trace_context_is_ignored_with_a_200_and_a_new_trace() {
    let receiver = Receiver::start();
    let rec = Recorder::start();
    let t = Tollgate::start(&config(
        &rec.addr(),
        &grpc_to(&receiver, 1.0),
        "127.0.0.1/32",
    ));
    let malformed = [
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string(),
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01".into(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01".into(),
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01".into(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7".into(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra".into(),
        "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01".into(),
        "garbage".into(),
        format!("00-{}-00f067aa0ba902b7-01", "4".repeat(3000)),
    ];
    for bad in &malformed {
        let r = call(&t, "/open/x", &format!("traceparent: {bad}\r\n"));
        assert_eq!(r.status, 200, "{bad}");
        let (trace_id, _, flags) = upstream_traceparent(&rec);
        assert_ne!(trace_id, TRACE, "{bad}");
        assert_eq!(flags, "01");
        let spans = receiver.trace(&trace_id, 1);
        let server = spans.iter().find(|s| s["kind"] == KIND_SERVER).unwrap();
        assert_eq!(server["parent_span_id"], "", "{bad}");
    }
    // Two traceparent headers: neither is believed.
    let r = call(
        &t,
        "/open/x",
        &format!("traceparent: {PARENT}\r\ntraceparent: {PARENT}\r\n"),
    );
    assert_eq!(r.status, 200);
    assert_ne!(upstream_traceparent(&rec).0, TRACE);
    // A valid traceparent with an oversized tracestate: the trace goes on,
    // the state is dropped.
    let big: Vec<String> = (0..40).map(|i| format!("k{i}=v")).collect();
    let r = call(
        &t,
        "/open/x",
        &format!("traceparent: {PARENT}\r\ntracestate: {}\r\n", big.join(",")),
    );
    assert_eq!(r.status, 200);
    assert_eq!(upstream_traceparent(&rec).0, TRACE);
    assert!(!rec.last_head().to_ascii_lowercase().contains("tracestate"));
}

#[test]
fn the_collector_down_costs_spans_not_answers() {
    let rec = Recorder::start();
    let closed = free_port();
    let tracing =
        format!("{{ endpoint: \"http://127.0.0.1:{closed}\", sample_ratio: 1.0, timeout: 1s }}");
    let t = Tollgate::start(&config(&rec.addr(), &tracing, ""));
    // Present from the start, at 0.
    assert_eq!(
        metric_value(&t.metrics(), "tollgate_trace_spans_dropped_total"),
        Some(0.0)
    );
    for _ in 0..20 {
        assert_eq!(call(&t, "/open/x", "").status, 200);
    }
    wait_for("dropped spans counted", Duration::from_secs(60), || {
        (counter(&t, "tollgate_trace_spans_dropped_total") >= 40.0).then_some(())
    });
    assert_eq!(counter(&t, "tollgate_trace_spans_exported_total"), 0.0);
    assert_eq!(rec.hits(), 20);
}

#[test]
fn a_collector_that_never_answers_costs_spans_not_answers() {
    // Accepts connections and reads nothing, answers nothing.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    let rec = Recorder::start();
    for protocol in ["grpc", "http"] {
        let tracing = format!(
            "{{ endpoint: \"http://127.0.0.1:{port}\", protocol: {protocol}, sample_ratio: 1.0, timeout: 1s }}"
        );
        let t = Tollgate::start(&config(&rec.addr(), &tracing, ""));
        for _ in 0..20 {
            assert_eq!(call(&t, "/open/x", "").status, 200, "{protocol}");
        }
        wait_for("dropped spans counted", Duration::from_secs(60), || {
            (counter(&t, "tollgate_trace_spans_dropped_total") >= 1.0).then_some(())
        });
        // Still answering while the exporter waits on the collector.
        assert_eq!(call(&t, "/open/x", "").status, 200);
        assert_eq!(counter(&t, "tollgate_trace_spans_exported_total"), 0.0);
    }
}

#[test]
fn a_reload_that_changes_the_endpoint_moves_export_to_the_new_receiver() {
    let first = Receiver::start();
    let second = Receiver::start();
    let rec = Recorder::start();
    let t = Tollgate::start(&config(&rec.addr(), &grpc_to(&first, 1.0), ""));
    assert_eq!(call(&t, "/open/x", "").status, 200);
    let (before, _, _) = upstream_traceparent(&rec);
    let spans = first.trace(&before, 1);
    assert!(spans.iter().all(|s| s["transport"] == "grpc"));

    let http = format!(
        "{{ endpoint: \"http://127.0.0.1:{}\", protocol: http, sample_ratio: 1.0, headers: {{ x-tenant: edge }} }}",
        second.http
    );
    t.rewrite_config(&config(&rec.addr(), &http, ""));
    t.proc.signal(libc::SIGHUP);
    t.wait_metric(r#"tollgate_config_reloads_total{result="success"}"#, 1.0);
    assert_eq!(call(&t, "/open/x", "").status, 200);
    let (after, _, _) = upstream_traceparent(&rec);
    let spans = second.trace(&after, 1);
    assert!(spans.iter().all(|s| s["transport"] == "http"), "{spans:#?}");
    assert_eq!(spans[0]["headers"]["x-tenant"], "edge");
    assert!(!first
        .spans()
        .iter()
        .any(|s| s["trace_id"] == after.as_str()));
}

#[test]
fn otel_variables_fill_what_the_config_leaves_out() {
    let receiver = Receiver::start();
    let rec = Recorder::start();
    let endpoint = format!("http://127.0.0.1:{}", receiver.http);
    let t = Tollgate::start_with_env(
        &config(&rec.addr(), "{ sample_ratio: 1.0 }", ""),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_SERVICE_NAME", "from-env"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-team=edge%20ops"),
        ],
    );
    assert_eq!(call(&t, "/open/x", "").status, 200);
    let (trace_id, _, _) = upstream_traceparent(&rec);
    let spans = receiver.trace(&trace_id, 1);
    assert_eq!(spans[0]["transport"], "http");
    assert_eq!(spans[0]["service_name"], "from-env");
    assert_eq!(spans[0]["headers"]["x-api-team"], "edge ops");
}

#[test]
fn h2_grpc_and_websocket_upstreams_get_the_traceparent() {
    let receiver = Receiver::start();
    let grpc = GrpcServer::start();
    let ws = WsServer::start();
    let rec = Recorder::start();
    let tracing = grpc_to(&receiver, 1.0);
    let template = format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], h2c: true, threads: 1, trusted_proxies: ["127.0.0.1/32"], pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock" }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
log: {{ level: info, color: false }}
upstreams:
  grpc: {{ peers: ["{}"], protocol: h2 }}
  ws: {{ peers: ["{}"] }}
  rec: {{ peers: ["{}"] }}
routes:
  - {{ name: echo, path_prefix: /tollgate.test.Echo/, upstream: grpc, auth: none }}
  - {{ name: chat, path_prefix: /ws/, upstream: ws, auth: none, websocket: true }}
  - {{ name: plain, path_prefix: /plain/, upstream: rec, auth: none }}
telemetry:
  tracing: {tracing}
"#,
        grpc.addr(),
        ws.addr(),
        rec.addr()
    );
    let t = Tollgate::start(&template);
    let target = format!("127.0.0.1:{}", t.port);

    // gRPC (HTTP/2 both sides), continuing the caller's trace.
    let r = grpc_call_args(&[
        "--target",
        &target,
        "--method",
        "unary",
        "--payload",
        "x",
        "--meta",
        &format!("traceparent={PARENT}"),
    ]);
    assert_eq!(r["code"], "OK", "{r}");
    let seen = r["trailing"]["x-seen-traceparent"]
        .as_str()
        .expect("traceparent upstream");
    assert!(seen.starts_with(&format!("00-{TRACE}-")), "{seen}");
    let spans = receiver.trace(TRACE, 1);
    let server = spans.iter().find(|s| s["kind"] == KIND_SERVER).unwrap();
    assert_eq!(attr(server, "network.protocol.version"), "2");
    let upstream = spans.iter().find(|s| s["name"] == "upstream").unwrap();
    assert_eq!(seen.split('-').nth(2), upstream["span_id"].as_str());

    // HTTP/2 from the client (h2c), HTTP/1.1 to the upstream.
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://{target}/plain/x"))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    let (h2_trace, _, flags) = upstream_traceparent(&rec);
    assert_eq!(flags, "01");
    let spans = receiver.trace(&h2_trace, 1);
    let server = spans.iter().find(|s| s["kind"] == KIND_SERVER).unwrap();
    assert_eq!(attr(server, "network.protocol.version"), "2");

    // A WebSocket upgrade.
    let url = format!("ws://{target}/ws/chat");
    let r = ws_client(&[
        "--url",
        &url,
        "--header",
        &format!("traceparent: {}", PARENT.replace("4bf9", "6bf9")),
        "--send",
        "a",
        "--headers-probe",
    ]);
    assert_eq!(r["status"], 101, "{r}");
    let seen = r["headers"]["traceparent"]
        .as_str()
        .expect("traceparent upstream");
    let ws_trace = TRACE.replace("4bf9", "6bf9");
    assert!(seen.starts_with(&format!("00-{ws_trace}-")), "{seen}");
    assert!(!seen.contains("00f067aa0ba902b7"), "{seen}");
}

#[test]
fn check_names_the_key_of_every_bad_tracing_setting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.yaml");
    std::fs::write(
        &path,
        r#"
upstreams: { b: { peers: ["127.0.0.1:1"] } }
routes: [{ name: a, path_prefix: /, upstream: b, auth: none }]
telemetry:
  tracing:
    endpoint: "ftp://collector"
    protocol: zipkin
    sample_ratio: 1.5
    service_name: " "
    timeout: 0s
    headers: { "bad header": x }
    queue_size: 0
"#,
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let (code, _, err) = run_cli(&["check", "-c", p], &[]);
    assert_eq!(code, 1, "{err}");
    for key in [
        "telemetry.tracing.endpoint:",
        "telemetry.tracing.protocol:",
        "telemetry.tracing.sample_ratio:",
        "telemetry.tracing.service_name:",
        "telemetry.tracing.timeout:",
        "telemetry.tracing.headers.bad header:",
        "telemetry.tracing.queue_size:",
    ] {
        assert!(err.contains(key), "{key} missing in:\n{err}");
    }

    std::fs::write(
        &path,
        "upstreams: { b: { peers: [\"127.0.0.1:1\"] } }\nroutes: [{ name: a, path_prefix: /, upstream: b, auth: none }]\ntelemetry: { tracing: { protocol: grpc } }\n",
    )
    .unwrap();
    let (code, out, err) = run_cli(&["check", "-c", p], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = run_cli(
        &["check", "-c", p],
        &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "collector:4317")],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("telemetry.tracing.endpoint (from OTEL_EXPORTER_OTLP_TRACES_ENDPOINT):"),
        "{err}"
    );
    let (code, _, err) = run_cli(
        &["check", "-c", p],
        &[("TOLLGATE_TELEMETRY__TRACING__SAMPLE_RATIO", "-1")],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "telemetry.tracing.sample_ratio (from TOLLGATE_TELEMETRY__TRACING__SAMPLE_RATIO):"
        ),
        "{err}"
    );
}

#[test]
fn a_reload_that_leaves_tracing_as_it_was_keeps_the_exporter() {
    let receiver = Receiver::start();
    let rec = Recorder::start();
    let template = config(&rec.addr(), &grpc_to(&receiver, 1.0), "");
    let t = Tollgate::start(&template);
    let started = |t: &Tollgate| {
        t.proc
            .log_text()
            .matches("tracing: exporter started")
            .count()
    };
    assert_eq!(started(&t), 1);
    // Another route, the same tracing settings.
    t.rewrite_config(&template.replace(
        "  - { name: open,",
        "  - { name: more, path_prefix: /more/, upstream: backend, auth: none }\n  - { name: open,",
    ));
    t.proc.signal(libc::SIGHUP);
    t.wait_metric(r#"tollgate_config_reloads_total{result="success"}"#, 1.0);
    assert_eq!(call(&t, "/more/x", "").status, 200);
    let (trace_id, _, _) = upstream_traceparent(&rec);
    let spans = receiver.trace(&trace_id, 1);
    assert_eq!(spans[0]["service_name"], "edge-test");
    assert_eq!(
        started(&t),
        1,
        "the exporter was kept:\n{}",
        t.proc.log_text()
    );
}

#[test]
fn a_full_queue_drops_spans_while_the_collector_hangs() {
    // Accepts connections (counted) and answers nothing.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let rec = Recorder::start();
    let tracing = format!(
        "{{ endpoint: \"http://127.0.0.1:{port}\", protocol: http, sample_ratio: 1.0, timeout: 30s, queue_size: 4 }}"
    );
    let t = Tollgate::start(&config(&rec.addr(), &tracing, ""));
    assert_eq!(call(&t, "/open/x", "").status, 200);
    // The exporter is now waiting on the collector with the first batch.
    wait_for("the exporter's connection", Duration::from_secs(20), || {
        (accepted.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
    });
    for _ in 0..20 {
        assert_eq!(call(&t, "/open/x", "").status, 200);
    }
    // 40 spans for a queue of 4.
    wait_for("spans dropped", Duration::from_secs(60), || {
        (counter(&t, "tollgate_trace_spans_dropped_total") >= 36.0).then_some(())
    });
    assert_eq!(counter(&t, "tollgate_trace_spans_exported_total"), 0.0);
}

#[test]
fn redis_on_the_request_path_shows_in_the_spans() {
    let redis = Redis::start();
    let receiver = Receiver::start();
    let rec = Recorder::start();
    let template = config(&rec.addr(), &grpc_to(&receiver, 1.0), "")
        .replace(
            "limits: { default: [{ requests: 1000000, window: 1m }] }",
            &format!(
                "redis: {{ url: \"{}\", timeout: 2s }}\nlimits: {{ sync: exact, default: [{{ requests: 1000000, window: 1m }}], concurrency: {{ default: 5 }} }}",
                redis.url()
            ),
        );
    let t = Tollgate::start(&template);
    let r = call(
        &t,
        "/api/x",
        &format!("Authorization: Bearer {}\r\n", token("redis-caller")),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let (trace_id, _, _) = upstream_traceparent(&rec);
    let spans = receiver.trace(&trace_id, 4);
    let server = spans.iter().find(|s| s["kind"] == KIND_SERVER).unwrap();
    let limit = spans.iter().find(|s| s["name"] == "rate limit").unwrap();
    assert_eq!(attr(limit, "tollgate.ratelimit.source"), "redis");
    assert_eq!(limit["parent_span_id"], server["span_id"]);
    let slot = spans.iter().find(|s| s["name"] == "concurrency").unwrap();
    assert_eq!(attr(slot, "tollgate.concurrency.limit"), 5);
}
