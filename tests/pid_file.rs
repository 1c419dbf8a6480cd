//! `server.pid_file` through the binary: written in the foreground and by a
//! daemon, removed on SIGTERM, SIGINT and after SIGQUIT, and after a binary
//! upgrade owned by the new process (the old one leaves it alone).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

fn config(upstream: &str) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 1, grace_period: 1s, pid_file: "{{dir}}/tollgate.pid", upgrade_sock: "{{dir}}/upgrade.sock" }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
log: {{ level: info, color: false }}
upstreams:
  backend: {{ peers: ["{upstream}"] }}
routes:
  - {{ name: public, path_prefix: /public/, upstream: backend, auth: none }}
"#
    )
}

fn pid_in(path: &std::path::Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn wait_pid(path: &std::path::Path, pid: i32, what: &str) {
    wait_for(what, Duration::from_secs(20), || {
        (pid_in(path) == Some(pid)).then_some(())
    });
}

#[test]
fn the_foreground_process_writes_its_pid_and_removes_it_on_sigterm_and_sigint() {
    let echo = Echo::start();
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let mut t = Tollgate::start(&config(&echo.addr()));
        let pid_file = t.dir.path().join("tollgate.pid");
        wait_pid(&pid_file, t.proc.pid(), "the pid file");
        t.proc.signal(signal);
        let code = t.proc.wait_exit(Duration::from_secs(20));
        assert_eq!(code, Some(0), "{name}:\n{}", t.proc.log_text());
        assert!(
            !pid_file.exists(),
            "{name}: the pid file outlived the process"
        );
    }
}

#[test]
fn after_an_upgrade_the_new_process_owns_the_pid_file() {
    let echo = Echo::start();
    let mut old = Tollgate::start(&config(&echo.addr()));
    let pid_file = old.dir.path().join("tollgate.pid");
    wait_pid(&pid_file, old.proc.pid(), "the old process's pid file");

    let sock = old.dir.path().join("upgrade.sock");
    let (log, file) = log_file(old.dir.path(), "new.log");
    let child = Command::new(BIN)
        .args(["serve", "--upgrade", "-c"])
        .arg(&old.config_path)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut new = Proc { child, log };
    wait_for(
        "the new process on the upgrade socket",
        Duration::from_secs(20),
        || sock.exists().then_some(()),
    );
    // Waiting for the sockets, the new process does not claim the file yet.
    assert_eq!(pid_in(&pid_file), Some(old.proc.pid()));

    old.proc.signal(libc::SIGQUIT);
    wait_pid(&pid_file, new.pid(), "the new process's pid file");
    let code = old.proc.wait_exit(Duration::from_secs(40));
    assert_eq!(code, Some(0), "old process:\n{}", old.proc.log_text());
    assert_eq!(
        pid_in(&pid_file),
        Some(new.pid()),
        "the old process removed or rewrote its successor's pid file"
    );
    assert_eq!(old.get("/public/after").status, 200);

    new.signal(libc::SIGTERM);
    assert_eq!(
        new.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        new.log_text()
    );
    assert!(!pid_file.exists(), "the new process left its pid file");
}

#[test]
fn a_daemon_writes_its_pid_file_and_removes_it_on_sigterm() {
    let echo = Echo::start();
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let text = render(&config(&echo.addr()), port, admin, dir.path())
        .replace("log: {", "log: { access_log: false,")
        .replace(
            "threads: 1,",
            &format!(
                "threads: 1, error_log: \"{}/daemon.log\",",
                dir.path().display()
            ),
        );
    let path = dir.path().join("tollgate.yaml");
    std::fs::write(&path, text).unwrap();
    let (code, _, err) = run_cli(&["serve", "--daemon", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    let pid_file = dir.path().join("tollgate.pid");
    let pid = wait_for("the daemon's pid file", Duration::from_secs(20), || {
        pid_in(&pid_file)
    });
    wait_for("the daemon to serve", Duration::from_secs(20), || {
        get(port, "/public/x").ok().filter(|r| r.status == 200)
    });
    // SAFETY: kill(2) on the daemon this test started.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    wait_for(
        "the daemon to remove its pid file",
        Duration::from_secs(20),
        || (!pid_file.exists()).then_some(()),
    );
    wait_for(
        "the daemon to stop listening",
        Duration::from_secs(20),
        || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .is_err()
                .then_some(())
        },
    );
}

#[test]
fn a_pid_file_that_cannot_be_written_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let text = render(&config("127.0.0.1:1"), free_port(), free_port(), dir.path()).replace(
        &format!("{}/tollgate.pid", dir.path().display()),
        "/nonexistent/dir/t.pid",
    );
    let path = dir.path().join("tollgate.yaml");
    std::fs::write(&path, text).unwrap();
    let (code, _, err) = run_cli(&["serve", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("server.pid_file: cannot write /nonexistent/dir/t.pid"),
        "{err}"
    );
}
