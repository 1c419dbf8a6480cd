//! `server.client_ip_header`: behind a trusted proxy, the client address a
//! per-IP limit keys on is the one the proxy wrote, whatever the client
//! adds. The test process is the trusted proxy (127.0.0.0/8); through the
//! real binary, with a per-IP rule of 2 requests, in front of the echo
//! upstream that shows what it received.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use std::time::Duration;

fn config(upstream: &str, header: &str) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 1, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock", trusted_proxies: ["127.0.0.0/8"], {header} }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
log: {{ level: info, color: false }}
limits:
  rules:
    - {{ name: per-ip, key: client_ip, windows: [{{ requests: 2, window: 1h }}] }}
upstreams: {{ backend: {{ peers: ["{upstream}"] }} }}
routes:
  - {{ name: public, path_prefix: /public/, upstream: backend, auth: none }}
"#
    )
}

/// Four requests, each with the headers `headers(i)` writes; the statuses.
fn four(t: &Tollgate, headers: impl Fn(usize) -> String) -> Vec<u16> {
    (0..4)
        .map(|i| {
            let r = t.request(&format!(
                "GET /public/x HTTP/1.1\r\nHost: a\r\n{}Connection: close\r\n\r\n",
                headers(i)
            ));
            if r.status == 429 {
                r.assert_refusal(429, "rate_limited");
            }
            r.status
        })
        .collect()
}

const TWO_OF_FOUR: [u16; 4] = [200, 200, 429, 429];

