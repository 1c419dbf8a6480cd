//! Leases: each instance takes budget from Redis in chunks and admits
//! locally while it holds some. Redis counts leased units as used, so the
//! fleet can never admit more than the limit; chunks are a share of what is
//! still available, so they shrink to single units near the limit and
//! instances do not sit on budget others need. A key that Redis refused is
//! refused locally, with no Redis call, until its retry time.
//!
//! `sync: exact` is the same path with chunks of exactly the request's cost:
//! one script call per admitted request.

use super::algo::Outcome;
use super::remote;
use crate::config::{Algorithm, SyncMode, Window};
use crate::redis_client::{Redis, Unavailable};
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SHARDS: usize = 64;
const SWEEP_AT: usize = 4096;
/// A lease takes this share of the available units...
const DIVISOR: u64 = 32;
/// ...but never more than this many.
const MAX_CHUNK: u64 = 10_000;

#[derive(Clone, Copy)]
struct Lease {
    window: Window,
    /// Units this instance holds.
    budget: u64,
    /// Units nobody held at the last answer from Redis.
    available: u64,
    /// The lease dies with its window.
    expires: Instant,
    /// Refused by Redis: refuse locally until then when the cost exceeds
    /// `budget + available`.
    over_until: Option<Instant>,
    /// Size of the last grant: the budget is topped up in the background
    /// when it falls under a quarter of it.
    last_grant: u64,
}

#[derive(Default)]
struct KeyLeases {
    leases: Vec<Lease>,
    /// A background top-up is under way.
    prefetching: bool,
}

/// Below this grant size the key is near its limit: no background top-ups,
/// so no instance sits on budget another one needs.
const PREFETCH_MIN_GRANT: u64 = 8;

type Entry = Arc<tokio::sync::Mutex<KeyLeases>>;

/// One shard of the key map, and the size at which it is next swept.
type Shard = (HashMap<Box<str>, Entry>, usize);

pub struct Leases {
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    /// Units per second each key uses on this instance (a count-min sketch:
    /// fixed memory, never stores keys). A lease is sized to about two
    /// seconds of that, so a quiet key never holds budget a busy instance needs.
    usage: pingora_limits::rate::Rate,
}

impl Default for Leases {
    fn default() -> Self {
        Leases {
            shards: (0..SHARDS)
                .map(|_| Mutex::new((HashMap::new(), SWEEP_AT)))
                .collect(),
            hasher: RandomState::new(),
            usage: pingora_limits::rate::Rate::new(Duration::from_secs(1)),
        }
    }
}

/// Smallest lease cap, so a key starts with chunks before its rate is known.
const MIN_CHUNK: u64 = 64;

/// A decision and whether Redis was asked for it.
pub struct Acquired {
    pub outcomes: Vec<Outcome>,
    pub asked_redis: bool,
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

impl Leases {
    fn entry(&self, key_id: &str) -> Entry {
        let shard = &self.shards[(self.hasher.hash_one(key_id) as usize) % SHARDS];
        let mut guard = match shard.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let (map, sweep_at) = &mut *guard;
        if map.len() >= *sweep_at {
            let now = Instant::now();
            // Entries that nobody is using and whose leases have all ended.
            map.retain(|_, e| {
                Arc::strong_count(e) > 1
                    || e.try_lock().map_or(true, |k| {
                        k.leases
                            .iter()
                            .any(|l| l.expires > now || l.over_until.is_some_and(|o| o > now))
                    })
            });
            *sweep_at = (map.len() * 2).max(SWEEP_AT);
        }
        if let Some(e) = map.get(key_id) {
            return e.clone();
        }
        map.entry(key_id.into()).or_default().clone()
    }

