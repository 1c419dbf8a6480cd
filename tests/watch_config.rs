//! `server.watch_config` and config paths through symlinks, the way a
//! Kubernetes ConfigMap volume updates them: a new timestamped directory,
//! `..data` swapped to it, the old directory deleted.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

fn config(upstream: &str, watch: bool, v2: bool, tls: &str) -> String {
    let v2 = if v2 {
        "  - { name: v2, path_prefix: /v2/, upstream: backend, auth: none }\n"
    } else {
        ""
    };
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 1, grace_period: 1s, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock", watch_config: {watch}{tls} }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
log: {{ level: info, color: false, access_log: false }}
upstreams:
  backend: {{ peers: ["{upstream}"] }}
routes:
  - {{ name: public, path_prefix: /public/, upstream: backend, auth: none }}
{v2}"#
    )
}

/// What the kubelet does to a ConfigMap volume on an update.
fn swap(root: &Path, old: &str, new: &str, text: &str) {
    std::fs::create_dir(root.join(new)).unwrap();
    std::fs::write(root.join(new).join("tollgate.yaml"), text).unwrap();
    symlink(new, root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join(old)).unwrap();
}

/// A ConfigMap-style volume holding `text`; returns the config path
/// (`<dir>/config/tollgate.yaml` -> `..data/tollgate.yaml` -> `..2026_a/...`).
fn configmap(dir: &Path, text: &str) -> std::path::PathBuf {
    let root = dir.join("config");
    std::fs::create_dir_all(root.join("..2026_a")).unwrap();
    std::fs::write(root.join("..2026_a/tollgate.yaml"), text).unwrap();
    symlink("..2026_a", root.join("..data")).unwrap();
    symlink("..data/tollgate.yaml", root.join("tollgate.yaml")).unwrap();
    root.join("tollgate.yaml")
}

fn start(template: &str) -> (Tollgate, String) {
    let dir = tempfile::tempdir().unwrap();
    let ports = (free_port(), free_port());
    let render = |t: &str| render(t, ports.0, ports.1, dir.path());
    let path = configmap(dir.path(), &render(template));
    let rendered = dir.path().display().to_string();
    (Tollgate::start_at(dir, path, ports, &[]), rendered)
}

#[test]
fn a_configmap_swap_reloads_with_no_failed_request() {
    let echo = Echo::start();
    let (t, dir) = start(&config(&echo.addr(), true, false, ""));
    assert_eq!(t.get("/v2/x").status, 404);
    let loads: Vec<Load> = (0..2)
        .map(|_| Load::start(t.port, "/public/during", "", true, 200))
        .collect();
    wait_for("traffic", Duration::from_secs(10), || {
        metric_value(
            &t.metrics(),
            r#"tollgate_requests_total{route="public",status="200",protocol="http1"}"#,
        )
        .filter(|n| *n > 50.0)
    });

    let text = render(
        &config(&echo.addr(), true, true, ""),
        t.port,
        t.admin_port,
        Path::new(&dir),
    );
    swap(
        &Path::new(&dir).join("config"),
        "..2026_a",
        "..2026_b",
        &text,
    );
    wait_for("the new route", Duration::from_secs(10), || {
        (t.get("/v2/x").status == 200).then_some(())
    });
    let metrics = t.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            r#"tollgate_config_reloads_total{result="success"}"#
        ),
        Some(1.0),
        "one swap, one reload"
    );
    assert_eq!(
        metric_value(
            &metrics,
            r#"tollgate_config_reloads_total{result="failure"}"#
        ),
        Some(0.0)
    );
    // A second update of the same volume is seen as well.
    let text = render(
        &config(&echo.addr(), true, false, ""),
        t.port,
        t.admin_port,
        Path::new(&dir),
    );
    swap(
        &Path::new(&dir).join("config"),
        "..2026_b",
        "..2026_c",
        &text,
    );
    wait_for("the route to go", Duration::from_secs(10), || {
        (t.get("/v2/x").status == 404).then_some(())
    });
    for (i, load) in loads.into_iter().enumerate() {
        let (ok, failures) = load.stop();
        eprintln!("client {i}: {ok} answered, {} failed", failures.len());
        assert!(ok > 50, "client {i}: only {ok} requests");
        assert!(failures.is_empty(), "client {i}: {failures:?}");
    }
    assert!(
        t.proc
            .log_text()
            .contains("changed: reloading (server.watch_config)"),
        "{}",
        t.proc.log_text()
    );
}

#[test]
fn a_sighup_after_a_swap_reads_the_new_target_without_watch_config() {
    let echo = Echo::start();
    let (t, dir) = start(&config(&echo.addr(), false, false, ""));
    let text = render(
        &config(&echo.addr(), false, true, ""),
        t.port,
        t.admin_port,
        Path::new(&dir),
    );
    swap(
        &Path::new(&dir).join("config"),
        "..2026_a",
        "..2026_b",
        &text,
    );
    // Nothing watches: the old config serves until told.
    assert_eq!(t.get("/v2/x").status, 404);
    t.proc.signal(libc::SIGHUP);
    t.wait_metric(r#"tollgate_config_reloads_total{result="success"}"#, 1.0);
    assert_eq!(t.get("/v2/x").status, 200, "{}", t.proc.log_text());
    assert!(!t.proc.log_text().contains("cannot read config"));
}

/// Certificates from a Kubernetes Secret volume: the same `..data` swap.
#[test]
fn a_certificate_swapped_in_its_volume_is_served_without_a_signal() {
    let echo = Echo::start();
    let made = tempfile::tempdir().unwrap();
    let certs = Certs::make(made.path(), &["server,127.0.0.1,localhost"]);
    certs.run(&["--serial-tag", "v2", "server,127.0.0.1,localhost"]);
    let volume = tempfile::tempdir().unwrap();
    let root = volume.path();
    let fill = |dir: &str, stem: &str| {
        std::fs::create_dir(root.join(dir)).unwrap();
        std::fs::copy(certs.cert(stem), root.join(dir).join("tls.crt")).unwrap();
        std::fs::copy(certs.key(stem), root.join(dir).join("tls.key")).unwrap();
    };
    fill("..2026_a", "server");
    symlink("..2026_a", root.join("..data")).unwrap();
    symlink("..data/tls.crt", root.join("tls.crt")).unwrap();
    symlink("..data/tls.key", root.join("tls.key")).unwrap();

    let tls_port = free_port();
    let tls = format!(
        r#", tls: [{{ listen: "127.0.0.1:{tls_port}", certificates: [{{ cert_file: "{0}/tls.crt", key_file: "{0}/tls.key" }}] }}]"#,
        root.display()
    );
    let (t, _dir) = start(&config(&echo.addr(), true, false, &tls));
    let first = TlsClient::connect(tls_port, &certs.ca(), &[]).handshake["serial"].clone();
    assert!(!first.is_null(), "{first}");

    fill("..2026_b", "server-v2");
    symlink("..2026_b", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2026_a")).unwrap();
    let second = wait_for("the new certificate", Duration::from_secs(10), || {
        let serial = TlsClient::connect(tls_port, &certs.ca(), &[]).handshake["serial"].clone();
        (!serial.is_null() && serial != first).then_some(serial)
    });
    eprintln!("serial {first} -> {second}");
    let metrics = t.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            r#"tollgate_config_reloads_total{result="failure"}"#
        ),
        Some(0.0),
        "{}",
        t.proc.log_text()
    );
}
