//! Child processes on free ports: spawning, signalling, waiting with deadlines.
#![allow(dead_code)]

use super::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// A port nothing listens on, picked at random below the kernel's ephemeral
/// range (32768 and up), so no outgoing connection can take it between now
/// and the moment a child binds it. Two tests picking the same port is left
/// to the starters, which retry with new ports when a bind fails.
pub fn free_port() -> u16 {
    loop {
        let port = 20_000 + (fastrand::u16(..) % 12_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Whether a child's log says it could not bind its port (another test
/// took it between `free_port` and the bind): then start again elsewhere.
pub fn lost_port_race(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("address already in use")
}

/// Polls `f` until it returns `Some`, or fails the test at the deadline.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_port(port: u16, what: &str) {
    wait_for(what, Duration::from_secs(20), || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    #[allow(unsafe_code)] // sending a signal has no safe std wrapper
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let status = wait_for("process exit", limit, || {
            self.child.try_wait().ok().flatten()
        });
        status.code()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn log_file(dir: &Path, name: &str) -> (PathBuf, std::fs::File) {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).expect("log file");
    (path, file)
}

/// Runs `tollgate` with arguments; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run tollgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
