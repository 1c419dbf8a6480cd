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

/// An upstream that answers every request with `len` bytes, written as fast
/// as the connection takes them.
fn big_upstream(len: usize) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let start = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
                if stream.write_all(start.as_bytes()).is_err() {
                    return;
                }
                let chunk = vec![b'x'; 64 * 1024];
                let mut left = len;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if stream.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    left -= n;
                }
            });
        }
    });
    port
}

#[test]
fn a_client_that_stops_reading_is_cut_off_at_send_timeout() {
    const LEN: usize = 256 * 1024 * 1024;
    let up = big_upstream(LEN);
    let t = Tollgate::start(&config(&format!("127.0.0.1:{up}"), "send_timeout: 1s"));
    let mut s = TcpStream::connect(("127.0.0.1", t.port)).unwrap();
    s.write_all(b"GET /public/big HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    // Nothing is read until tollgate has given up on this client.
    t.wait_metric("tollgate_send_timeouts_total", 1.0);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(
        got > 0 && got < LEN,
        "the client got {got} bytes of a {LEN}-byte answer it stopped reading"
    );
    wait_for(
        "the connection counted closed",
        Duration::from_secs(10),
        || (metric_value(&t.metrics(), "tollgate_connections_open") == Some(0.0)).then_some(()),
    );
    let r = get(t.port, "/health").unwrap();
    assert_eq!(r.status, 200);
}

#[test]
fn a_client_that_half_closes_after_its_request_gets_its_answer() {
    let up = Echo::start();
    let t = Tollgate::start(&config(&up.addr(), "max_header_bytes: 8192"));
    for _ in 0..3 {
        let mut s = TcpStream::connect(("127.0.0.1", t.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /public/half?wait=300ms HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        let r = response(&text);
        assert_eq!(r.status, 200, "{text}");
        assert!(
            r.text().starts_with("GET /public/half?wait=300ms HTTP/1.1"),
            "{text}"
        );
    }
    let m = t.metrics();
    assert_eq!(
        metric_value(&m, "tollgate_upstream_errors_total"),
        None,
        "{m}"
    );
}

#[test]
fn a_client_that_goes_away_is_no_upstream_error() {
    let up = Echo::start();
    let t = Tollgate::start(&config(&up.addr(), "max_header_bytes: 8192"));
    for _ in 0..3 {
        let mut s = TcpStream::connect(("127.0.0.1", t.port)).unwrap();
        s.write_all(b"GET /public/gone?wait=2s HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        // A reset, not a FIN: the client is gone, not just done sending.
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    }
    t.wait_metric(
        "tollgate_requests_total{route=\"public\",status=\"499\"}",
        3.0,
    );
    let m = t.metrics();
    assert_eq!(
        metric_value(&m, "tollgate_upstream_errors_total"),
        None,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "tollgate_requests_total{status=\"502\"}"),
        None,
        "{m}"
    );
}

#[test]
fn an_answer_before_a_close_survives_what_the_client_sent_after_it() {
    let up = Echo::start();
    let t = Tollgate::start(&config(&up.addr(), "max_header_bytes: 8192"));
    for _ in 0..3 {
        let mut s = TcpStream::connect(("127.0.0.1", t.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // A request that closes the connection, then more than tollgate
        // reads with it: a request whose body is still arriving when the
        // first answer is written and the connection closed.
        let mut bytes =
            b"GET /public/first HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".to_vec();
        let body = vec![b'y'; 100 * 1024];
        bytes.extend_from_slice(
            format!(
                "POST /public/second HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        bytes.extend_from_slice(&body);
        let mut writer = s.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let _ = writer.write_all(&bytes);
        });
        // Read only once tollgate is done with the connection: the answer
        // is whole and ends in a clean close.
        wait_for(
            "the connection handed back",
            Duration::from_secs(20),
            || (metric_value(&t.metrics(), "tollgate_connections_open") == Some(0.0)).then_some(()),
        );
        let mut out = Vec::new();
        let read = s.read_to_end(&mut out);
        sender.join().unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        assert!(read.is_ok(), "{read:?} after {text:?}");
        let r = response(&text);
        assert_eq!(r.status, 200, "{text}");
        assert!(r.text().starts_with("GET /public/first HTTP/1.1"), "{text}");
    }
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let up = Recorder::start();
    let t = Tollgate::start(&config(&up.addr(), "max_header_bytes: 8192"));
    let mut bytes = Vec::new();
    for i in 0..5 {
        bytes.extend_from_slice(format!("GET /public/p{i} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
    }
    bytes.extend_from_slice(
        b"POST /public/p5 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    );
    bytes.extend_from_slice(b"GET /public/p6 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    let out = exchange(t.port, &bytes);
    let answers: Vec<&str> = out.matches("HTTP/1.1 ").collect();
    assert_eq!(answers.len(), 7, "{out}");
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 7, "{out}");
    assert_eq!(up.hits(), 7);
    assert!(
        up.last_head().starts_with("GET /public/p6 "),
        "{}",
        up.last_head()
    );

    // A pipelined head is bounded too, and so is a pipelined request that
    // never ends its head.
    let big = format!(
        "GET /public/a HTTP/1.1\r\nHost: a\r\n\r\nGET /public/b HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "b".repeat(40_000)
    );
    let out = exchange(t.port, big.as_bytes());
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    assert!(out.contains("HTTP/1.1 431 "), "{out}");
    assert_eq!(up.hits(), 8);
}

/// Streams of an `h2_burst.py` report: (id, stream).
fn streams(run: &serde_json::Value) -> Vec<(u64, serde_json::Value)> {
    let mut all: Vec<(u64, serde_json::Value)> = run["streams"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.parse().unwrap(), v.clone()))
        .collect();
    all.sort_by_key(|(id, _)| *id);
    all
}

#[test]
fn every_stream_below_the_goaway_gets_its_whole_answer() {
    let up = Echo::start();
    let t = Tollgate::start(&config(&up.addr(), "max_requests_per_connection: 5"));
    for round in 0..10 {
        let run = h2_burst(t.port, &["--requests", "60", "--path", "/public/burst"]);
        let last = run["goaway"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|g| g["last_stream_id"].as_u64())
            .min()
            .unwrap_or_else(|| panic!("round {round}: no GOAWAY: {run}"));
        assert!(run["closed"].as_f64().is_some(), "round {round}: {run}");
        let mut served = 0;
        for (id, s) in streams(&run) {
            if id <= last && s["reset"] == 7 {
                // REFUSED_STREAM: not processed, the client sends it again.
                assert!(s["status"].is_null(), "round {round}, stream {id}: {run}");
            } else if id <= last {
                served += 1;
                assert_eq!(s["status"], 200, "round {round}, stream {id}: {run}");
                assert_eq!(s["complete"], true, "round {round}, stream {id}: {run}");
            } else {
                assert!(
                    s["status"].is_null(),
                    "round {round}, stream {id} above the GOAWAY was served: {run}"
                );
            }
        }
        assert!(
            (5..=5 + 32).contains(&served),
            "round {round}: {served} served: {run}"
        );
    }
}

#[test]
fn a_client_that_ignores_the_goaway_round_trip_is_still_cut_off() {
    let up = Echo::start();
    let t = Tollgate::start(&config(&up.addr(), "max_requests_per_connection: 5"));
    // Bursts of 5 for as long as the connection serves them, PINGs unanswered.
    let run = h2_burst(
        t.port,
        &[
            "--requests",
            "5",
            "--rounds",
            "200",
            "--ignore-ping",
            "--path",
            "/public/x",
        ],
    );
    let served = streams(&run)
        .iter()
        .filter(|(_, s)| s["status"] == 200)
        .count();
    assert!(
        (5..=5 + 32).contains(&served),
        "{served} requests served on a connection limited to 5: {}",
        run["goaway"]
    );
    assert!(run["closed"].as_f64().is_some(), "{run}");
}