    pub async fn acquire(
        &self,
        redis: &Arc<Redis>,
        algo: Algorithm,
        sync: SyncMode,
        key_id: &str,
        windows: &[Window],
        cost: u64,
    ) -> Result<Acquired, Unavailable> {
        let entry = self.entry(key_id);
        self.usage
            .observe(&key_id, cost.min(isize::MAX as u64) as isize);
        let mut state = entry.lock().await;
        let now = Instant::now();
        // Line the leases up with the windows that apply now (in place when
        // they already are: the common case costs no allocation).
        let aligned = state.leases.len() == windows.len()
            && state
                .leases
                .iter()
                .zip(windows)
                .all(|(l, w)| l.window == *w && l.expires > now);
        if aligned {
            for l in state.leases.iter_mut() {
                if l.over_until.is_some_and(|o| o <= now) {
                    l.over_until = None;
                }
            }
        } else {
            let old = std::mem::take(&mut state.leases);
            state.leases = windows
                .iter()
                .map(|w| {
                    let kept = old.iter().find(|l| l.window == *w && l.expires > now);
                    let mut lease = kept.copied().unwrap_or(Lease {
                        window: *w,
                        budget: 0,
                        available: w.requests,
                        expires: now,
                        over_until: None,
                        last_grant: 0,
                    });
                    if lease.over_until.is_some_and(|o| o <= now) {
                        lease.over_until = None;
                    }
                    lease
                })
                .collect();
        }
        let outcome = |l: &Lease, allowed: bool, retry: Duration| Outcome {
            allowed,
            remaining: l.available.saturating_add(l.budget),
            reset_us: us(l.expires.saturating_duration_since(now)),
            retry_us: us(retry),
        };

        // Known to be over: no Redis call.
        if state
            .leases
            .iter()
            .any(|l| l.over_until.is_some() && cost > l.budget.saturating_add(l.available))
        {
            return Ok(Acquired {
                outcomes: state
                    .leases
                    .iter()
                    .map(|l| match l.over_until {
                        Some(until) if cost > l.budget.saturating_add(l.available) => {
                            outcome(l, false, until - now)
                        }
                        _ => outcome(l, true, Duration::ZERO),
                    })
                    .collect(),
                asked_redis: false,
            });
        }

        // Enough budget held for every window: admit locally.
        if state.leases.iter().all(|l| l.budget >= cost) {
            for l in state.leases.iter_mut() {
                l.budget -= cost;
            }
            if sync == SyncMode::Hybrid && !state.prefetching && needs_top_up(&state.leases) {
                state.prefetching = true;
                let cap = self.chunk_cap(key_id);
                spawn_top_up(
                    redis.clone(),
                    entry.clone(),
                    algo,
                    key_id.to_string(),
                    windows.to_vec(),
                    cap,
                );
            }
            return Ok(Acquired {
                outcomes: state
                    .leases
                    .iter()
                    .map(|l| outcome(l, true, Duration::ZERO))
                    .collect(),
                asked_redis: false,
            });
        }

        let need: Vec<u64> = state
            .leases
            .iter()
            .map(|l| cost.saturating_sub(l.budget))
            .collect();
        let (divisor, max_chunk) = match sync {
            SyncMode::Hybrid => (DIVISOR, self.chunk_cap(key_id)),
            SyncMode::Exact => (u64::MAX / 2, 0),
        };
        let grants =
            remote::acquire(redis, algo, key_id, windows, &need, divisor, max_chunk).await?;
        let now = Instant::now();
        let admitted = grants.iter().zip(&need).all(|(g, n)| g.granted >= *n);
        for (l, g) in state.leases.iter_mut().zip(&grants) {
            l.available = g.available;
            let life = match algo {
                Algorithm::Gcra => l.window.window,
                _ => Duration::from_micros(g.reset_us),
            };
            if admitted {
                l.budget = l.budget.saturating_add(g.granted).saturating_sub(cost);
                l.expires = now + life;
                l.over_until = None;
                l.last_grant = g.granted;
            } else if g.available.saturating_add(l.budget) < cost || g.retry_us > 0 {
                l.over_until = Some(now + Duration::from_micros(g.retry_us.max(1)));
                if l.budget == 0 {
                    l.expires = now + life;
                }
            }
        }
        Ok(Acquired {
            outcomes: state
                .leases
                .iter()
                .zip(&grants)
                .zip(&need)
                .map(|((l, g), n)| {
                    let ok = admitted || g.available >= *n;
                    outcome(
                        l,
                        ok,
                        Duration::from_micros(if ok { 0 } else { g.retry_us }),
                    )
                })
                .collect(),
            asked_redis: true,
        })
    }

