//! The tollgate binary under test, and token minting with PyJWT.
#![allow(dead_code)]

use super::*;

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
        for _ in 0..4 {
            match Self::try_start(template, env) {
                Ok(t) => return t,
                Err(log) if lost_port_race(&log) => continue,
                Err(log) => panic!("tollgate exited early:\n{log}"),
            }
        }
        panic!("tollgate could not get free ports in 4 attempts");
    }

    fn try_start(template: &str, env: &[(&str, &str)]) -> Result<Tollgate, String> {
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
        t.try_wait_healthy()?;
        Ok(t)
    }

    /// Waits until both listeners answer (whatever the configured probe paths).
    pub fn wait_healthy(&mut self) {
        if let Err(log) = self.try_wait_healthy() {
            panic!("tollgate exited early:\n{log}");
        }
    }

    /// Like `wait_healthy`; an early exit is `Err(its log)`.
    fn try_wait_healthy(&mut self) -> Result<(), String> {
        let (port, admin) = (self.port, self.admin_port);
        let proc = &mut self.proc;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = proc.child.try_wait() {
                return Err(format!("({status})\n{}", proc.log_text()));
            }
            // The reload series appear once SIGHUP reloads (before that it
            // is ignored), so a test may send one as soon as this returns.
            let up = get(admin, "/metrics").is_ok_and(|r| {
                r.status == 200 && r.text().contains("tollgate_config_reloads_total{")
            }) && TcpStream::connect(("127.0.0.1", port)).is_ok();
            // Serving, and still alive (not someone else on a port it lost).
            if up && proc.child.try_wait().is_ok_and(|s| s.is_none()) {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for tollgate listeners"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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
    /// The deadline is generous: on a loaded machine a reload or a scrape
    /// can take seconds, and waiting ends as soon as the value is there.
    pub fn wait_metric(&self, series: &str, value: f64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let last = self.metrics();
            if metric_value(&last, series) == Some(value) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{series} never reached {value}:\n{last}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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
    hammer_with(instances, "/api/x", &header, per_instance)
}

/// `per_instance` requests for `path` with the raw header lines `headers`
/// to each instance at once (one keep-alive connection each); a 429 must be
/// a `rate_limited` refusal. Returns (admitted, limited).
pub fn hammer_with(
    instances: &[Tollgate],
    path: &str,
    headers: &str,
    per_instance: usize,
) -> (usize, usize) {
    let handles: Vec<_> = instances
        .iter()
        .map(|t| {
            let (port, path, headers) = (t.port, path.to_string(), headers.to_string());
            std::thread::spawn(move || {
                let mut c = Client::connect(port).expect("connect");
                let (mut ok, mut limited) = (0, 0);
                for _ in 0..per_instance {
                    let r = c.get(&path, &headers).expect("response");
                    match r.status {
                        200 => ok += 1,
                        429 => {
                            r.assert_refusal(429, "rate_limited");
                            limited += 1
                        }
                        s => panic!("unexpected status {s}: {}", r.text()),
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

/// Mints a token with PyJWT (tests/support/mint.py).
pub fn pyjwt(request: serde_json::Value) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/mint.py");
    let mut child = Command::new(python3())
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

/// The public JWK of a PEM public key, made by PyJWT (tests/support/jwk.py).
pub fn jwk(pem: &str, kid: &str, alg: &str) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/jwk.py");
    let out = Command::new(python3())
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

impl Tollgate {
    /// `serve -c config_path` on a config the test laid out itself (a
    /// symlinked directory, say), listening on `port` and `admin_port`.
    pub fn start_at(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        (port, admin_port): (u16, u16),
        env: &[(&str, &str)],
    ) -> Tollgate {
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
}
