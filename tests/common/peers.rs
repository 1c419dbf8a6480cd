//! Real gRPC and WebSocket peers (clients and servers) and a private CA, on
//! the Python scripts in tests/support: grpc_peer.py (grpcio), ws_peer.py
//! (websockets) and certs.py (cryptography). Independent implementations,
//! so the proxy is tested against what real clients and servers do.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::{log_file, Proc};

const GRPC_PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/grpc_peer.py");
const WS_PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/ws_peer.py");
const CERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/certs.py");

const MISSING: &str = "python3 with grpcio, websockets, cryptography and h2 is needed: \
     run `scripts/setup.sh test` (it makes .venv from tests/requirements.txt)";

fn python(script: &str) -> Command {
    let mut cmd = Command::new(super::python3());
    cmd.arg(script);
    cmd
}

/// Runs a script to completion; panics (with its stderr) unless it exits 0.
fn run(mut cmd: Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run python3 ({e}). {MISSING}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stderr}{}",
        out.status,
        hint(&stderr)
    );
    out
}

fn hint(stderr: &str) -> String {
    if stderr.contains("ModuleNotFoundError") || stderr.contains("ImportError") {
        format!("\n{MISSING}")
    } else {
        String::new()
    }
}

fn json_out(out: &Output, what: &str) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: output is not JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Starts a server script that prints "PORT n" then serves until its stdin
/// closes (the pipe stays open inside the `Child` until the `Proc` drops).
fn start_server(mut cmd: Command, dir: &Path, name: &str) -> (Proc, u16) {
    let (log, file) = log_file(dir, &format!("{name}.log"));
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("{name}: cannot run python3 ({e}). {MISSING}"));
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line);
    let proc = Proc { child, log };
    let port = line
        .trim()
        .strip_prefix("PORT ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| {
            let text = proc.log_text();
            panic!("{name} did not start:\n{text}{}", hint(&text))
        });
    (proc, port)
}

/// A grpcio server (tests/support/grpc_peer.py) with service
/// `tollgate.test.Echo`: `Unary` echoes, `Stream` sends n messages, `Fail`
/// fails with the status code it is sent. Trailing metadata tells what the
/// server saw: `x-seen-authorization` ("present"/"absent"),
/// `x-seen-api-key`, `x-seen-proto` (x-forwarded-proto), `x-seen-authority`;
/// `Stream` adds `x-count`.
pub struct GrpcServer {
    pub port: u16,
    pub proc: Proc,
    _dir: tempfile::TempDir,
}

impl GrpcServer {
    /// Plaintext HTTP/2 (h2c, prior knowledge) on 127.0.0.1.
    pub fn start() -> GrpcServer {
        Self::spawn(None)
    }

    /// TLS (ALPN h2) with `dir`/server.pem (chain) and `dir`/server.key, e.g.
    /// from `Certs::make(dir, &["server,127.0.0.1,localhost"])`.
    pub fn start_tls(dir: &Path) -> GrpcServer {
        Self::spawn(Some(dir))
    }

