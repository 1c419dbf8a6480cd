//! Test harness: real processes (tollgate, its echo upstream, redis-server) on
//! free ports, and a raw HTTP/1.1 client that sends paths exactly as written.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
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

fn wait_port(port: u16, what: &str) {
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

pub struct Echo {
    pub port: u16,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl Echo {
    pub fn start() -> Echo {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let (log, file) = log_file(dir.path(), "echo.log");
        let child = Command::new(BIN)
            .args(["echo", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn tollgate echo");
        let proc = Proc { child, log };
        wait_port(port, "echo upstream");
        Echo {
            port,
            _proc: proc,
            _dir: dir,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

pub struct Redis {
    pub port: u16,
    pub proc: Option<Proc>,
    dir: tempfile::TempDir,
}

impl Redis {
    /// Starts a private redis-server. A missing redis-server fails the test:
    /// a suite that skips its Redis tests proves nothing.
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Redis {
            port: free_port(),
            proc: None,
            dir,
        };
        r.restart();
        r
    }

    pub fn restart(&mut self) {
        let (log, file) = log_file(self.dir.path(), "redis.log");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(self.dir.path())
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (run `make test`, which installs it)");
        self.proc = Some(Proc { child, log });
        wait_port(self.port, "redis-server");
    }

    pub fn stop(&mut self) {
        self.proc = None;
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs `redis-cli` against this server; returns its trimmed output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// A Redis Cluster of `n` masters (no replicas), each a private
/// redis-server on free ports, created with `redis-cli --cluster create`.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    procs: Vec<Proc>,
    dir: tempfile::TempDir,
}

impl RedisCluster {
    pub fn start(n: usize) -> RedisCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ports = Vec::new();
        let mut procs = Vec::new();
        for i in 0..n {
            let (port, bus) = (free_port(), free_port());
            let node_dir = dir.path().join(format!("node{i}"));
            std::fs::create_dir(&node_dir).expect("node dir");
            let (log, file) = log_file(dir.path(), &format!("redis-{i}.log"));
            let child = Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--cluster-port",
                    &bus.to_string(),
                ])
                .args(["--bind", "127.0.0.1", "--cluster-enabled", "yes"])
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(&node_dir)
                .stdout(file)
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (run `make test`, which installs it)");
            procs.push(Proc { child, log });
            wait_port(port, "redis-server (cluster node)");
            ports.push(port);
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { ports, procs, dir };
        wait_for(
            "cluster_state:ok on every node",
            Duration::from_secs(20),
            || {
                cluster
                    .ports
                    .iter()
                    .all(|&p| {
                        cluster
                            .cli(p, &["cluster", "info"])
                            .contains("cluster_state:ok")
                    })
                    .then_some(())
            },
        );
        cluster
    }

    /// `redis.cluster` as the config takes it.
    pub fn urls_yaml(&self) -> String {
        let urls: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("\"redis://127.0.0.1:{p}\""))
            .collect();
        format!("[{}]", urls.join(", "))
    }

    /// Runs `redis-cli` against one node; returns its trimmed output.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// How many keys each node holds.
    pub fn key_counts(&self) -> Vec<u64> {
        self.ports
            .iter()
            .map(|&p| self.cli(p, &["dbsize"]).parse().unwrap_or(0))
            .collect()
    }
}

pub struct Tollgate {
    pub port: u16,
    pub admin_port: u16,
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

/// Fills `{port}`, `{admin}`, `{dir}` in a config template.
pub fn render(template: &str, port: u16, admin: u16, dir: &Path) -> String {
    template
        .replace("{port}", &port.to_string())
        .replace("{admin}", &admin.to_string())
        .replace("{dir}", &dir.display().to_string())
}

impl Tollgate {
    pub fn start(template: &str) -> Tollgate {
        Self::start_with_env(template, &[])
    }

    pub fn start_with_env(template: &str, env: &[(&str, &str)]) -> Tollgate {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let admin_port = free_port();
        let config_path = dir.path().join("tollgate.yaml");
        std::fs::write(&config_path, render(template, port, admin_port, dir.path()))
            .expect("write config");
        let (log, file) = log_file(dir.path(), "tollgate.log");
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "-c"])
            .arg(&config_path)
            .stdout(file.try_clone().expect("log"))
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn tollgate serve");
        let mut t = Tollgate {
            port,
            admin_port,
            proc: Proc { child, log },
            dir,
            config_path,
        };
        t.wait_healthy();
        t
    }

    /// Waits until both listeners answer (whatever the configured probe paths).
    pub fn wait_healthy(&mut self) {
        let (port, admin) = (self.port, self.admin_port);
        let proc = &mut self.proc;
        wait_for("tollgate listeners", Duration::from_secs(20), || {
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!("tollgate exited early ({status}):\n{}", proc.log_text());
            }
            get(admin, "/metrics").ok().filter(|r| r.status == 200)?;
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn get(&self, path: &str) -> Response {
        get(self.port, path).expect("request to tollgate")
    }

    pub fn request(&self, raw: &str) -> Response {
        request(self.port, raw).expect("request to tollgate")
    }

    pub fn metrics(&self) -> String {
        get(self.admin_port, "/metrics").expect("metrics").text()
    }

    /// Waits until a series reaches `value` (request metrics are recorded
    /// just after the answer is sent, so a scrape can beat them).
    pub fn wait_metric(&self, series: &str, value: f64) {
        let mut last = String::new();
        let found = (0..250).any(|_| {
            last = self.metrics();
            let hit = metric_value(&last, series) == Some(value);
            if !hit {
                std::thread::sleep(Duration::from_millis(20));
            }
            hit
        });
        assert!(found, "{series} never reached {value}:\n{last}");
    }

    /// Writes a new config (same ports) and sends SIGHUP.
    pub fn rewrite_config(&self, template: &str) {
        std::fs::write(
            &self.config_path,
            render(template, self.port, self.admin_port, self.dir.path()),
        )
        .expect("write config");
    }
}

/// Sends `per_instance` requests for `/api/x` with `token` to each instance
/// at once (one keep-alive connection each); returns (admitted, limited).
pub fn hammer(instances: &[Tollgate], token: &str, per_instance: usize) -> (usize, usize) {
    let header = format!("Authorization: Bearer {token}\r\n");
    let handles: Vec<_> = instances
        .iter()
        .map(|t| {
            let (port, header) = (t.port, header.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(port).expect("connect");
                let (mut ok, mut limited) = (0, 0);
                for _ in 0..per_instance {
                    match c.get("/api/x", &header).expect("response").status {
                        200 => ok += 1,
                        429 => limited += 1,
                        s => panic!("unexpected status {s}"),
                    }
                }
                (ok, limited)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
}

/// An admin API call authenticated with `admin_token`.
pub fn admin_call(
    t: &Tollgate,
    admin_token: &str,
    method: &str,
    path: &str,
    body: &str,
) -> Response {
    request(
        t.admin_port,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {admin_token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .expect("admin request")
}

/// Reads a metric sample's value, e.g. `tollgate_requests_total{route="a",status="200"}`.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// Asserts the SPEC's refusal shape and returns the error code.
    pub fn assert_refusal(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert_eq!(self.header("content-type"), Some("application/json"));
        assert!(self.header("x-request-id").is_some(), "no x-request-id");
        let v = self.json();
        assert_eq!(v["error"], code, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
}

pub fn get(port: u16, path: &str) -> std::io::Result<Response> {
    request(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
    )
}

/// Sends `raw` bytes as they are and reads one response.
pub fn request(port: u16, raw: &str) -> std::io::Result<Response> {
    let mut c = Client::connect(port)?;
    c.send_raw(raw.as_bytes())?;
    c.read_response()
}

/// One keep-alive connection.
pub struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(port: u16) -> std::io::Result<Client> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        Ok(Client {
            reader: BufReader::new(stream),
        })
    }

    pub fn send_raw(&mut self, raw: &[u8]) -> std::io::Result<()> {
        self.reader.get_mut().write_all(raw)
    }

    pub fn get(&mut self, path: &str, extra_headers: &str) -> std::io::Result<Response> {
        self.send_raw(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra_headers}\r\n").as_bytes(),
        )?;
        self.read_response()
    }

    pub fn read_response(&mut self) -> std::io::Result<Response> {
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            ));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(&format!("bad status line {line:?}")))?;
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let mut body = Vec::new();
        if let Some(len) = headers.get("content-length") {
            let len: usize = len.parse().map_err(|_| bad("bad content-length"))?;
            body.resize(len, 0);
            self.reader.read_exact(&mut body)?;
        } else if headers
            .get("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let mut size = String::new();
                self.reader.read_line(&mut size)?;
                let size = usize::from_str_radix(size.trim(), 16).map_err(|_| bad("chunk size"))?;
                let mut chunk = vec![0; size + 2];
                self.reader.read_exact(&mut chunk)?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else if status >= 200 && status != 204 && status != 304 {
            self.reader.read_to_end(&mut body)?;
        }
        Ok(Response {
            status,
            headers,
            body,
        })
    }
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

/// Mints a token with PyJWT (tests/support/mint.py).
pub fn pyjwt(request: serde_json::Value) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/mint.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 must be installed (make test installs PyJWT)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request.to_string().as_bytes())
        .expect("write to mint.py");
    let out = child.wait_with_output().expect("mint.py");
    assert!(
        out.status.success(),
        "mint.py failed (is PyJWT installed? make test installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An upstream in the test process that counts the requests reaching it and
/// keeps the last request head it saw.
pub struct Recorder {
    pub port: u16,
    pub count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub last: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Recorder {
    pub fn start() -> Recorder {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let last = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (c, l) = (count.clone(), last.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (c, l) = (c.clone(), l.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream);
                    loop {
                        let mut head = String::new();
                        loop {
                            let mut line = String::new();
                            match reader.read_line(&mut line) {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            }
                            if line == "\r\n" {
                                break;
                            }
                            head.push_str(&line);
                        }
                        let len = head
                            .lines()
                            .find_map(|h| {
                                let (k, v) = h.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        let mut body = vec![0; len];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        c.fetch_add(1, Ordering::SeqCst);
                        *l.lock().unwrap() = head;
                        let _ = reader
                            .get_mut()
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                    }
                });
            }
        });
        Recorder { port, count, last }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn hits(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn last_head(&self) -> String {
        self.last.lock().unwrap().clone()
    }
}

/// Fixed windows start at multiples of their length since the epoch. A test
/// that counts within one window waits, when the next boundary is closer than
/// `margin`, until it has passed — so the count cannot be split by a reset.
pub fn avoid_window_edge(window_secs: u64, margin: Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let window = Duration::from_secs(window_secs);
    let into = Duration::from_nanos((now.as_nanos() % window.as_nanos()) as u64);
    let left = window - into;
    if left < margin {
        std::thread::sleep(left + Duration::from_millis(50));
    }
}

/// A client that keeps sending requests until stopped, like a real one:
/// over a keep-alive connection (re-opened, and the request retried once,
/// when the server closed it between requests) or a new connection each
/// time. Every answer must have the expected status.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<(usize, Vec<String>)>,
}

impl Load {
    pub fn start(port: u16, path: &str, headers: &str, keep_alive: bool, expect: u16) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let (path, headers) = (path.to_string(), headers.to_string());
        let handle = std::thread::spawn(move || {
            let mut ok = 0usize;
            let mut failures = Vec::new();
            let mut conn: Option<Client> = None;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let extra = if keep_alive {
                    headers.clone()
                } else {
                    format!("{headers}Connection: close\r\n")
                };
                let attempt = |reused: bool,
                               conn: &mut Option<Client>|
                 -> Result<Response, String> {
                    if conn.is_none() {
                        *conn = Some(Client::connect(port).map_err(|e| format!("connect: {e}"))?);
                    }
                    let c = conn.as_mut().ok_or("no connection")?;
                    c.get(&path, &extra).map_err(|e| {
                        format!("{} connection: {e}", if reused { "reused" } else { "new" })
                    })
                };
                let reused = conn.is_some();
                let result = match attempt(reused, &mut conn) {
                    Err(_) if reused => {
                        conn = None;
                        attempt(false, &mut conn)
                    }
                    other => other,
                };
                match result {
                    Ok(r) if r.status == expect => ok += 1,
                    Ok(r) => failures.push(format!("status {}: {}", r.status, r.text())),
                    Err(e) => failures.push(e),
                }
                if !keep_alive {
                    conn = None;
                }
            }
            (ok, failures)
        });
        Load { stop, handle }
    }

    /// Stops the client; returns (answers as expected, failures).
    pub fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().expect("load thread")
    }
}

/// The public JWK of a PEM public key, made by PyJWT (tests/support/jwk.py).
pub fn jwk(pem: &str, kid: &str, alg: &str) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/jwk.py");
    let out = Command::new("python3")
        .args([script, pem, kid, alg])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "jwk.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("jwk JSON")
}

/// A tiny HTTP server in the test process that answers every request with
/// the current body and status, and counts requests.
pub struct JsonServer {
    pub port: u16,
    pub body: std::sync::Arc<std::sync::Mutex<String>>,
    pub status: std::sync::Arc<std::sync::atomic::AtomicU16>,
    pub hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl JsonServer {
    pub fn start(body: &str) -> JsonServer {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = JsonServer {
            port,
            body: std::sync::Arc::new(std::sync::Mutex::new(body.to_string())),
            status: std::sync::Arc::new(std::sync::atomic::AtomicU16::new(200)),
            hits: std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        };
        let (body, status, hits) = (
            server.body.clone(),
            server.status.clone(),
            server.hits.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream);
                loop {
                    let mut line = String::new();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) if line == "\r\n" => {
                            hits.fetch_add(1, Ordering::SeqCst);
                            let text = body.lock().unwrap().clone();
                            let code = status.load(Ordering::SeqCst);
                            let _ = reader.get_mut().write_all(
                                format!(
                                    "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
                                    text.len()
                                )
                                .as_bytes(),
                            );
                        }
                        Ok(_) => {}
                    }
                }
            }
        });
        server
    }

    pub fn set(&self, body: &str, status: u16) {
        *self.body.lock().unwrap() = body.to_string();
        self.status
            .store(status, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// HTTPS in front of a plain test server (tests/support/tls_front.py, on
/// Python's ssl module), with a certificate for 127.0.0.1 from a private CA.
pub struct TlsFront {
    pub port: u16,
    dir: tempfile::TempDir,
    _proc: Proc,
}

impl TlsFront {
    pub fn start(backend_port: u16) -> TlsFront {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/tls_front.py");
        let (log, file) = log_file(dir.path(), "tls_front.log");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(dir.path())
            .arg(backend_port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .expect("python3 must be installed (make test installs it)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("tls_front.py output");
        let proc = Proc { child, log };
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "tls_front.py did not start (is python3-cryptography installed?): {}",
                    proc.log_text()
                )
            });
        TlsFront {
            port,
            dir,
            _proc: proc,
        }
    }

    /// The private CA that signed the server's certificate.
    pub fn ca_file(&self) -> String {
        self.dir.path().join("ca.pem").display().to_string()
    }
}
