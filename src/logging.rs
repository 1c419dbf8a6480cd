//! Logging set-up and the access log. The logger accepts every level and the
//! global max level does the filtering, so a reload can change the level.

use crate::config::{LogFormat, LogSettings};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static JSON: AtomicBool = AtomicBool::new(false);
static ACCESS: AtomicBool = AtomicBool::new(true);

pub fn init(settings: &LogSettings) {
    let json = settings.format == LogFormat::Json;
    let mut builder = env_logger::Builder::new();
    builder.filter_level(log::LevelFilter::Trace);
    builder.write_style(if settings.color && !json {
        env_logger::WriteStyle::Auto
    } else {
        env_logger::WriteStyle::Never
    });
    if json {
        builder.format(|buf, record| {
            let line = serde_json::json!({
                "ts": buf.timestamp_millis().to_string(),
                "level": record.level().as_str(),
                "target": record.target(),
                "msg": record.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    }
    // A second init (tests) keeps the first logger; only the level matters then.
    let _ = log::set_boxed_logger(Box::new(Quieter {
        inner: builder.build(),
    }));
    apply(settings);
}

/// Pingora logs at ERROR some events that healthy traffic makes all the
/// time, inside its own code where tollgate has no hook; an alert on ERROR
/// lines would fire on them. This logger passes them on at the level they
/// deserve (matched on Pingora's target and message, Pingora 0.9.1):
/// - `failed to acquire reusable stream` (pingora-core `connectors/mod.rs`):
///   a pooled upstream connection was still held by the pool's idle watcher;
///   Pingora opens a new one and the request goes on;
/// - `Fail to proxy: Downstream ...` (pingora-proxy `lib.rs`): the client
///   closed or broke its connection;
/// - `HTTP server fails to read from downstream` (pingora-core
///   `apps/http_app.rs`, the admin listener): the same;
/// - `No incoming socket transfer, sleep ... and try again` (pingora-core
///   `server/transfer_fd`): a process started with `--upgrade` waiting for
///   the old one to be sent SIGQUIT.
fn demoted(target: &str, message: &str) -> Option<log::Level> {
    use log::Level::{Debug, Info};
    match target {
        "pingora_core::connectors" if message == "failed to acquire reusable stream" => Some(Debug),
        t if t.starts_with("pingora_proxy")
            && message.starts_with("Fail to proxy: Downstream ") =>
        {
            Some(Debug)
        }
        "pingora_core::apps::http_app"
            if message.starts_with("HTTP server fails to read from downstream") =>
        {
            Some(Debug)
        }
        t if t.starts_with("pingora_core::server::transfer_fd")
            && message.starts_with("No incoming socket transfer") =>
        {
            Some(Info)
        }
        _ => None,
    }
}

struct Quieter {
    inner: env_logger::Logger,
}

impl log::Log for Quieter {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if record.level() <= log::Level::Warn && record.target().starts_with("pingora") {
            let message = record.args().to_string();
            if let Some(level) = demoted(record.target(), &message) {
                if level <= log::max_level() {
                    self.inner.log(
                        &log::Record::builder()
                            .args(format_args!("{message}"))
                            .level(level)
                            .target(record.target())
                            .module_path(record.module_path())
                            .file(record.file())
                            .line(record.line())
                            .build(),
                    );
                }
                return;
            }
        }
        self.inner.log(record);
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Applies the parts of the log settings that can change while running.
pub fn apply(settings: &LogSettings) {
    log::set_max_level(settings.level);
    ACCESS.store(settings.access_log, Ordering::Relaxed);
    JSON.store(settings.format == LogFormat::Json, Ordering::Relaxed);
}

pub struct AccessRecord<'a> {
    pub request_id: &'a str,
    pub client: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub upstream: &'a str,
    pub duration_ms: f64,
    pub bytes: usize,
    /// The refusal code or upstream error kind, `-` when none.
    pub error: &'a str,
    /// The request's trace id, `-` when tracing is off.
    pub trace_id: &'a str,
}

pub fn access_enabled() -> bool {
    ACCESS.load(Ordering::Relaxed) && log::log_enabled!(target: "access", log::Level::Info)
}

pub fn access(r: &AccessRecord<'_>) {
    if JSON.load(Ordering::Relaxed) {
        let line = serde_json::json!({
            "request_id": r.request_id,
            "client": r.client,
            "method": r.method,
            "path": r.path,
            "route": r.route,
            "status": r.status,
            "upstream": r.upstream,
            "duration_ms": r.duration_ms,
            "bytes": r.bytes,
            "error": r.error,
            "trace_id": r.trace_id,
        });
        log::info!(target: "access", "{line}");
    } else {
        log::info!(
            target: "access",
            "{} {} {} {} route={} status={} upstream={} duration_ms={:.3} bytes={} error={} trace_id={}",
            r.request_id, r.client, r.method, r.path, r.route, r.status, r.upstream,
            r.duration_ms, r.bytes, r.error, r.trace_id
        );
    }
}

#[cfg(test)]
mod tests {
    use super::demoted;
    use log::Level;

    #[test]
    fn only_pingoras_noise_is_demoted() {
        let cases = [
            (
                "pingora_core::connectors",
                "failed to acquire reusable stream",
                Some(Level::Debug),
            ),
            (
                "pingora_proxy",
                "Fail to proxy: Downstream ConnectionClosed context: x, status: 0, tries: 1",
                Some(Level::Debug),
            ),
            (
                "pingora_core::server::transfer_fd",
                "No incoming socket transfer, sleep 1s and try again",
                Some(Level::Info),
            ),
            (
                "pingora_proxy",
                "Fail to proxy: Upstream ConnectRefused",
                None,
            ),
            ("pingora_core::connectors", "something else", None),
            (
                "tollgate::reload",
                "failed to acquire reusable stream",
                None,
            ),
        ];
        for (target, message, level) in cases {
            assert_eq!(demoted(target, message), level, "{target}: {message}");
        }
    }
}
