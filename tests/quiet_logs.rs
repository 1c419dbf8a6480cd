//! Healthy traffic writes no ERROR line: kept-alive requests (Pingora's
//! pool-reuse misses), clients that go away mid-request and a binary
//! upgrade's hand-over are logged below ERROR, so an alert on ERROR lines
//! means something.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const CONFIG: &str = r#"
server: { listen: ["127.0.0.1:{port}"], threads: 2, grace_period: 1s, pid_file: "{dir}/t.pid", upgrade_sock: "{dir}/upgrade.sock" }
admin: { listen: "127.0.0.1:{admin}" }
log: { level: info, color: false, access_log: false }
upstreams:
  backend: { peers: ["UPSTREAM"], read_timeout: 10s }
routes:
  - { name: public, path_prefix: /public/, upstream: backend, auth: none }
"#;

fn error_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(" ERROR ")).collect()
}

#[test]
fn healthy_traffic_aborts_and_a_hand_over_log_no_error_line() {
    let echo = Echo::start();
    let mut t = Tollgate::start(&CONFIG.replace("UPSTREAM", &echo.addr()));

    // 3,000 requests over kept-alive connections, 4 at a time.
    let port = t.port;
    let clients: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = Client::connect(port).unwrap();
                for n in 0..750 {
                    let r = c.get(&format!("/public/{i}/{n}"), "").unwrap();
                    assert_eq!(r.status, 200, "{}", r.text());
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }

    // Clients that close while their request waits on the upstream.
    for n in 0..5 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", t.port)).unwrap();
        write!(
            s,
            "GET /public/abort/{n}?wait=300ms HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        .unwrap();
        drop(s);
    }
    // Each aborted request is finished (and counted) once the upstream answers.
    wait_for(
        "the aborted requests to finish",
        Duration::from_secs(20),
        || {
            let m = t.metrics();
            let done: f64 = m
                .lines()
                .filter(|l| {
                    l.starts_with("tollgate_requests_total{") && l.contains("route=\"public\"")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            (done >= 3005.0).then_some(())
        },
    );
    let log = t.proc.log_text();
    assert!(error_lines(&log).is_empty(), "{:#?}", error_lines(&log));

    // A binary upgrade: the new process waits on the socket, the old one
    // hands its listeners over and drains.
    let sock = t.dir.path().join("upgrade.sock");
    let (new_log, file) = log_file(t.dir.path(), "new.log");
    let child = Command::new(BIN)
        .args(["serve", "--upgrade", "-c"])
        .arg(&t.config_path)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let new = Proc {
        child,
        log: new_log,
    };
    wait_for(
        "the new process on the upgrade socket",
        Duration::from_secs(20),
        || sock.exists().then_some(()),
    );
    // Let it wait at least one retry of the hand-over, which Pingora logs.
    wait_for("the new process to wait", Duration::from_secs(20), || {
        new.log_text()
            .contains("No incoming socket transfer")
            .then_some(())
    });
    let load = Load::start(t.port, "/public/during", "", true, 200);
    t.proc.signal(libc::SIGQUIT);
    assert_eq!(t.proc.wait_exit(Duration::from_secs(40)), Some(0));
    let (ok, failures) = load.stop();
    assert!(ok > 0 && failures.is_empty(), "{ok} ok, {failures:?}");
    for (who, log) in [("old", t.proc.log_text()), ("new", new.log_text())] {
        assert!(
            error_lines(&log).is_empty(),
            "{who} process: {:#?}",
            error_lines(&log)
        );
    }
    assert!(new
        .log_text()
        .contains("INFO  pingora_core::server::transfer_fd] No incoming socket transfer"));
}
