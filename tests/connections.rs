//! Connection lifetimes and request heads at the edge, through the real
//! binary with raw sockets and a frame-level HTTP/2 client: the head guard
//! with leading empty lines, tollgate's own answer to a head Pingora
//! refuses, h2c detection of short HTTP/1.0 requests, idle timeouts for
//! HTTP/1.1 and HTTP/2 (thousands of connections, descriptors given back),
//! requests per connection and the connection cap.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// `server` goes inside `server: { ... }`.
fn config(upstream: &str, server: &str) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 2, h2c: true, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock", {server} }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
log: {{ level: info, color: false }}
upstreams: {{ backend: {{ peers: ["{upstream}"] }} }}
routes:
  - {{ name: public, path_prefix: /public/, upstream: backend, auth: none }}
"#
    )
}

/// Everything the server sends until it closes (or 10 s pass).
fn exchange(port: u16, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer and close before all of it is written.
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The first response in `text` (a body up to its Content-Length).
fn response(text: &str) -> Response {
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete response in {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers: std::collections::HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(rest.len());
    Response {
        status,
        body: rest.as_bytes()[..len.min(rest.len())].to_vec(),
        headers,
    }
}

#[test]
fn leading_empty_lines_do_not_switch_the_head_guard_off() {
    let up = Recorder::start();
    let t = Tollgate::start(&config(
        &up.addr(),
        "max_header_bytes: 1024, header_timeout: 2s",
    ));
    let big = format!(
        "GET /public/x HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(4000)
    );
    for prefix in ["", "\r\n", "\r\n\r\n", "\n\n", "\r\n\n\r\n"] {
        let out = exchange(t.port, format!("{prefix}{big}").as_bytes());
        response(&out).assert_refusal(431, "headers_too_large");
    }
    assert_eq!(up.hits(), 0, "a head over the bound reached the upstream");

    // A head that stops half-way is cut off at header_timeout, with or
    // without empty lines before it.
    let port = t.port;
    let cut: Vec<_> = ["", "\r\n\r\n", "\n\n"]
        .into_iter()
        .map(|prefix| {
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                s.write_all(format!("{prefix}GET /public/x HTTP/1.1\r\nHost: a\r\n").as_bytes())
                    .unwrap();
                let mut rest = Vec::new();
                let read = s.read_to_end(&mut rest);
                let took = started.elapsed();
                assert!(
                    matches!(read, Ok(0)) || read.is_err(),
                    "{prefix:?}: answered instead of cut off: {}",
                    String::from_utf8_lossy(&rest)
                );
                assert!(
                    took >= Duration::from_millis(1900) && took < Duration::from_secs(12),
                    "{prefix:?}: closed after {took:?} (header_timeout 2s)"
                );
            })
        })
        .collect();
    for c in cut {
        c.join().unwrap();
    }
    assert_eq!(up.hits(), 0);

    // A few empty lines before a request are allowed (RFC 9112 §2.2) ...
    let out = exchange(
        t.port,
        b"\r\n\r\nGET /public/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(response(&out).status, 200, "{out}");
    assert_eq!(up.hits(), 1);
    // ... but not many.
    let mut flood = b"\r\n".repeat(100);
    flood.extend_from_slice(b"GET /public/x HTTP/1.1\r\nHost: a\r\n\r\n");
    response(&exchange(t.port, &flood)).assert_refusal(400, "bad_request");
    assert_eq!(up.hits(), 1);
}

#[test]
fn heads_pingora_refuses_get_tollgates_json_answer() {
    let up = Recorder::start();
    let t = Tollgate::start(&config(&up.addr(), ""));
    let malformed: &[&[u8]] = &[
        b"GARBAGE\r\n\r\n",
        b"GET /public/x HTTP/1.1 extra\r\nHost: a\r\n\r\n",
        b"GET /public/x HTTP/1.1\r\nBad Header Line\r\n\r\n",
        b"GET /public/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"\x01\x02\x03 / HTTP/1.1\r\n\r\n",
        b"GET /public/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ];
    for bytes in malformed {
        let out = exchange(t.port, bytes);
        let r = response(&out);
        r.assert_refusal(400, "bad_request");
        assert!(r.header("server").is_none(), "{out}");
        assert!(!out.contains("Pingora"), "{out}");
        assert_eq!(r.header("connection"), Some("close"), "{out}");
    }
    let out = exchange(
        t.port,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    );
    response(&out).assert_refusal(405, "method_not_allowed");
    assert!(!out.contains("Pingora"), "{out}");
    assert_eq!(up.hits(), 0, "a refused head reached the upstream");
    t.wait_metric(
        r#"tollgate_requests_total{route="_invalid",status="400"}"#,
        malformed.len() as f64,
    );
    // The same connection's next request after a good one is unaffected.
    let mut c = Client::connect(t.port).unwrap();
    assert_eq!(c.get("/public/a", "").unwrap().status, 200);
    assert_eq!(c.get("/public/b", "").unwrap().status, 200);
}

#[test]
fn a_short_http10_request_is_answered_on_an_h2c_listener() {
    let up = Recorder::start();
    let t = Tollgate::start(&config(&up.addr(), ""));
    // 18 bytes, fewer than the 24 of the HTTP/2 preface.
    let out = exchange(t.port, b"GET / HTTP/1.0\r\n\r\n");
    response(&out).assert_refusal(404, "no_route");
    let out = exchange(t.port, b"GET /public/x HTTP/1.0\r\n\r\n");
    assert_eq!(response(&out).status, 200, "{out}");
    assert_eq!(up.hits(), 1);
    // Bytes that start like the preface and then differ are HTTP/1 too.
    let out = exchange(t.port, b"PRI * HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 4"), "{out}");
    // HTTP/2 with prior knowledge still works on the same listener.
    let run = h2_peer(
        t.port,
        &[
            "--path",
            "/public/h2",
            "--wait",
            "10",
            "--quit-after-answers",
        ],
    );
    let conn = &run["connections"][0];
    assert_eq!(conn["answers"][0]["status"], 200, "{run}");
    assert_eq!(up.hits(), 2);
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The open-file limit of this process (and the tollgate it starts) raised
/// to its hard limit: the test holds thousands of sockets.
#[allow(unsafe_code)] // setrlimit has no safe std wrapper
fn raise_nofile(needed: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < needed {
            lim.rlim_cur = lim.rlim_max;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    assert!(
        lim.rlim_cur >= needed,
        "the open-file limit is {}, the test needs {needed}",
        lim.rlim_cur
    );
}

/// One HTTP/1.1 request for the health probe (answered by tollgate itself,
/// so no upstream connection is opened), then the connection stays idle
/// until the server closes it. Returns (time of the answer, time of the
/// close), both since `t0`.
async fn idle_http1(port: u16, t0: Instant) -> (Duration, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    // The probe answers "OK" with a Content-Length: read to its end.
    while !(got.ends_with(b"OK") && got.windows(4).any(|w| w == b"\r\n\r\n")) {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the answer");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"));
    let answered = t0.elapsed();
    let read = s.read(&mut buf).await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "bytes after the answer on an idle connection"
    );
    (answered, t0.elapsed())
}

#[test]
fn idle_connections_are_closed_on_time_and_their_descriptors_come_back() {
    const CONNECTIONS: usize = 2_000;
    const H2: usize = 50;
    let timeout = Duration::from_secs(3);
    raise_nofile(CONNECTIONS as u64 + 1_000);
    let up = Echo::start();
    let t = Tollgate::start(&config(
        &up.addr(),
        "keepalive_timeout: 3s, h2_idle_timeout: 3s",
    ));
    let pid = t.proc.child.id();
    assert_eq!(t.get("/health").status, 200);
    let baseline = fd_count(pid);

    // HTTP/2 connections idle beside them, on the frame-level client.
    let port = t.port;
    let h2 = std::thread::spawn(move || {
        h2_peer(
            port,
            &[
                "--connections",
                &H2.to_string(),
                "--path",
                "/health",
                "--wait",
                "20",
            ],
        )
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let t0 = Instant::now();
    let times: Vec<(Duration, Duration)> = rt.block_on(async {
        let tasks: Vec<_> = (0..CONNECTIONS)
            .map(|_| tokio::spawn(idle_http1(port, t0)))
            .collect();
        let mut times = Vec::new();
        for task in tasks {
            times.push(task.await.unwrap());
        }
        times
    });
    // Every connection stayed open for the timeout after its answer and
    // was closed soon after it.
    let idle: Vec<Duration> = times.iter().map(|(a, c)| *c - *a).collect();
    let shortest = idle.iter().min().unwrap();
    let longest = idle.iter().max().unwrap();
    // How many were open at once, from the client's own times.
    let mut edges: Vec<(Duration, i64)> = times
        .iter()
        .flat_map(|(a, c)| [(*a, 1), (*c, -1)])
        .collect();
    edges.sort();
    let mut open = 0i64;
    let peak = edges
        .iter()
        .map(|(_, d)| {
            open += d;
            open
        })
        .max()
        .unwrap();
    eprintln!(
        "{CONNECTIONS} idle HTTP/1.1 connections: closed {shortest:?} to {longest:?} after their answer, {peak} open at once"
    );
    // The client takes its time from reading the answer, which may come
    // late on a busy machine: the lower bound only shows that the
    // connection was not closed at once.
    assert!(
        *shortest >= timeout / 2,
        "a connection was closed after only {shortest:?} (keepalive_timeout 3s)"
    );
    assert!(
        *longest < timeout + Duration::from_secs(5),
        "a connection stayed open {longest:?} (keepalive_timeout 3s)"
    );
    assert!(peak >= 1_000, "only {peak} connections were open at once");

    let run = h2.join().unwrap();
    let conns = run["connections"].as_array().unwrap();
    assert_eq!(conns.len(), H2);
    for c in conns {
        assert_eq!(c["answers"][0]["status"], 200, "{c}");
        let answered = c["answers"][0]["at"].as_f64().unwrap();
        let goaway = c["goaway"][0]["at"]
            .as_f64()
            .unwrap_or_else(|| panic!("no GOAWAY: {c}"));
        let idle = goaway - answered;
        assert!(
            (1.5..8.0).contains(&idle),
            "GOAWAY {idle:.2}s after the answer (h2_idle_timeout 3s): {c}"
        );
        assert!(c["closed"].as_f64().is_some(), "not closed: {c}");
        assert!(c["error"].is_null(), "{c}");
    }

    // Every descriptor the connections took is given back.
    wait_for(
        "the descriptors back at baseline",
        Duration::from_secs(10),
        || (fd_count(pid) <= baseline).then_some(()),
    );
    assert_eq!(
        metric_value(&t.metrics(), "tollgate_connections_open"),
        Some(0.0)
    );
}

#[test]
fn requests_per_connection_are_limited_on_http1_and_http2() {
    let up = Echo::start();
    let t = Tollgate::start(&config(&up.addr(), "max_requests_per_connection: 3"));
    let mut c = Client::connect(t.port).unwrap();
    for i in 1..=3 {
        let r = c.get("/public/x", "").unwrap();
        assert_eq!(r.status, 200);
        let close = r.header("connection") == Some("close");
        assert_eq!(
            close,
            i == 3,
            "answer {i}: Connection {:?}",
            r.header("connection")
        );
    }
    assert!(
        c.get("/public/x", "").is_err(),
        "a fourth request was served on the connection"
    );

    let run = h2_peer(
        t.port,
        &["--path", "/public/x", "--requests", "5", "--wait", "10"],
    );
    let conn = &run["connections"][0];
    let answers = conn["answers"].as_array().unwrap();
    assert_eq!(answers.len(), 3, "{conn}");
    assert!(answers.iter().all(|a| a["status"] == 200), "{conn}");
    let goaway = conn["goaway"].as_array().unwrap();
    assert!(!goaway.is_empty(), "no GOAWAY: {conn}");
    assert_eq!(goaway.last().unwrap()["last_stream_id"], 5, "{conn}");
    assert!(conn["closed"].as_f64().is_some(), "{conn}");

    // keepalive_timeout 0: no keep-alive at all.
    let t = Tollgate::start(&config(&up.addr(), "keepalive_timeout: 0s"));
    let mut c = Client::connect(t.port).unwrap();
    let r = c.get("/public/x", "").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
}

#[test]
fn connections_over_max_connections_are_closed_at_once_and_counted() {
    let up = Echo::start();
    let t = Tollgate::start(&config(&up.addr(), "max_connections: 4"));
    let mut held: Vec<Client> = (0..4)
        .map(|_| {
            let mut c = Client::connect(t.port).unwrap();
            assert_eq!(c.get("/public/x", "").unwrap().status, 200);
            c
        })
        .collect();
    t.wait_metric("tollgate_connections_open", 4.0);
    // The fifth is closed without an answer.
    let out = exchange(t.port, b"GET /public/x HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(out.is_empty(), "the fifth connection was answered: {out}");
    t.wait_metric("tollgate_connections_rejected_total", 1.0);
    // The held ones still work; once one goes, a new one is served.
    assert_eq!(held[0].get("/public/x", "").unwrap().status, 200);
    held.pop();
    t.wait_metric("tollgate_connections_open", 3.0);
    let mut c = Client::connect(t.port).unwrap();
    assert_eq!(c.get("/public/x", "").unwrap().status, 200);
    assert_eq!(
        metric_value(&t.metrics(), "tollgate_connections_rejected_total"),
        Some(1.0)
    );
}
