//! Upstreams and endpoints for tollgate to talk to: the echo upstream, a
//! recording upstream, a JSON endpoint, a TLS front.
#![allow(dead_code)]

use super::*;

pub struct Echo {
    pub port: u16,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl Echo {
    pub fn start() -> Echo {
        let dir = tempfile::tempdir().expect("tempdir");
        for _ in 0..4 {
            let port = free_port();
            let (log, file) = log_file(dir.path(), "echo.log");
            let child = Command::new(BIN)
                .args(["echo", "--listen", &format!("127.0.0.1:{port}")])
                .stdout(Stdio::null())
                .stderr(file)
                .spawn()
                .expect("spawn tollgate echo");
            let mut proc = Proc { child, log };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = proc.child.try_wait() {
                    break;
                }
                let answered = get(port, "/").is_ok_and(|r| r.text().contains("GET / HTTP/1.1"));
                if answered && proc.child.try_wait().is_ok_and(|s| s.is_none()) {
                    return Echo {
                        port,
                        _proc: proc,
                        _dir: dir,
                    };
                }
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for the echo upstream"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let log = proc.log_text();
            assert!(lost_port_race(&log), "tollgate echo did not start:\n{log}");
        }
        panic!("tollgate echo could not get a free port in 4 attempts");
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// An upstream in the test process that counts the requests reaching it and
/// keeps the last request head it saw.
pub struct Recorder {
    pub port: u16,
    pub count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub last: std::sync::Arc<std::sync::Mutex<String>>,
    /// Requests being answered right now, and the most there ever were.
    pub in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub max_in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Recorder {
    pub fn start() -> Recorder {
        Self::start_slow(Duration::ZERO)
    }

    /// Like `start`, but each answer leaves `delay` after the request was
    /// counted: a request the test can know is in flight.
    pub fn start_slow(delay: Duration) -> Recorder {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let last = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let in_flight = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let max_in_flight = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (c, l) = (count.clone(), last.clone());
        let (now, max) = (in_flight.clone(), max_in_flight.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (c, l) = (c.clone(), l.clone());
                let (now, max) = (now.clone(), max.clone());
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
                        *l.lock().unwrap() = head;
                        let current = now.fetch_add(1, Ordering::SeqCst) + 1;
                        max.fetch_max(current, Ordering::SeqCst);
                        c.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(delay);
                        now.fetch_sub(1, Ordering::SeqCst);
                        let _ = reader
                            .get_mut()
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                    }
                });
            }
        });
        Recorder {
            port,
            count,
            last,
            in_flight,
            max_in_flight,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn hits(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn last_head(&self) -> String {
        self.last.lock().unwrap().clone()
    }
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
        let mut child = Command::new(python3())
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