    fn spawn(tls: Option<&Path>) -> GrpcServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = python(GRPC_PEER);
        cmd.arg("server");
        if let Some(tls) = tls {
            cmd.arg("--tls").arg(tls);
        }
        let (proc, port) = start_server(cmd, dir.path(), "grpc_peer");
        GrpcServer {
            port,
            proc,
            _dir: dir,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// One call with a real grpcio client: `method` is "unary", "stream" or
/// "fail"; `token` goes as `authorization: Bearer <token>`; `tls` is
/// (CA file, authority) for a secure channel. Returns
/// `{"code": "OK"|"UNAUTHENTICATED"|..., "details": str, "messages": [str],
///   "trailing": {k: v}, "initial": {k: v}}` whatever the gRPC status.
pub fn grpc_call(
    target: &str,
    method: &str,
    payload: &str,
    token: Option<&str>,
    tls: Option<(&str, &str)>,
) -> serde_json::Value {
    let mut args = vec!["--target", target, "--method", method, "--payload", payload];
    if let Some(token) = token {
        args.extend(["--token", token]);
    }
    if let Some((ca, authority)) = tls {
        args.extend(["--tls-ca", ca, "--authority", authority]);
    }
    grpc_call_args(&args)
}

/// `grpc_peer.py call` with any arguments (e.g. `--meta KEY=VALUE`,
/// `--timeout SECONDS`, `--authority` on a plaintext channel).
pub fn grpc_call_args(args: &[&str]) -> serde_json::Value {
    let mut cmd = python(GRPC_PEER);
    cmd.arg("call").args(args);
    let out = run(cmd, "grpc_peer.py call");
    json_out(&out, "grpc_peer.py call")
}

/// A WebSocket echo server (tests/support/ws_peer.py): echoes messages,
/// answers "headers?" with the handshake request headers it saw (JSON,
/// lower-case names, plus ":path"), closes with CODE on "close:CODE",
/// refuses upgrades to /refuse/NNN with status NNN, and answers a plain
/// (non-upgrade) GET on any path with 200 "plain".
pub struct WsServer {
    pub port: u16,
    pub proc: Proc,
    _dir: tempfile::TempDir,
}

impl WsServer {
    pub fn start() -> WsServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = python(WS_PEER);
        cmd.arg("server");
        let (proc, port) = start_server(cmd, dir.path(), "ws_peer");
        WsServer {
            port,
            proc,
            _dir: dir,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// A real WebSocket client (`ws_peer.py client`), e.g.
/// `ws_client(&["--url", &url, "--token", t, "--send", "a,b", "--headers-probe"])`.
/// Returns `{"status": 101, "echoed": [..], "headers": {..},
/// "response_headers": {..}}`, `{"status": n, "body": str}` for a refused
/// handshake, or `{"error": str, "closed_code": n|null}`.
pub fn ws_client(args: &[&str]) -> serde_json::Value {
    let mut cmd = python(WS_PEER);
    cmd.arg("client").args(args);
    let out = run(cmd, "ws_peer.py client");
    json_out(&out, "ws_peer.py client")
}

/// A private CA and server certificates in a directory (tests/support/certs.py).
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    /// Each spec is "stem[,name...]" — DNS names or IP addresses, the first
    /// also the file stem: writes ca.pem/ca.key (once per directory) and
    /// <stem>.pem (leaf + CA chain) / <stem>.key (PKCS#8).
    pub fn make(dir: &Path, specs: &[&str]) -> Certs {
        let certs = Certs {
            dir: dir.to_path_buf(),
        };
        certs.run(specs);
        certs
    }

    /// Runs certs.py on this directory with more arguments, e.g.
    /// `["--serial-tag", "v2", "server,127.0.0.1"]` (writes server-v2.pem),
    /// `["--mismatch", "server"]` (writes server-mismatch.key) or
    /// `["--days", "-1", "old,127.0.0.1"]` (an expired certificate).
    pub fn run(&self, args: &[&str]) {
        let mut cmd = python(CERTS);
        cmd.arg(&self.dir).args(args);
        run(cmd, "certs.py");
    }

    pub fn ca(&self) -> String {
        self.path("ca.pem")
    }

    pub fn cert(&self, stem: &str) -> String {
        self.path(&format!("{stem}.pem"))
    }

    pub fn key(&self, stem: &str) -> String {
        self.path(&format!("{stem}.key"))
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

const TLS_CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/tls_client.py");

/// An HTTPS/1.1 connection made by Python's ssl module (OpenSSL), held open
/// so a test can send more requests on it later (tests/support/tls_client.py).
pub struct TlsClient {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
    /// What the handshake gave: `{"version", "alpn", "serial", "names"}`,
    /// or `{"error": ...}` when it failed.
    pub handshake: serde_json::Value,
}

impl TlsClient {
    /// `extra`: e.g. `["--sni", "api.example.com", "--max", "1.2"]`.
    pub fn connect(port: u16, ca: &str, extra: &[&str]) -> TlsClient {
        let mut child = python(TLS_CLIENT)
            .args(["127.0.0.1", &port.to_string(), "--ca", ca])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("tls_client.py: cannot run python3 ({e}). {MISSING}"));
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let handshake = read_json_line(&mut out);
        TlsClient {
            child,
            out,
            handshake,
        }
    }

    /// `GET path` on this connection: `{"status": n, "body": ...}` or `{"error": ...}`.
    pub fn get(&mut self, path: &str) -> serde_json::Value {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin
            .write_all(format!("{path}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .expect("write to tls_client.py");
        read_json_line(&mut self.out)
    }
}

impl Drop for TlsClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_json_line(out: &mut BufReader<std::process::ChildStdout>) -> serde_json::Value {
    let mut line = String::new();
    out.read_line(&mut line).expect("tls_client.py output");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("tls_client.py said {line:?}: {e}"))
}

const H2_PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/h2_peer.py");
const H2_BURST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/h2_burst.py");

/// HTTP/2 (h2c) connections at the frame level (`tests/support/h2_peer.py`,
/// hyperframe and hpack): e.g. `h2_peer(port, &["--connections", "5",
/// "--path", "/x", "--requests", "2", "--wait", "10"])`. Returns
/// `{"connections": [{"answers": [{"status", "at", "complete",
/// "goaway_before_end"}], "goaway": [{"at", "last_stream_id"}], "closed",
/// "error"}]}`, times in seconds since each connection opened.
/// `tests/support/h2_burst.py`: many requests at once on one h2c connection.
pub fn h2_burst(port: u16, args: &[&str]) -> serde_json::Value {
    let mut cmd = python(H2_BURST);
    cmd.args(["--port", &port.to_string()]).args(args);
    let out = run(cmd, "h2_burst.py");
    json_out(&out, "h2_burst.py")
}

pub fn h2_peer(port: u16, args: &[&str]) -> serde_json::Value {
    let mut cmd = python(H2_PEER);
    cmd.args(["--port", &port.to_string()]).args(args);
    let out = run(cmd, "h2_peer.py");
    json_out(&out, "h2_peer.py")
}
