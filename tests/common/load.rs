//! Clients that keep sending while a test does something to the proxy.
#![allow(dead_code)]

use super::*;

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

/// A client that keeps sending requests until stopped, like a real one
/// (a load balancer's connection pool): over one kept-alive connection that
/// it reuses until an answer says `Connection: close`, or over a new
/// connection each time. Nothing is retried: a request written and not
/// answered, or answered with another status than expected, is a failure.
/// A connection the server refuses to open (nothing sent) is counted apart.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<LoadReport>,
}

#[derive(Debug, Default)]
pub struct LoadReport {
    /// Answers with the expected status.
    pub ok: usize,
    /// Requests sent and lost, or answered with another status.
    pub failures: Vec<String>,
    /// Connections refused before anything was sent (the server has stopped
    /// accepting): nothing was lost.
    pub refused: usize,
    /// Answers that said `Connection: close`.
    pub closed_by_server: usize,
}

impl Load {
    pub fn start(port: u16, path: &str, headers: &str, keep_alive: bool, expect: u16) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let (path, headers) = (path.to_string(), headers.to_string());
        let extra = if keep_alive {
            headers
        } else {
            format!("{headers}Connection: close\r\n")
        };
        let handle = std::thread::spawn(move || {
            let mut report = LoadReport::default();
            let mut conn: Option<Client> = None;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if conn.is_none() {
                    match Client::connect(port) {
                        Ok(c) => conn = Some(c),
                        Err(_) => {
                            report.refused += 1;
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                    }
                }
                let Some(c) = conn.as_mut() else { continue };
                match c.get(&path, &extra) {
                    Ok(r) => {
                        let close = r
                            .header("connection")
                            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
                        if close {
                            report.closed_by_server += 1;
                        }
                        if r.status == expect {
                            report.ok += 1;
                        } else {
                            report
                                .failures
                                .push(format!("status {}: {}", r.status, r.text()));
                        }
                        if close || !keep_alive {
                            conn = None;
                        }
                    }
                    Err(e) => {
                        report
                            .failures
                            .push(format!("request sent, no answer: {e}"));
                        conn = None;
                    }
                }
            }
            report
        });
        Load { stop, handle }
    }

    /// Stops the client; returns (answers as expected, failures).
    pub fn stop(self) -> (usize, Vec<String>) {
        let report = self.report();
        (report.ok, report.failures)
    }

    /// Stops the client; returns everything it counted.
    pub fn report(self) -> LoadReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().expect("load thread")
    }
}
