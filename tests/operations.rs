//! Zero-downtime operations, proven under load: SIGHUP reloads, a binary
//! upgrade (SIGQUIT + `serve --upgrade`), SIGTERM drain, a Redis outage.

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
fn binary_upgrade_hands_over_the_sockets_without_failing_a_request() {
    let echo = Echo::start();
    let mut old = Tollgate::start(&config(&echo.addr(), ""));
    let keep = Load::start(old.port, "/public/ka", "", true, 200);
    let fresh = Load::start(old.port, "/public/new", "", false, 200);
    std::thread::sleep(Duration::from_millis(300));

    let (log, file) = log_file(old.dir.path(), "new.log");
    let child = Command::new(BIN)
        .args(["serve", "--upgrade", "-c"])
        .arg(&old.config_path)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the new process");
    let new = Proc { child, log };
    let sock = old.dir.path().join("upgrade.sock");
    wait_for(
        "the new process to wait for the sockets",
        Duration::from_secs(20),
        || sock.exists().then_some(()),
    );
    old.proc.signal(libc::SIGQUIT);
    let code = old.proc.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0), "old process:\n{}", old.proc.log_text());
    std::thread::sleep(Duration::from_millis(500));
    assert_clean(keep.stop(), "keep-alive client");
    assert_clean(fresh.stop(), "new-connection client");
    // The new process serves on the same ports.
    assert_eq!(
        old.get("/public/after").status,
        200,
        "new process:\n{}",
        new.log_text()
    );
    assert!(old.metrics().contains("tollgate_build_info"));
}

#[test]
fn sigterm_lets_the_request_in_flight_finish() {
    let echo = Echo::start();
    let mut t = Tollgate::start(&config(&echo.addr(), ""));
    let port = t.port;
    let slow = std::thread::spawn(move || get(port, "/public/slow?wait=1500ms"));
    std::thread::sleep(Duration::from_millis(400));
    t.proc.signal(libc::SIGTERM);
    let r = slow
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
