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
    assert!(files.len() >= 10, "{files:?}");
    // The examples' relative certificate paths, as the README's recipes
    // make them, in the directory `check` runs in.
    let dir = tempfile::tempdir().unwrap();
    Certs::make(
        &dir.path().join("certs"),
        &["api.example.com", "www.example.com"],
    );
    Certs::make(
        &dir.path().join("upstream-ca"),
        &["server,localhost,127.0.0.1"],
    );
    for f in files {
        let out = std::process::Command::new(BIN)
            .args(["check", "-c", &f])
            .current_dir(dir.path())
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(0), "{f}: {stderr}");
        assert!(stdout.contains("ok"), "{f}: {stdout}");
    }
}

#[test]
fn check_reports_each_invalid_fixture_with_its_key_path() {
    let mut seen = 0;
    for entry in std::fs::read_dir(format!("{FIXTURES}/invalid")).expect("fixtures") {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        // One or more leading `# expect:` lines, each a line `check` prints.
        let expected: Vec<&str> = text
            .lines()
            .map_while(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(!expected.is_empty(), "{} lacks '# expect:'", path.display());
        let file = path.to_str().unwrap();
        let (code, out, err) = run_cli(&["check", "-c", file], &[]);
        assert_eq!(code, 1, "{file}: exit {code}, {out}{err}");
        // A problem of the file as a whole is prefixed with the file's name.
        let prefix = format!("{file}: ");
        let lines: Vec<&str> = err
            .lines()
            .map(|l| l.strip_prefix(prefix.as_str()).unwrap_or(l))
            .collect();
        for expect in expected {
            assert!(
                lines.iter().any(|l| l.starts_with(expect)),
                "{file}: expected a line starting with {expect:?}, got:\n{err}"
            );
        }
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{err}"
        );
        for rust in [
            "usize",
            "u64",
            "u16",
            "invalid type",
            "struct Raw",
            "unknown field",
        ] {
            assert!(!err.contains(rust), "{file}: Rust words in {err}");
        }
        seen += 1;
    }
    assert!(seen >= 25, "only {seen} fixtures");
}

#[test]
fn a_file_that_is_not_a_mapping_is_named() {
    let file = format!("{FIXTURES}/invalid/top_level_list.yaml");
    let (code, _, err) = run_cli(&["check", "-c", &file], &[]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        format!("{file}: expected a mapping of sections (server:, upstreams:, routes:, ...) at the top of the file, found a list")
    );
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
        "upstreams.b.connect_timeout: expected a duration like 30s (250ms, 5s, 1m, 24h, 1h30m), got \"forever\"",
        "routes[0].upstream: unknown upstream \"nope\"",
        "routes[1].auth: expected jwt or none, got \"maybe\"",
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
    let check = |env: &[(&str, &str)]| {
        let (code, _, err) = run_cli(&["check", "-c", &good], env);
        (code, err)
    };
    let (code, err) = check(&[("TOLLGATE_SERVER__THREADS", "zero")]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "server.threads (from TOLLGATE_SERVER__THREADS): expected a whole number, got \"zero\""
    );
    let (code, err) = check(&[("TOLLGATE_LOG__LEVEL", "loud")]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("log.level (from TOLLGATE_LOG__LEVEL): unknown level \"loud\""),
        "{err}"
    );
    let (code, _) = check(&[("TOLLGATE_LOG__LEVEL", "debug")]);
    assert_eq!(code, 0);
}

/// The issue's three cases: a bad value, an empty variable, a misspelt section.
#[test]
fn problems_from_the_environment_name_the_variable() {
    let good = format!("{FIXTURES}/valid/minimal.yaml");
    let check = |env: &[(&str, &str)]| {
        let (code, _, err) = run_cli(&["check", "-c", &good], env);
        assert_eq!(code, 1, "{env:?}: {err}");
        err.trim().to_string()
    };
    assert_eq!(
        check(&[("TOLLGATE_SERVER__THREADS", "abc")]),
        "server.threads (from TOLLGATE_SERVER__THREADS): expected a whole number, got \"abc\""
    );
    assert_eq!(
        check(&[("TOLLGATE_AUTH__JWT__SECRET", "")]),
        "auth.jwt.secret (from TOLLGATE_AUTH__JWT__SECRET): the variable is empty; unset it or give it a value"
    );
    let err = check(&[("TOLLGATE_SERVR__THREADS", "3")]);
    assert!(
        err.starts_with(
            "servr (from TOLLGATE_SERVR__THREADS): unknown key \"servr\" (did you mean \"server\"?)"
        ),
        "{err}"
    );
    // A value the checks after typing refuse names its variable too, and a
    // problem in the file beside it is still reported.
    assert_eq!(
        check(&[
            ("TOLLGATE_SERVER__THREADS", "0"),
            ("TOLLGATE_ROUTES__0__UPSTREAM", "billing")
        ]),
        "server.threads (from TOLLGATE_SERVER__THREADS): must be at least 1\n\
         routes[0].upstream (from TOLLGATE_ROUTES__0__UPSTREAM): unknown upstream \"billing\""
    );
    assert_eq!(
        check(&[("TOLLGATE_SERVER__H2C", "sometimes")]),
        "server.h2c (from TOLLGATE_SERVER__H2C): expected true or false, got \"sometimes\""
    );
    assert_eq!(
        check(&[("TOLLGATE_SERVER__GRACE_PERIOD", "5")]),
        "server.grace_period (from TOLLGATE_SERVER__GRACE_PERIOD): expected a duration like 30s, got \"5\": a unit is required (ms, s, m, h or d)"
    );
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

#[test]
fn token_issue_names_the_redis_it_could_not_reach_without_its_password() {
    let closed = free_port();
    let url = format!("redis://:hunter2@127.0.0.1:{closed}");
    let (code, out, err) = run_cli(&["token", "issue", "--secret", "s", "--redis", &url], &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(
        err.trim(),
        format!(
            "tollgate: cannot store the token in Redis at redis://:***@127.0.0.1:{closed}: Connection refused (os error 111)"
        )
    );
    assert!(
        !err.contains("hunter2") && !err.contains("token_store"),
        "{err}"
    );
}
