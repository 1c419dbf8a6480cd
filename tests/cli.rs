//! The command line: `check` on every fixture, usage errors, start-up errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use std::path::Path;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/config");

#[test]
fn check_accepts_the_shipped_configs() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut files = vec![format!("{root}/conf/tollgate.yaml")];
    for dir in ["conf/examples", "tests/fixtures/config/valid"] {
        for entry in std::fs::read_dir(Path::new(root).join(dir)).expect("dir") {
            files.push(entry.unwrap().path().display().to_string());
        }
    }
    assert!(files.len() >= 3, "{files:?}");
    for f in files {
        let (code, out, err) = run_cli(&["check", "-c", &f], &[]);
        assert_eq!(code, 0, "{f}: {err}");
        assert!(out.contains("ok"), "{f}: {out}");
    }
}

#[test]
fn check_reports_each_invalid_fixture_with_its_key_path() {
    let mut seen = 0;
    for entry in std::fs::read_dir(format!("{FIXTURES}/invalid")).expect("fixtures") {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks '# expect:'", path.display()))
            .to_string();
        let (code, out, err) = run_cli(&["check", "-c", path.to_str().unwrap()], &[]);
        assert_eq!(code, 1, "{}: exit {code}, {out}{err}", path.display());
        assert!(
            err.lines().any(|l| l.starts_with(&expect)),
            "{}: expected a line starting with {expect:?}, got:\n{err}",
            path.display()
        );
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{err}"
        );
        seen += 1;
    }
    assert!(seen >= 10, "only {seen} fixtures");
}

#[test]
fn check_lists_every_problem_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("many.yaml");
    std::fs::write(
        &file,
        r#"
server: { threads: 0 }
upstreams: { b: { peers: ["127.0.0.1:1"], connect_timeout: forever } }
routes:
  - { name: a, path_prefix: /a/, upstream: nope, auth: none }
  - { name: b, path_prefix: /b/, upstream: b, auth: maybe }
"#,
    )
    .unwrap();
    let (code, _, err) = run_cli(&["check", "-c", file.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    for expected in [
        "server.threads: must be at least 1",
        "upstreams.b.connect_timeout: invalid duration \"forever\"",
        "routes[0].upstream: unknown upstream \"nope\"",
        "routes[1].auth: unknown variant `maybe`, expected `jwt` or `none`",
    ] {
        assert!(
            err.lines().any(|l| l.starts_with(expected)),
            "missing {expected:?} in:\n{err}"
        );
    }
}

#[test]
fn environment_overrides_are_validated_like_the_file() {
    let good = format!("{FIXTURES}/valid/minimal.yaml");
    let (code, _, err) = run_cli(
        &["check", "-c", &good],
        &[("TOLLGATE_SERVER__THREADS", "zero")],
    );
    assert_eq!(code, 1);
    assert!(err.starts_with("server.threads: invalid type"), "{err}");
    let (code, _, err) = run_cli(&["check", "-c", &good], &[("TOLLGATE_LOG__LEVEL", "loud")]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("log.level: unknown level \"loud\""),
        "{err}"
    );
    let (code, _, _) = run_cli(&["check", "-c", &good], &[("TOLLGATE_LOG__LEVEL", "debug")]);
    assert_eq!(code, 0);
}

#[test]
fn usage_and_start_up_errors_are_one_line_without_panics() {
    let (code, _, err) = run_cli(&["serve", "--no-such-flag"], &[]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run_cli(&["check", "-c", "/nonexistent/tollgate.yaml"], &[]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("/nonexistent/tollgate.yaml: cannot read config"),
        "{err}"
    );
    let (code, _, err) = run_cli(&["serve", "-c", "/nonexistent/tollgate.yaml"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot read config") && !err.contains("panicked"),
        "{err}"
    );

    // A port already taken: a clear message naming the key.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("busy.yaml");
    std::fs::write(
        &file,
        format!(
            "server: {{ listen: [\"127.0.0.1:{port}\"] }}\nadmin: {{ listen: \"127.0.0.1:{}\" }}\nupstreams: {{ b: {{ peers: [\"127.0.0.1:1\"] }} }}\nroutes: [{{ name: a, path_prefix: /, upstream: b, auth: none }}]\n",
            free_port()
        ),
    )
    .unwrap();
    let (code, _, err) = run_cli(&["serve", "-c", file.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "server.listen[0]: cannot listen on 127.0.0.1:{port}"
        )),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let (code, out, _) = run_cli(&["--version"], &[]);
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        format!("tollgate {}", env!("CARGO_PKG_VERSION"))
    );
}
