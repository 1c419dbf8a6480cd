//! Zero-downtime operations, proven under load: SIGHUP reloads, a binary
//! upgrade (SIGQUIT + `serve --upgrade`), SIGTERM drain, a Redis outage.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

fn config(upstream: &str, extra_routes: &str) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 2, grace_period: 2s, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/upgrade.sock" }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
log: {{ level: info, color: false }}
upstreams:
  backend: {{ peers: ["{upstream}"], read_timeout: 10s }}
routes:
  - {{ name: public, path_prefix: /public/, upstream: backend, auth: none }}
{extra_routes}"#
    )
}

fn assert_clean((ok, failures): (usize, Vec<String>), what: &str) {
    eprintln!("{what}: {ok} answered, {} failed", failures.len());
    assert!(ok > 20, "{what}: only {ok} requests went through");
    assert!(
        failures.is_empty(),
        "{what}: {} failed of {}: {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[test]
fn reloads_under_load_fail_no_request() {
    let echo = Echo::start();
    let a = config(&echo.addr(), "");
    let b = config(
        &echo.addr(),
        "  - { name: v2, path_prefix: /v2/, upstream: backend, auth: none }\n",
    );
    let t = Tollgate::start(&a);
    let keep = Load::start(t.port, "/public/ka", "", true, 200);
    let fresh = Load::start(t.port, "/public/new", "", false, 200);
    for i in 1..=5 {
        t.rewrite_config(if i % 2 == 1 { &b } else { &a });
        t.proc.signal(libc::SIGHUP);
        t.wait_metric(
            r#"tollgate_config_reloads_total{result="success"}"#,
            i as f64,
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The last reload (5th, odd) installed config b.
    assert_eq!(t.get("/v2/x").status, 200);

    t.rewrite_config("server: { threads: -1 }\nroutes: []\n");
    t.proc.signal(libc::SIGHUP);
    t.wait_metric(r#"tollgate_config_reloads_total{result="failure"}"#, 1.0);
    assert_eq!(t.get("/v2/x").status, 200, "the old config keeps serving");
    std::thread::sleep(Duration::from_millis(200));
    assert_clean(keep.stop(), "keep-alive client");
    assert_clean(fresh.stop(), "new-connection client");
    assert!(t.proc.log_text().contains("config reload failed"));
}

#[test]
fn a_reload_that_changes_listeners_says_it_needs_an_upgrade() {
    let echo = Echo::start();
    let t = Tollgate::start(&config(&echo.addr(), ""));
    let changed = config(&echo.addr(), "").replace("threads: 2", "threads: 3");
    t.rewrite_config(&changed);
    t.proc.signal(libc::SIGHUP);
    t.wait_metric(r#"tollgate_config_reloads_total{result="success"}"#, 1.0);
    wait_for("needs-upgrade log line", Duration::from_secs(5), || {
        t.proc
            .log_text()
            .contains("server.threads changed and needs a graceful upgrade")
            .then_some(())
    });
}

#[test]
fn the_proxy_runs_without_transparent_huge_pages() {
    // With them, memory per limited key was about 60 bytes higher and RSS
    // at rest 31 MB instead of 18 (README, "Memory per key").
    let echo = Echo::start();
    let t = Tollgate::start(&config(&echo.addr(), ""));
    assert_eq!(t.get("/public/x").status, 200);
    let pid = t.proc.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("THP_enabled:"))
        .expect("the kernel reports THP_enabled in /proc/PID/status");
    assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
}

/// Starts `serve --upgrade` on the same config and waits until it listens
/// on the upgrade socket.
fn start_upgrade(t: &Tollgate, name: &str) -> Proc {
    let (log, file) = log_file(t.dir.path(), name);
    let sock = t.dir.path().join("upgrade.sock");
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(BIN)
        .args(["serve", "--upgrade", "-c"])
        .arg(&t.config_path)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the new process");
    wait_for(
        "the new process to wait for the sockets",
        Duration::from_secs(20),
        || sock.exists().then_some(()),
    );
    Proc { child, log }
}

fn assert_nothing_lost(report: &LoadReport, what: &str) {
    eprintln!(
        "{what}: {} answered, {} lost or failed, {} refused before sending, {} closed by the server",
        report.ok,
        report.failures.len(),
        report.refused,
        report.closed_by_server
    );
    assert!(
        report.ok > 20,
        "{what}: only {} requests went through",
        report.ok
    );
    assert!(
        report.failures.is_empty(),
        "{what}: {} lost or failed of {}: {:?}",
        report.failures.len(),
        report.ok + report.failures.len(),
        &report.failures[..report.failures.len().min(5)]
    );
}

#[test]
fn three_binary_upgrades_under_kept_alive_load_lose_nothing() {
    let echo = Echo::start();
    let mut t = Tollgate::start(&config(&echo.addr(), ""));
    // Clients that keep their connection until an answer says Connection: close.
    let loads: Vec<Load> = (0..4)
        .map(|_| Load::start(t.port, "/public/ka", "", true, 200))
        .collect();
    let fresh = Load::start(t.port, "/public/new", "", false, 200);
    wait_for("traffic", Duration::from_secs(10), || {
        metric_value(
            &t.metrics(),
            r#"tollgate_requests_total{route="public",status="200"}"#,
        )
        .filter(|n| *n > 400.0)
    });
    for round in 1..=3 {
        let new = start_upgrade(&t, &format!("new-{round}.log"));
        t.proc.signal(libc::SIGQUIT);
        let code = t.proc.wait_exit(Duration::from_secs(40));
        assert_eq!(
            code,
            Some(0),
            "old process of round {round}:\n{}",
            t.proc.log_text()
        );
        // The new process serves and becomes the one to upgrade next.
        wait_for("the new process to serve", Duration::from_secs(10), || {
            (t.get("/public/after").status == 200).then_some(())
        });
        t.proc = new;
    }
    for (i, load) in loads.into_iter().enumerate() {
        let report = load.report();
        assert_nothing_lost(&report, &format!("kept-alive client {i}"));
        assert!(
            report.closed_by_server >= 3,
            "client {i} was never told to reconnect: {report:?}"
        );
        assert_eq!(
            report.refused, 0,
            "client {i}: a connection was refused during an upgrade"
        );
    }
    let fresh = fresh.report();
    assert_nothing_lost(&fresh, "new-connection client");
    assert_eq!(
        fresh.refused, 0,
        "a connection was refused during an upgrade"
    );
    assert!(t.metrics().contains("tollgate_build_info"));
}

#[test]
fn sigterm_under_kept_alive_load_loses_nothing() {
    let echo = Echo::start();
    let mut t = Tollgate::start(&config(&echo.addr(), ""));
    let loads: Vec<Load> = (0..4)
        .map(|_| Load::start(t.port, "/public/ka", "", true, 200))
        .collect();
    wait_for("traffic", Duration::from_secs(10), || {
        metric_value(
            &t.metrics(),
            r#"tollgate_requests_total{route="public",status="200"}"#,
        )
        .filter(|n| *n > 400.0)
    });
    t.proc.signal(libc::SIGTERM);
    assert_eq!(
        t.proc.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        t.proc.log_text()
    );
    for (i, load) in loads.into_iter().enumerate() {
        let report = load.report();
        // After the stop, connecting is refused: nothing was sent, nothing lost.
        assert_nothing_lost(&report, &format!("kept-alive client {i}"));
        assert!(
            report.closed_by_server >= 1,
            "client {i} was never told to close: {report:?}"
        );
        assert!(
            report.refused >= 1,
            "client {i} never saw the listener close: {report:?}"
        );
    }
    let log = t.proc.log_text();
    assert!(log.contains("draining"), "{log}");
}

#[test]
fn sigterm_lets_the_request_in_flight_finish() {
    let slow = Recorder::start_slow(Duration::from_millis(1500));
    let mut t = Tollgate::start(&config(&slow.addr(), ""));
    let port = t.port;
    let in_flight = std::thread::spawn(move || get(port, "/public/slow"));
    // The upstream has the request: it is in flight now.
    wait_for(
        "the request to reach the upstream",
        Duration::from_secs(10),
        || (slow.hits() == 1).then_some(()),
    );
    t.proc.signal(libc::SIGTERM);
    let r = in_flight
        .join()
        .unwrap()
        .expect("the slow request got an answer");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(t.proc.wait_exit(Duration::from_secs(20)), Some(0));
}

#[test]
fn redis_outage_under_load_with_local_fallback() {
    let echo = Echo::start();
    let mut redis = Redis::start();
    let secret = "ops-secret-0123456789abcdef";
    let template = config(&echo.addr(), "").replace(
        "upstreams:",
        &format!(
            "redis: {{ url: \"{}\", timeout: 50ms, on_failure: local }}\nauth: {{ jwt: {{ algorithms: [HS256], secret: \"{secret}\" }} }}\nlimits: {{ sync: exact, default: [{{ requests: 1000000, window: 1m }}] }}\nupstreams:",
            redis.url()
        ),
    ).replace("auth: none }", "auth: jwt }");
    let t = Tollgate::start(&template);
    let token = pyjwt(
        serde_json::json!({"alg": "HS256", "key": secret, "claims": {
        "api_key": "ops-1", "exp": unix_now() + 3600, "allowed_routes": ["/*"]}}),
    );
    let header = format!("Authorization: Bearer {token}\r\n");
    wait_for("ready", Duration::from_secs(10), || {
        (t.get("/ready").status == 200).then_some(())
    });
    let load = Load::start(t.port, "/public/x", &header, true, 200);
    std::thread::sleep(Duration::from_millis(300));
    redis.stop();
    wait_for("503 while redis is down", Duration::from_secs(10), || {
        (t.get("/ready").status == 503).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    redis.restart();
    wait_for("200 once redis is back", Duration::from_secs(10), || {
        (t.get("/ready").status == 200).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_clean(load.stop(), "client during the outage");
    assert!(metric_value(&t.metrics(), "tollgate_redis_errors_total").unwrap_or(0.0) >= 1.0);
}

#[test]
fn stops_and_upgrades_end_as_soon_as_nothing_is_open() {
    // A long grace period: the process must not wait it out.
    let echo = Echo::start();
    let template = config(&echo.addr(), "").replace("grace_period: 2s", "grace_period: 30s");
    let mut t = Tollgate::start(&template);
    assert_eq!(t.get("/public/x").status, 200);
    let started = std::time::Instant::now();
    t.proc.signal(libc::SIGTERM);
    assert_eq!(t.proc.wait_exit(Duration::from_secs(40)), Some(0));
    let took = started.elapsed();
    eprintln!("SIGTERM with nothing open: exited after {took:?} (grace period 30s)");
    assert!(
        took < Duration::from_secs(10),
        "SIGTERM with no connection open took {took:?} (grace period 30s)"
    );
    assert!(t.proc.log_text().contains("stopped: no connection open"));

    // A request in flight is answered, then the process goes.
    let slow = Recorder::start_slow(Duration::from_millis(1500));
    let mut t =
        Tollgate::start(&config(&slow.addr(), "").replace("grace_period: 2s", "grace_period: 30s"));
    let port = t.port;
    let in_flight = std::thread::spawn(move || get(port, "/public/slow"));
    wait_for("the request in flight", Duration::from_secs(10), || {
        (slow.hits() == 1).then_some(())
    });
    let started = std::time::Instant::now();
    t.proc.signal(libc::SIGTERM);
    assert_eq!(in_flight.join().unwrap().unwrap().status, 200);
    assert_eq!(t.proc.wait_exit(Duration::from_secs(40)), Some(0));
    let took = started.elapsed();
    eprintln!("SIGTERM with a request in flight: exited after {took:?}");
    assert!(
        took < Duration::from_secs(10),
        "took {took:?} (grace period 30s)"
    );

    // SIGQUIT: the old process goes once it has handed over and drained.
    let mut t = Tollgate::start(&template);
    assert_eq!(t.get("/public/x").status, 200);
    let new = start_upgrade(&t, "new.log");
    let started = std::time::Instant::now();
    t.proc.signal(libc::SIGQUIT);
    assert_eq!(t.proc.wait_exit(Duration::from_secs(40)), Some(0));
    let took = started.elapsed();
    eprintln!("SIGQUIT: old process exited after {took:?} (grace period 30s)");
    assert!(
        took < Duration::from_secs(10),
        "took {took:?} (grace period 30s)"
    );
    t.proc = new;
    wait_for("the new process to serve", Duration::from_secs(10), || {
        (t.get("/public/after").status == 200).then_some(())
    });
}

#[test]
fn fresh_connections_across_upgrades_lose_nothing() {
    let echo = Echo::start();
    let template = config(&echo.addr(), "").replace("grace_period: 2s", "grace_period: 30s");
    let mut t = Tollgate::start(&template);
    // Clients that open a new connection for every request, as many
    // load balancers' health checks and short-lived clients do.
    let loads: Vec<Load> = (0..4)
        .map(|_| Load::start(t.port, "/public/new", "", false, 200))
        .collect();
    wait_for("traffic", Duration::from_secs(10), || {
        metric_value(
            &t.metrics(),
            r#"tollgate_requests_total{route="public",status="200"}"#,
        )
        .filter(|n| *n > 200.0)
    });
    for round in 1..=4 {
        let new = start_upgrade(&t, &format!("new-{round}.log"));
        t.proc.signal(libc::SIGQUIT);
        assert_eq!(
            t.proc.wait_exit(Duration::from_secs(40)),
            Some(0),
            "old process of round {round}:\n{}",
            t.proc.log_text()
        );
        t.proc = new;
        wait_for("the new process to serve", Duration::from_secs(10), || {
            (t.get("/public/after").status == 200).then_some(())
        });
    }
    for (i, load) in loads.into_iter().enumerate() {
        let report = load.report();
        assert_nothing_lost(&report, &format!("new-connection client {i}"));
        assert_eq!(
            report.refused, 0,
            "client {i}: a connection was refused during an upgrade"
        );
    }
}

#[test]
fn h2c_connections_accepted_during_a_handover_get_goaway_and_finish() {
    let slow = Recorder::start_slow(Duration::from_millis(1000));
    let t =
        Tollgate::start(&config(&slow.addr(), "").replace("threads: 2,", "threads: 2, h2c: true,"));
    // No new process waits on the upgrade socket: Pingora retries the
    // hand-over for about five seconds, and the old process, the only one
    // listening, keeps accepting meanwhile — each connection below is
    // accepted after its drain began.
    t.proc.signal(libc::SIGQUIT);
    wait_for("the drain to begin", Duration::from_secs(10), || {
        t.proc.log_text().contains("draining:").then_some(())
    });
    let run = h2_peer(
        t.port,
        &[
            "--connections",
            "10",
            "--path",
            "/public/slow",
            "--wait",
            "15",
        ],
    );
    for c in run["connections"].as_array().unwrap() {
        let answer = &c["answers"][0];
        assert_eq!(answer["status"], 200, "{c}");
        assert_eq!(
            answer["complete"], true,
            "the request in flight was cut: {c}"
        );
        assert_eq!(
            answer["goaway_before_end"], true,
            "no GOAWAY before the answer: {c}"
        );
        let goaway = c["goaway"][0]["at"].as_f64().unwrap();
        assert!(goaway < answer["at"].as_f64().unwrap(), "{c}");
        assert!(
            c["closed"].as_f64().is_some(),
            "the connection was not closed: {c}"
        );
    }
    assert_eq!(slow.hits(), 10);
}
