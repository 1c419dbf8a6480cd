//! The Redis side of the limiter: the window scripts, one call per lease
//! for every window of a key (through the crate's one Redis layer).

use crate::config::{Algorithm, Window};
use crate::redis_client::{Redis, Unavailable};
use redis::Script;

static FIXED: once_cell::sync::Lazy<Script> =
    once_cell::sync::Lazy::new(|| Script::new(include_str!("../../lua/fixed_window.lua")));
static SLIDING: once_cell::sync::Lazy<Script> =
    once_cell::sync::Lazy::new(|| Script::new(include_str!("../../lua/sliding_window.lua")));
static CHARGE: once_cell::sync::Lazy<Script> =
    once_cell::sync::Lazy::new(|| Script::new(include_str!("../../lua/charge.lua")));
static GCRA: once_cell::sync::Lazy<Script> =
    once_cell::sync::Lazy::new(|| Script::new(include_str!("../../lua/gcra.lua")));

/// What Redis granted for one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub granted: u64,
    /// Units nobody holds after this grant.
    pub available: u64,
    pub reset_us: u64,
    pub retry_us: u64,
}

fn base_key(redis: &Redis, key_id: &str, w: &Window) -> String {
    format!("{}rl:{{{key_id}}}:{}", redis.prefix(), w.window.as_secs())
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
        invocation
            .arg(w.requests)
            .arg(w.window.as_micros() as u64)
            .arg(units);
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
            .arg(w.window.as_micros() as u64)
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