#[test]
fn a_trusted_forwarded_header_cannot_be_outvoted_by_the_client() {
    let echo = Echo::start();
    let t = Tollgate::start(&config(&echo.addr(), "client_ip_header: forwarded"));
    avoid_window_edge(3600, Duration::from_secs(5));
    // The proxy sets Forwarded; the client rotates X-Forwarded-For.
    let statuses = four(&t, |i| {
        format!("X-Forwarded-For: 198.51.100.{i}\r\nForwarded: for=203.0.113.8\r\n")
    });
    assert_eq!(statuses, TWO_OF_FOUR);
    // Quoted IPv6 with a port, the client's junk elements left of it.
    let statuses = four(&t, |i| {
        format!("X-Forwarded-For: 198.51.100.{i}\r\nForwarded: for=junk{i};by=x, for=\"[2001:db8::1]:4711\";proto=https\r\n")
    });
    assert_eq!(statuses, TWO_OF_FOUR);

    // The upstream is told what was believed: the client's own
    // X-Forwarded-For is not passed on as if it were.
    let r = t.request("GET /public/y HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 198.51.100.77\r\nX-Real-IP: 198.51.100.78\r\nForwarded: for=\"192.0.2.44:1234\"\r\nConnection: close\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.text();
    assert!(
        body.contains("x-forwarded-for: 192.0.2.44, 127.0.0.1\n"),
        "{body}"
    );
    assert!(
        body.contains("forwarded: for=\"192.0.2.44:1234\"\n"),
        "{body}"
    );
    assert!(!body.contains("198.51.100.7"), "{body}");
}

#[test]
fn x_forwarded_for_entries_with_ports_and_junk_left_of_them() {
    let echo = Echo::start();
    let t = Tollgate::start(&config(&echo.addr(), ""));
    avoid_window_edge(3600, Duration::from_secs(5));
    // The proxy appends `ip:port`; the client puts junk in front.
    let statuses = four(&t, |i| {
        format!("X-Forwarded-For: junk-{i}, 203.0.113.8:4711\r\n")
    });
    assert_eq!(statuses, TWO_OF_FOUR);
    // The proxy appends a line of its own after the client's.
    let statuses = four(&t, |i| {
        format!("X-Forwarded-For: 198.51.100.{i}\r\nX-Forwarded-For: [2001:db8::7]:443\r\n")
    });
    assert_eq!(statuses, TWO_OF_FOUR);
    // The reverse of the review's case stays right: a trusted
    // X-Forwarded-For, the client rotating Forwarded and X-Real-IP.
    let statuses = four(&t, |i| {
        format!("X-Forwarded-For: 203.0.113.9\r\nForwarded: for=198.51.100.{i}\r\nX-Real-IP: 198.51.100.{i}\r\n")
    });
    assert_eq!(statuses, TWO_OF_FOUR);
    // Junk right of every address: the walk stops, the trusted peer is the
    // client (one key for all of them, here 127.0.0.1).
    let statuses = four(&t, |i| {
        format!("X-Forwarded-For: 198.51.100.{i}, unknown\r\n")
    });
    assert_eq!(statuses, TWO_OF_FOUR);

    let r = t.request("GET /public/y HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 192.0.2.50\r\nX-Real-IP: 198.51.100.78\r\nForwarded: for=198.51.100.79\r\nConnection: close\r\n\r\n");
    let body = r.text();
    assert!(
        body.contains("x-forwarded-for: 192.0.2.50, 127.0.0.1\n"),
        "{body}"
    );
    assert!(!body.contains("x-real-ip"), "{body}");
    assert!(!body.contains("forwarded: "), "{body}");
}

#[test]
fn x_real_ip_when_the_proxy_sets_that() {
    let echo = Echo::start();
    let t = Tollgate::start(&config(&echo.addr(), "client_ip_header: x-real-ip"));
    avoid_window_edge(3600, Duration::from_secs(5));
    let statuses = four(&t, |i| {
        format!("X-Forwarded-For: 198.51.100.{i}\r\nForwarded: for=198.51.100.{i}\r\nX-Real-IP: 203.0.113.10\r\n")
    });
    assert_eq!(statuses, TWO_OF_FOUR);
}

/// Headers other stacks read as the client's address, or as the path to
/// serve, are not passed on from a client: the upstream sees only what
/// tollgate vouches for, and none of them moves the rate-limit key.
#[test]
fn address_and_path_override_headers_from_a_client_do_not_pass() {
    let echo = Echo::start();
    // The test process is not a trusted proxy here.
    let t = Tollgate::start(
        &config(&echo.addr(), "client_ip_header: x-forwarded-for")
            .replace("127.0.0.0/8", "10.0.0.0/8"),
    );
    avoid_window_edge(3600, Duration::from_secs(5));
    let sent = |i: usize| {
        format!(
            "True-Client-IP: 198.51.100.{i}\r\nX-Client-IP: 198.51.100.{i}\r\n\
             CF-Connecting-IP: 198.51.100.{i}\r\nX_Forwarded_For: 198.51.100.{i}\r\n\
             X-Original-URL: /admin/{i}\r\nX-Rewrite-URL: /admin/{i}\r\n\
             X-HTTP-Method-Override: DELETE\r\nX-Method-Override: PUT\r\n\
             X-Forwarded-Port: 1{i}\r\nX-Forwarded-Prefix: /admin{i}\r\n"
        )
    };
    let r = t.request(&format!(
        "GET /public/y HTTP/1.1\r\nHost: a\r\n{}X-Request_Id: forged\r\nConnection: close\r\n\r\n",
        sent(9)
    ));
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.text().to_ascii_lowercase();
    assert!(body.contains("x-forwarded-for: 127.0.0.1\n"), "{body}");
    for gone in [
        "198.51.100",
        "/admin",
        "x_forwarded_for",
        "forged",
        "port: 19",
    ] {
        assert!(!body.contains(gone), "{gone}: {body}");
    }
    // That was the first of two; rotating them all gets one more.
    assert_eq!(four(&t, sent), [200, 429, 429, 429]);
}

/// One request from `source` (a loopback address), its status.
fn status_from(source: &str, port: u16) -> u16 {
    use std::io::{Read, Write};
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let from: std::net::SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&from.into()).unwrap();
    let to: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    socket.connect(&to.into()).unwrap();
    let mut stream: std::net::TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream
        .write_all(b"GET /public/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = stream.read_to_string(&mut out);
    out.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// On a dual-stack listener (`[::]:port`) IPv4 clients arrive as
/// IPv4-mapped IPv6 addresses: each is still its own client, not one /64
/// shared by every IPv4 caller.
#[test]
fn ipv4_clients_of_a_dual_stack_listener_are_keyed_apart() {
    let echo = Echo::start();
    let t = Tollgate::start(
        &config(&echo.addr(), "client_ip_header: x-forwarded-for")
            .replace("127.0.0.0/8", "10.0.0.0/8")
            .replace(
                "listen: [\"127.0.0.1:{port}\"]",
                "listen: [\"[::]:{port}\"]",
            ),
    );
    avoid_window_edge(3600, Duration::from_secs(5));
    let a: Vec<u16> = (0..3).map(|_| status_from("127.0.0.2", t.port)).collect();
    assert_eq!(a, [200, 200, 429]);
    let b: Vec<u16> = (0..3).map(|_| status_from("127.0.0.3", t.port)).collect();
    assert_eq!(b, [200, 200, 429]);
}
