//! The rate-limit fields of an answer, as `limits.headers` asks:
//! `draft` — `RateLimit-Policy` and `RateLimit` of
//! draft-ietf-httpapi-ratelimit-headers-11, one item per window that
//! applied; `legacy` — `RateLimit-Limit`, `-Remaining`, `-Reset` of the
//! window closest to exhaustion; `both`; or `none`.

use crate::config::{HeaderMode, Window};
use crate::ratelimit::{window_secs, Decision, Scope};

pub const POLICY: &str = "ratelimit-policy";
pub const RATELIMIT: &str = "ratelimit";
pub const LIMIT: &str = "ratelimit-limit";
pub const REMAINING: &str = "ratelimit-remaining";
pub const RESET: &str = "ratelimit-reset";

/// One window as the fields report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported<'a> {
    /// With the window, the policy name: `<scope>-<window>` (`default-1m`,
    /// `free-5s`, `org-1m`, `per-ip-month`); never a caller's key.
    pub scope: &'a str,
    pub window: Window,
    pub limit: u64,
    /// Seconds of the window (of the current period, for calendar windows).
    pub window_secs: u64,
    pub remaining: u64,
    pub reset_secs: u64,
}

/// Every window a decision counted, named after its scope.
pub fn reported<'a>(decision: &Decision, scopes: &[Scope<'a>], now_us: u64) -> Vec<Reported<'a>> {
    decision
        .windows
        .iter()
        .map(|c| Reported {
            scope: scopes.get(c.scope).map_or("limit", |s| s.name),
            window: c.window,
            limit: c.window.requests,
            window_secs: window_secs(&c.window, now_us),
            remaining: c.outcome.remaining,
            reset_secs: c.outcome.reset_us.div_ceil(1_000_000),
        })
        .collect()
}

/// Structured-field string items are quoted; policy names hold only
/// letters, digits, `-` and `_`, so nothing needs escaping.
fn item(out: &mut String, w: &Reported<'_>) {
    if !out.is_empty() {
        out.push_str(", ");
    }
    out.push('"');
    out.push_str(w.scope);
    out.push('-');
    w.window.write_label(out);
    out.push('"');
}

/// The header fields for `windows`; `closest` is the index of the window
/// closest to exhaustion (or the one that refused).
pub fn fields(
    mode: HeaderMode,
    windows: &[Reported<'_>],
    closest: usize,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if windows.is_empty() {
        return out;
    }
    if matches!(mode, HeaderMode::Draft | HeaderMode::Both) {
        let mut policy = String::with_capacity(24 * windows.len());
        let mut current = String::with_capacity(24 * windows.len());
        let mut n = itoa::Buffer::new();
        for w in windows {
            item(&mut policy, w);
            policy.push_str(";q=");
            policy.push_str(n.format(w.limit));
            policy.push_str(";w=");
            policy.push_str(n.format(w.window_secs));
            item(&mut current, w);
            current.push_str(";r=");
            current.push_str(n.format(w.remaining));
            current.push_str(";t=");
            current.push_str(n.format(w.reset_secs));
        }
        out.push((POLICY, policy));
        out.push((RATELIMIT, current));
    }
    if matches!(mode, HeaderMode::Legacy | HeaderMode::Both) {
        if let Some(w) = windows.get(closest) {
            let mut n = itoa::Buffer::new();
            out.push((LIMIT, n.format(w.limit).to_string()));
            out.push((REMAINING, n.format(w.remaining).to_string()));
            out.push((RESET, n.format(w.reset_secs).to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn windows() -> Vec<Reported<'static>> {
        vec![
            Reported {
                scope: "default",
                window: Window::every(100, std::time::Duration::from_secs(60)),
                limit: 100,
                window_secs: 60,
                remaining: 42,
                reset_secs: 17,
            },
            Reported {
                scope: "per-ip",
                window: Window::calendar(100000, crate::config::Calendar::Month),
                limit: 100000,
                window_secs: 2592000,
                remaining: 99000,
                reset_secs: 86400,
            },
        ]
    }

    #[test]
    fn draft_fields_name_every_window() {
        let f = fields(HeaderMode::Draft, &windows(), 0);
        assert_eq!(
            f,
            [
                (
                    POLICY,
                    "\"default-1m\";q=100;w=60, \"per-ip-month\";q=100000;w=2592000".to_string()
                ),
                (
                    RATELIMIT,
                    "\"default-1m\";r=42;t=17, \"per-ip-month\";r=99000;t=86400".to_string()
                ),
            ]
        );
    }

    #[test]
    fn legacy_reports_the_closest_window_and_none_reports_nothing() {
        let f = fields(HeaderMode::Legacy, &windows(), 0);
        assert_eq!(
            f,
            [
                (LIMIT, "100".to_string()),
                (REMAINING, "42".to_string()),
                (RESET, "17".to_string())
            ]
        );
        assert_eq!(fields(HeaderMode::Both, &windows(), 1).len(), 5);
        assert!(fields(HeaderMode::None, &windows(), 0).is_empty());
        assert!(fields(HeaderMode::Draft, &[], 0).is_empty());
    }
}
