//! The core proxy end to end: the real binary in front of the real echo upstream.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use std::time::Duration;

fn config(upstream: &str, extra: &str) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 1, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock" }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
log: {{ level: info, color: false }}
upstreams:
  backend: {{ peers: ["{upstream}"], read_timeout: 500ms }}
routes:
  - {{ name: public, path_prefix: /public/, upstream: backend, auth: none }}
  - {{ name: exact, path: /exact, methods: [POST], upstream: backend, auth: none }}
{extra}"#
    )
}

#[test]
fn forwards_with_request_id_and_forwarded_for() {
    let echo = Echo::start();
    let t = Tollgate::start(&config(&echo.addr(), ""));
    let r = t.get("/public/hello?x=1&y=2");
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.text();
    assert!(
        body.starts_with("GET /public/hello?x=1&y=2 HTTP/1.1"),
        "{body}"
    );
    assert!(body.contains("x-forwarded-for: 127.0.0.1\n"), "{body}");
    let id = r.header("x-request-id").expect("request id").to_string();
    assert_eq!(id.len(), 32);
    assert!(body.contains(&format!("x-request-id: {id}\n")), "{body}");

    // A client id is kept; a client's own X-Forwarded-For is not believed.
    let forged = "GET /public/x HTTP/1.1\r\nHost: a\r\nX-Request-Id: client-id-1\r\nX-Forwarded-For: 10.0.0.9\r\nX-Real-IP: 10.0.0.9\r\nConnection: close\r\n\r\n";
    let r = t.request(forged);
    assert_eq!(r.header("x-request-id"), Some("client-id-1"));
    let body = r.text();
    assert!(body.contains("x-request-id: client-id-1\n"), "{body}");
    assert!(body.contains("x-forwarded-for: 127.0.0.1\n"), "{body}");
    assert!(!body.contains("x-real-ip"), "{body}");

    // From a trusted proxy, the earlier hops are kept and appended to.
    let trusting = config(&echo.addr(), "")
        .replace("server: {", "server: { trusted_proxies: [\"127.0.0.0/8\"],");
    let t = Tollgate::start(&trusting);
    let body = t.request(forged).text();
    assert!(
        body.contains("x-forwarded-for: 10.0.0.9, 127.0.0.1\n"),
        "{body}"
    );
    // Only the header named by server.client_ip_header is believed
    // (tests/client_ip.rs): the default is X-Forwarded-For.
    assert!(!body.contains("x-real-ip"), "{body}");
}

#[test]
fn forwards_the_normalised_path_and_refuses_escapes() {
    let echo = Echo::start();
    // Dot segments and encoded slashes pass only where a route allows them.
    let permissive = config(&echo.addr(), "").replace(
        "path_prefix: /public/, upstream: backend, auth: none",
        "path_prefix: /public/, upstream: backend, auth: none, path_policy: permissive",
    );
    let t = Tollgate::start(&permissive);
    for (sent, forwarded) in [
        ("/public/a/../b//c", "/public/b/c"),
        ("/public/./%61bc", "/public/abc"),
        ("//public///x?q=/../", "/public/x?q=/../"),
        ("/other/../public/y", "/public/y"),
        ("/public/a%2fb", "/public/a%2Fb"),
    ] {
        let r = t.get(sent);
        assert_eq!(r.status, 200, "{sent}: {}", r.text());
        assert!(
            r.text().starts_with(&format!("GET {forwarded} HTTP/1.1")),
            "{sent} forwarded as {}",
            r.text().lines().next().unwrap_or("")
        );
    }
    for bad in ["/public/../../etc/passwd", "/public/%2e%2e/%2e%2e/x"] {
        t.get(bad).assert_refusal(400, "bad_path");
    }
    t.get("/public/%zz").assert_refusal(400, "bad_request");
    // A ".." that leaves the route is judged where it lands: no route there,
    // so no permissive policy either.
    t.get("/public/../secret").assert_refusal(400, "bad_path");
    // Under the default (strict), every dot form is refused.
    let t = Tollgate::start(&config(&echo.addr(), ""));
    t.get("/public/a/../b").assert_refusal(400, "bad_path");
    t.get("/public/a%2fb").assert_refusal(400, "bad_path");
    assert_eq!(t.get("//public///x").status, 200);
}

