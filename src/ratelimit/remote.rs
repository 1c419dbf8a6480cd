//! The Redis side of the limiter: the window scripts, one call per lease
//! for every window of a key (through the crate's one Redis layer), the
//! fleet's registration and the quota view.

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
static GCRA: LazyLock<Script> = window_script!("gcra.lua");
static QUOTA: LazyLock<Script> = window_script!("quota.lua");
static FLEET: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../../lua/fleet.lua")));

/// A window as the scripts take it: microseconds, or -1 / -2 for a
/// calendar day / month.
fn window_arg(w: &Window) -> i64 {
    match w.calendar {
        Some(Calendar::Day) => -1,
        Some(Calendar::Month) => -2,
        None => i64::try_from(w.window.as_micros()).unwrap_or(i64::MAX),
    }
}

/// What a lease call asks of one window (see `lua/fixed_window.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ask {
    /// Units that must be granted, or nothing is.
    pub need: u64,
    /// The period the instance's lease counts in (`None`: none yet).
    pub period: Option<u64>,
    /// Units the instance has counted for itself in that period (GCRA:
    /// units to charge as they are).
    pub floor: u64,
    /// Unused units handed back.
    pub back: u64,
    /// Units the instance admitted in the period (the quota view).
    pub consumed: Option<u64>,
    /// The lease's name in the ledger, with the instance's.
    pub incarnation: u32,
}

impl Ask {
    /// Whether making the call twice does what making it once does: every
    /// ask but a bare hand-back to a ledger ([`super::lease::give_back`],
    /// which takes `back` off whatever the ledger counts) states what its
    /// lease admitted, which Redis keeps as the ledger's floor.
    pub fn repeatable(&self) -> bool {
        self.consumed.is_some() || self.back == 0
    }
}

/// What Redis answered for one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub granted: u64,
    /// Units nobody holds after this grant.
    pub available: u64,
    pub reset_us: u64,
    pub retry_us: u64,
    /// Start of the period the grant counts in (µs, Redis' clock; 0 for GCRA).
    pub period: u64,
    /// The units Redis counts for this instance in the period, after the
    /// call (`None`: no ledger, GCRA).
    pub ledger: Option<u64>,
}

/// `<prefix>rl:{<key>}:<window>`, the window in seconds or `day` / `month`;
/// the scripts append the period's start.
fn base_key(redis: &Redis, key_id: &str, w: &Window) -> String {
    match w.calendar {
        Some(_) => format!("{}rl:{{{key_id}}}:{}", redis.prefix(), w.label()),
        None => format!("{}rl:{{{key_id}}}:{}", redis.prefix(), w.window.as_secs()),
    }
}

/// One lease call for all windows of `key_id`. `asks[i].need` units must
/// be available in every window or nothing is granted; beyond that each
/// window grants up to `available / divisor` (at most `max_chunk`). Floors
/// and hand-backs apply whatever the grant.
#[allow(clippy::too_many_arguments)]
pub async fn lease(
    redis: &Redis,
    algo: Algorithm,
    instance: &str,
    key_id: &str,
    windows: &[Window],
    asks: &[Ask],
    divisor: u64,
    max_chunk: u64,
) -> Result<Vec<Grant>, Unavailable> {
    let script = match algo {
        Algorithm::FixedWindow => &*FIXED,
        Algorithm::SlidingWindow => &*SLIDING,
        Algorithm::Gcra => &*GCRA,
    };
    let mut invocation = script.prepare_invoke();
    invocation.arg(windows.len()).arg(instance);
    for (w, ask) in windows.iter().zip(asks) {
        invocation.key(base_key(redis, key_id, w));
        let period = ask.period.map_or(-1, |p| i64::try_from(p).unwrap_or(-1));
        let consumed = ask.consumed.map_or(-1, |c| i64::try_from(c).unwrap_or(-1));
        invocation
            .arg(w.requests)
            .arg(window_arg(w))
            .arg(ask.need)
            .arg(divisor)
            .arg(max_chunk)
            .arg(period)
            .arg(ask.floor)
            .arg(ask.back)
            .arg(consumed)
            .arg(ask.incarnation);
    }
    let values: Vec<i64> = redis
        .invoke("acquire", &invocation, redis.settings.timeout)
        .await?;
    if values.len() != windows.len() * 6 {
        return Err(redis.unexpected("acquire", format!("{} values", values.len())));
    }
    let clamp = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok(values
        .chunks_exact(6)
        .map(|c| Grant {
            granted: clamp(c[0]),
            available: clamp(c[1]),
            reset_us: clamp(c[2]),
            retry_us: clamp(c[3]),
            period: clamp(c[4]),
            ledger: u64::try_from(c[5]).ok(),
        })
        .collect())
}

/// Registers this instance; returns how many instances share the Redis.
pub async fn register(redis: &Redis, instance: &str, ttl_ms: u64) -> Result<u64, Unavailable> {
    let mut invocation = FLEET.prepare_invoke();
    invocation
        .key(format!("{}instances", redis.prefix()))
        .arg(instance)
        .arg(ttl_ms);
    let n: i64 = redis
        .invoke(
            "fleet",
            &invocation,
            redis
                .settings
                .timeout
                .max(std::time::Duration::from_millis(250)),
        )
        .await?;
    Ok(u64::try_from(n).unwrap_or(1).max(1))
}

/// What the quota view reads of one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Units Redis counts (held or admitted by the fleet).
    pub counted: u64,
    /// Units the other instances reported admitted.
    pub admitted_elsewhere: u64,
    pub reset_us: u64,
}

pub async fn counts(
    redis: &Redis,
    instance: &str,
    key_id: &str,
    windows: &[Window],
) -> Result<Vec<Counts>, Unavailable> {
    let mut invocation = QUOTA.prepare_invoke();
    invocation.arg(windows.len()).arg(instance);
    for w in windows {
        invocation.key(base_key(redis, key_id, w));
    }
    for w in windows {
        invocation.arg(window_arg(w));
    }
    let values: Vec<i64> = redis
        .invoke(
            "quota",
            &invocation,
            redis
                .settings
                .timeout
                .max(std::time::Duration::from_millis(250)),
        )
        .await?;
    if values.len() != windows.len() * 3 {
        return Err(redis.unexpected("quota", format!("{} values", values.len())));
    }
    let clamp = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok(values
        .chunks_exact(3)
        .map(|c| Counts {
            counted: clamp(c[0]),
            admitted_elsewhere: clamp(c[1]),
            reset_us: clamp(c[2]),
        })
        .collect())
}
