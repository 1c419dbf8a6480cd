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
    let _ = builder.try_init();
    apply(settings);
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
        });
        log::info!(target: "access", "{line}");
    } else {
        log::info!(
            target: "access",
            "{} {} {} {} route={} status={} upstream={} duration_ms={:.3} bytes={} error={}",
            r.request_id, r.client, r.method, r.path, r.route, r.status, r.upstream,
            r.duration_ms, r.bytes, r.error
        );
    }
}