#[test]
fn routes_by_prefix_exact_path_and_method() {
    let echo = Echo::start();
    let t = Tollgate::start(&config(&echo.addr(), ""));
    t.get("/nothing-here").assert_refusal(404, "no_route");
    t.get("/exact").assert_refusal(404, "no_route"); // GET is not in methods
    let r = t.request(
        "POST /exact HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert_eq!(r.status, 200);
    assert!(r.text().contains("BodyLength: 5"), "{}", r.text());
}

#[test]
fn dead_upstream_is_a_502_json_and_counted() {
    let dead = free_port();
    let t = Tollgate::start(&config(&format!("127.0.0.1:{dead}"), ""));
    t.get("/public/x")
        .assert_refusal(502, "upstream_unavailable");
    t.wait_metric(
        r#"tollgate_upstream_errors_total{kind="connect_refused",upstream="backend"}"#,
        1.0,
    );
    t.wait_metric(
        r#"tollgate_requests_total{route="public",status="502"}"#,
        1.0,
    );
}

#[test]
fn slow_upstream_is_a_504_json() {
    let echo = Echo::start();
    let t = Tollgate::start(&config(&echo.addr(), ""));
    t.get("/public/slow?wait=3s")
        .assert_refusal(504, "upstream_timeout");
    t.wait_metric(
        r#"tollgate_upstream_errors_total{kind="read_timeout",upstream="backend"}"#,
        1.0,
    );
    // The process keeps serving.
    assert_eq!(t.get("/public/fast").status, 200);
}

#[test]
fn retries_once_on_another_peer_when_connecting_fails() {
    let echo = Echo::start();
    let dead = free_port();
    let template = config(&echo.addr(), "").replace(
        &format!("peers: [\"{}\"]", echo.addr()),
        &format!("peers: [\"127.0.0.1:{dead}\", \"{}\"]", echo.addr()),
    );
    let t = Tollgate::start(&template);
    for i in 0..6 {
        let r = t.get(&format!("/public/{i}"));
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
}

#[test]
fn upstream_connections_are_pooled() {
    let echo = Echo::start();
    let t = Tollgate::start(&config(&echo.addr(), ""));
    let remote = |r: Response| {
        r.text()
            .lines()
            .find_map(|l| l.strip_prefix("RemoteAddr: ").map(str::to_string))
            .expect("RemoteAddr line")
    };
    let mut c = Client::connect(t.port).unwrap();
    let first = remote(c.get("/public/1", "").unwrap());
    for i in 2..6 {
        assert_eq!(
            remote(c.get(&format!("/public/{i}"), "").unwrap()),
            first,
            "new upstream connection for request {i}"
        );
    }
}

#[test]
fn hop_by_hop_headers_are_not_forwarded() {
    let echo = Echo::start();
    let t = Tollgate::start(&config(&echo.addr(), ""));
    let r = t.request(
        "GET /public/x HTTP/1.1\r\nHost: a\r\nConnection: close, X-Private\r\nX-Private: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic abc\r\nTE: trailers\r\nX-Kept: yes\r\n\r\n",
    );
    let body = r.text().to_ascii_lowercase();
    assert!(body.contains("x-kept: yes"), "{body}");
    for h in ["x-private:", "keep-alive:", "proxy-authorization:", "te:"] {
        assert!(!body.contains(h), "{h} was forwarded:\n{body}");
    }
}

#[test]
fn refusals_keep_the_connection_alive() {
    let echo = Echo::start();
    let t = Tollgate::start(&config(&echo.addr(), ""));
    let mut c = Client::connect(t.port).unwrap();
    c.get("/missing", "")
        .unwrap()
        .assert_refusal(404, "no_route");
    assert_eq!(c.get("/public/after", "").unwrap().status, 200);
}

#[test]
fn health_and_readiness() {
    let echo = Echo::start();
    let t = Tollgate::start(&config(&echo.addr(), ""));
    let r = t.get("/health");
    assert_eq!((r.status, r.text().as_str()), (200, "OK"));
    assert_eq!(t.get("/ready").status, 200);

    // With Redis configured, ready follows Redis.
    let mut redis = Redis::start();
    let with_redis = config(
        &echo.addr(),
        &format!("redis: {{ url: \"{}\" }}\n", redis.url()),
    );
    let t = Tollgate::start(&with_redis);
    wait_for("ready with redis up", Duration::from_secs(10), || {
        (t.get("/ready").status == 200).then_some(())
    });
    redis.stop();
    wait_for("503 with redis down", Duration::from_secs(10), || {
        (t.get("/ready").status == 503).then_some(())
    });
    assert_eq!(t.get("/health").status, 200);
    redis.restart();
    wait_for("ready again", Duration::from_secs(10), || {
        (t.get("/ready").status == 200).then_some(())
    });
}

#[test]
fn health_path_from_the_environment() {
    let echo = Echo::start();
    let t = Tollgate::start_with_env(
        &config(&echo.addr(), "").replace("threads: 1,", "threads: 1, health_path: /live,"),
        &[("TOLLGATE_SERVER__READY_PATH", "/readyz")],
    );
    assert_eq!(t.get("/live").text(), "OK");
    assert_eq!(t.get("/readyz").text(), "ready");
    t.get("/ready").assert_refusal(404, "no_route");
}

#[test]
fn metrics_use_route_names_and_pass_promtool() {
    let echo = Echo::start();
    let t = Tollgate::start(&config(&echo.addr(), ""));
    t.get("/public/a/secret-looking-path");
    t.get("/nope/xyz");
    t.wait_metric(
        r#"tollgate_requests_total{route="public",status="200"}"#,
        1.0,
    );
    t.wait_metric(
        r#"tollgate_requests_total{route="_unmatched",status="404"}"#,
        1.0,
    );
    let m = t.metrics();
    assert!(
        m.contains(r#"tollgate_request_duration_seconds_bucket{route="public",le="0.5"}"#),
        "{m}"
    );
    assert!(m.contains(&format!(
        "tollgate_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    for family in [
        "tollgate_requests_total",
        "tollgate_request_duration_seconds",
        "tollgate_config_reloads_total",
        "tollgate_redis_errors_total",
        "tollgate_build_info",
    ] {
        assert!(m.contains(&format!("# TYPE {family} ")), "{family} missing");
    }
    assert!(
        !m.contains("secret-looking-path") && !m.contains("/nope"),
        "raw paths leaked into labels"
    );

    let file = t.dir.path().join("metrics.txt");
    std::fs::write(&file, &m).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .expect("promtool must be installed (make test installs the prometheus package)");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn access_log_lines_and_switch() {
    let echo = Echo::start();
    let t = Tollgate::start(&config(&echo.addr(), ""));
    let r = t.get("/public/logged");
    let id = r.header("x-request-id").unwrap().to_string();
    let line = wait_for("access line", Duration::from_secs(5), || {
        t.proc
            .log_text()
            .lines()
            .find(|l| l.contains(&id))
            .map(str::to_string)
    });
    for part in [
        "GET /public/logged",
        "route=public",
        "status=200",
        &format!("upstream={}", echo.addr()),
        "bytes=",
    ] {
        assert!(line.contains(part), "{part} missing from {line}");
    }

    let quiet = Tollgate::start(&config(&echo.addr(), "").replace(
        "color: false",
        "color: false, access_log: false, format: json",
    ));
    let r = quiet.get("/public/unlogged");
    let id = r.header("x-request-id").unwrap().to_string();
    quiet.get("/health");
    let text = quiet.proc.log_text();
    assert!(!text.contains(&id), "access log was off:\n{text}");
    for l in text.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["level"].is_string() && v["msg"].is_string(), "{l}");
    }
    assert!(
        text.lines().any(|l| l.starts_with('{')),
        "no JSON log lines:\n{text}"
    );
}

#[test]
fn sighup_swaps_routes_and_survives_a_bad_file() {
    let echo = Echo::start();
    let t = Tollgate::start(&config(&echo.addr(), ""));
    t.get("/v2/x").assert_refusal(404, "no_route");
    let extra = "  - { name: v2, path_prefix: /v2/, upstream: backend, auth: none }\n";
    t.rewrite_config(&config(&echo.addr(), extra));
    t.proc.signal(libc::SIGHUP);
    wait_for("new route", Duration::from_secs(10), || {
        (t.get("/v2/x").status == 200).then_some(())
    });
    t.wait_metric(r#"tollgate_config_reloads_total{result="success"}"#, 1.0);

    t.rewrite_config("routes: [ {name: broken");
    t.proc.signal(libc::SIGHUP);
    t.wait_metric(r#"tollgate_config_reloads_total{result="failure"}"#, 1.0);
    assert_eq!(t.get("/v2/x").status, 200, "old config must keep serving");
    assert!(t.proc.log_text().contains("config reload failed"));
}

#[test]
fn health_checks_take_a_dead_peer_out_of_rotation() {
    let echo = Echo::start();
    let dead = free_port();
    let template = config(&echo.addr(), "").replace(
        &format!("peers: [\"{}\"], read_timeout: 500ms", echo.addr()),
        &format!(
            "peers: [\"127.0.0.1:{dead}\", \"{}\"], read_timeout: 500ms, health_check_interval: 1s",
            echo.addr()
        ),
    );
    let t = Tollgate::start(&template);
    t.wait_metric(
        r#"tollgate_upstream_peers_healthy{upstream="backend"}"#,
        1.0,
    );
    // Out of rotation: no connection attempt to the dead peer any more.
    let before = metric_value(
        &t.metrics(),
        r#"tollgate_upstream_errors_total{kind="connect_refused",upstream="backend"}"#,
    )
    .unwrap_or(0.0);
    for i in 0..10 {
        assert_eq!(t.get(&format!("/public/{i}")).status, 200);
    }
    let after = metric_value(
        &t.metrics(),
        r#"tollgate_upstream_errors_total{kind="connect_refused",upstream="backend"}"#,
    )
    .unwrap_or(0.0);
    assert_eq!(after, before, "requests were still sent to the dead peer");
}