    /// About two seconds of this key's use on this instance.
    fn chunk_cap(&self, key_id: &str) -> u64 {
        let per_second = self.usage.rate(&key_id).max(0.0);
        ((per_second * 2.0) as u64).clamp(MIN_CHUNK, MAX_CHUNK)
    }

    /// Takes `units` out of the budget held for `windows`; returns what the
    /// budget could not cover (to be charged in Redis).
    pub async fn consume(&self, key_id: &str, windows: &[Window], units: u64) -> u64 {
        let entry = self.entry(key_id);
        let mut state = entry.lock().await;
        let now = Instant::now();
        let mut uncovered = 0;
        for w in windows {
            let held = state
                .leases
                .iter_mut()
                .find(|l| l.window == *w && l.expires > now);
            let covered = held.map_or(0, |l| {
                let take = l.budget.min(units);
                l.budget -= take;
                l.available = l.available.saturating_sub(units - take);
                take
            });
            uncovered = uncovered.max(units - covered);
        }
        uncovered
    }

    /// Gives back units charged by `acquire` (a later key refused the request).
    pub async fn refund(&self, key_id: &str, windows: &[Window], cost: u64) {
        let entry = self.entry(key_id);
        let mut state = entry.lock().await;
        let now = Instant::now();
        for l in state
            .leases
            .iter_mut()
            .filter(|l| windows.contains(&l.window) && l.expires > now)
        {
            l.budget = l.budget.saturating_add(cost);
        }
    }

    /// Takes every unused unit of every live lease, for handing back to
    /// Redis when the process stops.
    pub async fn drain(&self) -> Vec<(String, Window, u64)> {
        let entries: Vec<(String, Entry)> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .map(|s| {
                        s.0.iter()
                            .map(|(k, e)| (k.to_string(), e.clone()))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            })
            .collect();
        let now = Instant::now();
        let mut unused = Vec::new();
        for (key, entry) in entries {
            let mut state = entry.lock().await;
            for l in state
                .leases
                .iter_mut()
                .filter(|l| l.budget > 0 && l.expires > now)
            {
                unused.push((key.clone(), l.window, l.budget));
                l.budget = 0;
            }
        }
        unused
    }

    pub fn keys(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |s| s.0.len()))
            .sum()
    }
}

fn needs_top_up(leases: &[Lease]) -> bool {
    leases
        .iter()
        .any(|l| l.last_grant >= PREFETCH_MIN_GRANT && l.budget < l.last_grant / 4)
}

/// Fetches the next lease before the current one runs out, so requests far
/// from their limit rarely wait on Redis.
fn spawn_top_up(
    redis: Arc<Redis>,
    entry: Entry,
    algo: Algorithm,
    key_id: String,
    windows: Vec<Window>,
    max_chunk: u64,
) {
    tokio::spawn(async move {
        let need = vec![0; windows.len()];
        let grants =
            remote::acquire(&redis, algo, &key_id, &windows, &need, DIVISOR, max_chunk).await;
        let mut state = entry.lock().await;
        state.prefetching = false;
        let Ok(grants) = grants else {
            return;
        };
        let now = Instant::now();
        for (w, g) in windows.iter().zip(grants) {
            let Some(l) = state.leases.iter_mut().find(|l| l.window == *w) else {
                continue;
            };
            let life = match algo {
                Algorithm::Gcra => w.window,
                _ => Duration::from_micros(g.reset_us),
            };
            let expires = now + life;
            // GCRA grants are reservations with no window to fall out of.
            let same_window = algo == Algorithm::Gcra
                || (l.expires > now
                    && l.expires.max(expires) - l.expires.min(expires)
                        < Duration::from_millis(500));
            // Units of a window that has ended count for nothing in the new one.
            l.budget = if same_window {
                l.budget.saturating_add(g.granted)
            } else {
                g.granted
            };
            l.available = g.available;
            l.expires = expires;
            if g.granted > 0 {
                l.last_grant = g.granted;
            }
        }
    });
}
