//! The Redis side of the limiter: the window scripts, one call per lease
//! for every window of a key (through the crate's one Redis layer).

use crate::config::{Algorithm, Calendar, Window};
use crate::redis_client::{Redis, Unavailable};
use redis::Script;
use std::sync::LazyLock;

/// A window script with the shared prelude (`lua/prelude.lua`) in front.
macro_rules! window_script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("../../lua/prelude.lua"),
                include_str!(concat!("../../lua/", $file))
            ))
        })
    };
}

static FIXED: LazyLock<Script> = window_script!("fixed_window.lua");
static SLIDING: LazyLock<Script> = window_script!("sliding_window.lua");
static CHARGE: LazyLock<Script> = window_script!("charge.lua");
static GCRA: LazyLock<Script> = window_script!("gcra.lua");

/// A window as the scripts take it: microseconds, or -1 / -2 for a
/// calendar day / month.
fn window_arg(w: &Window) -> i64 {
    match w.calendar {
        Some(Calendar::Day) => -1,
        Some(Calendar::Month) => -2,
        None => i64::try_from(w.window.as_micros()).unwrap_or(i64::MAX),
    }
}

/// What Redis granted for one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub granted: u64,
    /// Units nobody holds after this grant.
    pub available: u64,
    pub reset_us: u64,
    pub retry_us: u64,
}

/// `<prefix>rl:{<key>}:<window>`, the window in seconds or `day` / `month`;
/// the scripts append the period's start.
fn base_key(redis: &Redis, key_id: &str, w: &Window) -> String {
    match w.calendar {
        Some(_) => format!("{}rl:{{{key_id}}}:{}", redis.prefix(), w.label()),
        None => format!("{}rl:{{{key_id}}}:{}", redis.prefix(), w.window.as_secs()),
    }
}

/// Charges `units` to every window of `key_id`, over the limit or not
/// (negative units hand leased budget back).
pub async fn charge(
    redis: &Redis,
    algo: Algorithm,
    key_id: &str,
    windows: &[Window],
    units: i64,
) -> Result<(), Unavailable> {
    let mut invocation = CHARGE.prepare_invoke();
    let name = match algo {
        Algorithm::FixedWindow => "fixed_window",
        Algorithm::SlidingWindow => "sliding_window",
        Algorithm::Gcra => "gcra",
    };
    invocation.arg(name).arg(windows.len());
    for w in windows {
        invocation.key(base_key(redis, key_id, w));
        invocation.arg(w.requests).arg(window_arg(w)).arg(units);
    }
    redis
        .invoke::<i64>("charge", &invocation, redis.settings.timeout)
        .await
        .map(|_| ())
}

/// One lease call for all windows of `key_id`. `need[i]` units must be
/// available in every window or nothing is granted; beyond that each
/// window grants up to `available / divisor` (at most `max_chunk`).
pub async fn acquire(
    redis: &Redis,
    algo: Algorithm,
    key_id: &str,
    windows: &[Window],
    need: &[u64],
    divisor: u64,
    max_chunk: u64,
) -> Result<Vec<Grant>, Unavailable> {
    let script = match algo {
        Algorithm::FixedWindow => &*FIXED,
        Algorithm::SlidingWindow => &*SLIDING,
        Algorithm::Gcra => &*GCRA,
    };
    let mut invocation = script.prepare_invoke();
    invocation.arg(windows.len());
    for (w, need) in windows.iter().zip(need) {
        invocation.key(base_key(redis, key_id, w));
        invocation
            .arg(w.requests)
            .arg(window_arg(w))
            .arg(*need)
            .arg(divisor)
            .arg(max_chunk);
    }
    let values: Vec<i64> = redis
        .invoke("acquire", &invocation, redis.settings.timeout)
        .await?;
    if values.len() != windows.len() * 4 {
        return Err(redis.unexpected("acquire", format!("{} values", values.len())));
    }
    let clamp = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok(values
        .chunks_exact(4)
        .map(|c| Grant {
            granted: clamp(c[0]),
            available: clamp(c[1]),
            reset_us: clamp(c[2]),
            retry_us: clamp(c[3]),
        })
        .collect())
}
