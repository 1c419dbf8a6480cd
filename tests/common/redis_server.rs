//! Private redis-server processes: single servers and Clusters on free ports.
#![allow(dead_code)]

use super::*;

pub struct Redis {
    pub port: u16,
    pub proc: Option<Proc>,
    dir: tempfile::TempDir,
    /// `--tls-port` here means: serve TLS (only) on `port`.
    extra: Vec<String>,
}

impl Redis {
    /// Starts a private redis-server. A missing redis-server fails the test:
    /// a suite that skips its Redis tests proves nothing.
    pub fn start() -> Redis {
        Self::start_with(&[])
    }

    /// A private redis-server with extra arguments (TLS, say).
    pub fn start_with(extra: &[&str]) -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Redis {
            port: 0,
            proc: None,
            dir,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        for _ in 0..4 {
            r.port = free_port();
            match r.try_start() {
                Ok(()) => return r,
                Err(log) if lost_port_race(&log) => continue,
                Err(log) => panic!("redis-server did not start:\n{log}"),
            }
        }
        panic!("redis-server could not get a free port in 4 attempts");
    }

    /// Starts the server again on the same port (after `stop`).
    pub fn restart(&mut self) {
        if let Err(log) = self.try_start() {
            panic!("redis-server did not start again:\n{log}");
        }
    }

    fn try_start(&mut self) -> Result<(), String> {
        let (log, file) = log_file(self.dir.path(), "redis.log");
        let tls = self.extra.iter().any(|a| a == "--tls-port");
        let port = self.port.to_string();
        let ports: Vec<&str> = if tls {
            vec!["--port", "0", "--tls-port", &port]
        } else {
            vec!["--port", &port]
        };
        let extra: Vec<&str> = self
            .extra
            .iter()
            .map(String::as_str)
            .filter(|a| *a != "--tls-port")
            .collect();
        let child = Command::new("redis-server")
            .args(&ports)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&extra)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (run `make test`, which installs it)");
        let mut proc = Proc { child, log };
        // Ready once it says so; gone if it could not bind.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(_)) = proc.child.try_wait() {
                return Err(proc.log_text());
            }
            if proc.log_text().contains("Ready to accept connections") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for redis-server"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.proc = Some(proc);
        Ok(())
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
