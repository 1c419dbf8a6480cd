//! Leases: each instance takes budget from Redis in chunks and admits
//! locally while it holds some. Redis counts leased units as used, so the
//! fleet can never admit more than the limit; chunks are a share of what is
//! still available, so they shrink to single units near the limit and
//! instances do not sit on budget others need. A key that Redis refused is
//! refused locally, with no Redis call, until its retry time.
//!
//! Lease size: a key's rate on this instance times a horizon that depends on
//! its headroom. Far from the limit (more than half of it available) the
//! horizon grows to the rest of the window, so a steady key costs about one
//! Redis call per window; nearer the limit it falls to two seconds, and the
//! `available / DIVISOR` share rule in the script shrinks chunks to single
//! units at the end.
//!
//! A keeper task (started by the first acquire, one per process) forgets
//! keys whose leases have all ended, once a second, and hands back to Redis
//! the leases of keys this instance has not seen for `IDLE`, so budget does
//! not sit on an instance that stopped seeing a key.
//!
//! `sync: exact` is the same path with chunks of exactly the request's cost:
//! one script call per admitted request.

use super::algo::Outcome;
use super::packed::{PackedWindow, Slots};
use super::remote;
use crate::cache::{KeyHasher, KeyMap};
use crate::config::{Algorithm, SyncMode, Window};
use crate::redis_client::{Redis, Unavailable};
use arc_swap::ArcSwapOption;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use crate::clock::Instant;
use std::time::Duration;

const SHARDS: usize = 64;
/// A lease takes this share of the available units...
const DIVISOR: u64 = 32;
/// ...but never more than this many (the share rule is the real bound).
const MAX_CHUNK: u64 = 1 << 40;
/// Smallest lease cap, so a key starts with chunks before its rate is known.
const MIN_CHUNK: u64 = 64;
/// Far from its limit (more than half available) a key's lease is at least
/// this share of what is available, up to FAR_FLOOR_MAX units: a burst pays
/// a few calls before the rate estimate catches up, and even a large fleet
/// holds only a small part of the limit this way.
const FAR_FLOOR_SHARE: u64 = 1024;
const FAR_FLOOR_MAX: u64 = 4096;
/// Horizon of a lease near the limit, in seconds of the key's rate.
const NEAR_HORIZON_SECS: f64 = 2.0;
/// Far from the limit a lease covers the rest of the window times this, so
/// a steady key's lease does not fall under the top-up mark (a quarter of
/// the grant) before its window ends.
const FAR_HORIZON_FACTOR: f64 = 1.5;
/// Below this grant size the key is near its limit: no background top-ups,
/// so no instance sits on budget another one needs.
const PREFETCH_MIN_GRANT: u64 = 8;
/// How often the keeper sweeps ended keys and hands idle leases back.
const KEEP_EVERY: Duration = Duration::from_secs(1);
/// A key this instance has not seen for this long hands its lease back.
/// The trade: a key whose requests come further apart than this pays a
/// hand-back and a new lease per request (when its lease is worth returning,
/// below), and budget can sit idle on an instance this long.
pub const IDLE: Duration = Duration::from_secs(5);
/// Leases smaller than 1/RETURN_SHARE of the limit are not worth a Redis
/// call to hand back (they end with their window): far from a large limit
/// (the common many-keys case) nothing is handed back.
const RETURN_SHARE: u64 = 256;
/// A lease whose window ends sooner than this is left to end: the hand-back
/// could land in the next window.
const RETURN_MARGIN_US: u64 = 1_000_000;

/// One window's lease, in microseconds since `Inner::epoch`.
#[derive(Clone, Copy)]
struct Lease {
    window: PackedWindow,
    /// Units this instance holds.
    budget: u64,
    /// Units nobody held at the last answer from Redis.
    available: u64,
    /// The lease dies with its window.
    expires: u64,
    /// Refused by Redis: refuse locally until then (0: not refused) when the
    /// cost exceeds `budget + available`.
    over_until: u64,
    /// Size of the last grant: the budget is topped up in the background
    /// when it falls under a quarter of it.
    last_grant: u64,
}

impl Lease {
    fn fresh(window: Window, now: u64) -> Lease {
        Lease {
            window: PackedWindow::of(&window),
            budget: 0,
            available: window.requests,
            expires: now,
            over_until: 0,
            last_grant: 0,
        }
    }

    fn over(&self, now: u64) -> bool {
        self.over_until > now
    }
}

/// Everything one instance knows about one key (no allocation of its own
/// beyond the key's name and, for several windows, the lease slice).
struct KeyState {
    held: Slots<Lease>,
    /// Last request for the key (µs since the epoch) in the low 63 bits;
    /// the top bit: a Redis call for this key is under way (hybrid), and
    /// requests that need budget wait for its answer instead of making
    /// their own. One word for both keeps the state at 64 bytes.
    stamp: u64,
}

const BUSY: u64 = 1 << 63;

impl KeyState {
    fn new(now: u64) -> KeyState {
        KeyState {
            held: Slots::default(),
            stamp: now & !BUSY,
        }
    }

    fn last_used(&self) -> u64 {
        self.stamp & !BUSY
    }

    fn used_at(&mut self, now: u64) {
        self.stamp = (self.stamp & BUSY) | (now & !BUSY);
    }

    fn busy(&self) -> bool {
        self.stamp & BUSY != 0
    }

    fn set_busy(&mut self, busy: bool) {
        if busy {
            self.stamp |= BUSY;
        } else {
            self.stamp &= !BUSY;
        }
    }
}

struct Shard {
    map: Mutex<KeyMap<Box<str>, KeyState>>,
    /// Woken when a key of this shard stops being busy.
    done: tokio::sync::Notify,
}

struct Inner {
    shards: Box<[Shard]>,
    hasher: KeyHasher,
    epoch: Instant,
    /// Units per second each key uses on this instance.
    usage: super::rate::UsageRate,
    /// The Redis handle and algorithm of the latest acquire, for the keeper.
    redis: ArcSwapOption<Redis>,
    algo: AtomicU8,
    keeper_running: AtomicBool,
}

pub struct Leases {
    inner: Arc<Inner>,
}

impl Default for Leases {
    fn default() -> Self {
        Leases {
            inner: Arc::new(Inner {
                shards: (0..SHARDS)
                    .map(|_| Shard {
                        map: Mutex::new(KeyMap::default()),
                        done: tokio::sync::Notify::new(),
                    })
                    .collect(),
                hasher: KeyHasher::default(),
                epoch: Instant::now(),
                usage: Default::default(),
                redis: ArcSwapOption::empty(),
                algo: AtomicU8::new(0),
                keeper_running: AtomicBool::new(false),
            }),
        }
    }
}

/// A decision and whether Redis was asked for it.
pub struct Acquired {
    pub outcomes: Vec<Outcome>,
    pub asked_redis: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn algo_code(a: Algorithm) -> u8 {
    match a {
        Algorithm::FixedWindow => 0,
        Algorithm::SlidingWindow => 1,
        Algorithm::Gcra => 2,
    }
}

fn algo_from(c: u8) -> Algorithm {
    match c {
        1 => Algorithm::SlidingWindow,
        2 => Algorithm::Gcra,
        _ => Algorithm::FixedWindow,
    }
}

/// Clears a key's busy flag and wakes its waiters, also when the call that
/// set it is dropped half-way (a client that went away).
struct Busy<'a> {
    shard: &'a Shard,
    key: &'a str,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Some(k) = lock(&self.shard.map).get_mut(self.key) {
            k.set_busy(false);
        }
        self.shard.done.notify_waiters();
    }
}

enum Step {
    Done(Acquired),
    Wait,
    Ask {
        need: Vec<u64>,
        reserved: Vec<u64>,
        max_chunk: u64,
    },
}

impl Inner {
    fn now(&self) -> u64 {
        us(self.epoch.elapsed())
    }

    fn shard(&self, key_id: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(key_id) as usize) % SHARDS]
    }

    /// The lease cap for the next call: the key's rate on this instance
    /// times the horizon of its tightest window.
    fn chunk_cap(&self, key_id: &str, leases: &[Lease], now: u64) -> u64 {
        let per_second = self.usage.rate(key_id, now);
        let horizon = leases
            .iter()
            .map(|l| horizon_secs(l, now))
            .fold(f64::INFINITY, f64::min);
        let cap = per_second * horizon;
        let floor = far_floor(leases);
        if cap.is_finite() {
            (cap as u64).clamp(floor, MAX_CHUNK)
        } else {
            floor
        }
    }

    /// Applies Redis's answer for `windows` to the key's leases: `need[i]`
    /// units of the grant pay for the request, `reserved[i]` units were
    /// taken from the budget for it (given back on a refusal). Returns
    /// whether every window admitted the request.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        key_id: &str,
        algo: Algorithm,
        windows: &[Window],
        grants: &[remote::Grant],
        need: &[u64],
        reserved: &[u64],
        top_up: bool,
    ) -> (bool, Vec<Outcome>) {
        let admitted = grants.iter().zip(need).all(|(g, n)| g.granted >= *n);
        let mut map = lock(&self.shard(key_id).map);
        let now = self.now();
        let mut state = map.get_mut(key_id);
        let mut outcomes = Vec::with_capacity(windows.len());
        for (i, (w, g)) in windows.iter().zip(grants).enumerate() {
            let life = match algo {
                Algorithm::Gcra => us(w.window),
                _ => g.reset_us,
            };
            let expires = now.saturating_add(life);
            let lease = state
                .as_mut()
                .and_then(|s| s.held.slice_mut().iter_mut().find(|l| l.window.is(w)));
            let (need, reserved) = (need[i], reserved[i]);
            let ok = admitted || g.available >= need;
            let Some(l) = lease else {
                // The windows changed during the call: nothing to keep.
                outcomes.push(Outcome {
                    allowed: ok,
                    remaining: g.available,
                    reset_us: life,
                    retry_us: if ok { 0 } else { g.retry_us },
                });
                continue;
            };
            l.available = g.available;
            if admitted {
                // GCRA grants are reservations with no window to fall out of;
                // units of a window that has ended count for nothing.
                let same_window = algo == Algorithm::Gcra
                    || (l.expires > now && l.expires.abs_diff(expires) < 500_000);
                let kept = if same_window { l.budget } else { 0 };
                l.budget = kept.saturating_add(g.granted - need);
                l.expires = expires;
                if !top_up {
                    l.over_until = 0;
                }
                if g.granted > 0 {
                    l.last_grant = g.granted;
                }
            } else {
                l.budget = l.budget.saturating_add(reserved);
                if g.available.saturating_add(l.budget) < need + reserved || g.retry_us > 0 {
                    l.over_until = now.saturating_add(g.retry_us.max(1));
                    if l.budget == 0 {
                        l.expires = expires;
                    }
                }
            }
            outcomes.push(Outcome {
                allowed: ok,
                remaining: l.available.saturating_add(l.budget),
                reset_us: l.expires.saturating_sub(now),
                retry_us: if ok { 0 } else { g.retry_us },
            });
        }
        (admitted, outcomes)
    }
}

/// Lines a key's leases up with the windows that apply now (in place when
/// they already are: the common case costs no allocation).
fn align(state: &mut KeyState, windows: &[Window], now: u64) {
    state.held.align(
        windows,
        |l, w| l.window.is(w) && l.expires > now,
        |w| Lease::fresh(*w, now),
    );
    for l in state.held.slice_mut() {
        if l.over_until != 0 && l.over_until <= now {
            l.over_until = 0;
        }
    }
}

/// The smallest lease cap for these windows: MIN_CHUNK, or more while every
/// window is far from its limit.
fn far_floor(leases: &[Lease]) -> u64 {
    leases
        .iter()
        .map(|l| {
            if l.available.saturating_mul(2) > l.window.requests {
                (l.available / FAR_FLOOR_SHARE).min(FAR_FLOOR_MAX)
            } else {
                0
            }
        })
        .min()
        .unwrap_or(0)
        .max(MIN_CHUNK)
}

/// Seconds of the key's rate one lease should cover: the rest of the
/// window (times FAR_HORIZON_FACTOR) with all of the limit available,
/// falling linearly to NEAR_HORIZON_SECS with half of it or less.
fn horizon_secs(l: &Lease, now: u64) -> f64 {
    let limit = l.window.requests.max(1);
    let headroom = l.available.min(limit) as f64 / limit as f64;
    let far = ((headroom - 0.5) * 2.0).clamp(0.0, 1.0);
    let rest = if l.expires > now {
        (l.expires - now) as f64 / 1e6
    } else {
        l.window.secs_f64()
    };
    NEAR_HORIZON_SECS.max(far * rest * FAR_HORIZON_FACTOR)
}

fn needs_top_up(leases: &[Lease]) -> bool {
    leases
        .iter()
        .any(|l| l.last_grant >= PREFETCH_MIN_GRANT && l.budget < l.last_grant / 4)
}

fn outcome(l: &Lease, now: u64, allowed: bool, retry_us: u64) -> Outcome {
    Outcome {
        allowed,
        remaining: l.available.saturating_add(l.budget),
        reset_us: l.expires.saturating_sub(now),
        retry_us,
    }
}

impl Leases {
    pub async fn acquire(
        &self,
        redis: &Arc<Redis>,
        algo: Algorithm,
        sync: SyncMode,
        key_id: &str,
        windows: &[Window],
        cost: u64,
    ) -> Result<Acquired, Unavailable> {
        let inner = &*self.inner;
        inner.usage.observe(key_id, cost, inner.now());
        let shard = inner.shard(key_id);
        let hybrid = sync == SyncMode::Hybrid;
        // Waits are capped so a lost wake-up can only cost time, never hang.
        let wait_cap = redis.settings.timeout + Duration::from_millis(50);
        let (need, reserved, max_chunk) = loop {
            let done = shard.done.notified();
            tokio::pin!(done);
            let step = self.try_local(shard, redis, algo, hybrid, key_id, windows, cost, &mut done);
            // After the key is in the map, so a keeper that is stopping sees it.
            self.keep(redis, algo);
            match step {
                Step::Done(a) => return Ok(a),
                Step::Wait => {
                    let _ = tokio::time::timeout(wait_cap, done).await;
                }
                Step::Ask {
                    need,
                    reserved,
                    max_chunk,
                } => break (need, reserved, max_chunk),
            }
        };
        let _busy = hybrid.then_some(Busy { shard, key: key_id });
        let divisor = if hybrid { DIVISOR } else { u64::MAX / 2 };
        let grants = match remote::acquire(redis, algo, key_id, windows, &need, divisor, max_chunk)
            .await
        {
            Ok(g) => g,
            Err(e) => {
                // The reserved units are still this instance's.
                let mut map = lock(&shard.map);
                if let Some(s) = map.get_mut(key_id) {
                    for (w, r) in windows.iter().zip(&reserved) {
                        if let Some(l) = s.held.slice_mut().iter_mut().find(|l| l.window.is(w)) {
                            l.budget = l.budget.saturating_add(*r);
                        }
                    }
                }
                return Err(e);
            }
        };
        let (_, outcomes) = inner.apply(key_id, algo, windows, &grants, &need, &reserved, false);
        Ok(Acquired {
            outcomes,
            asked_redis: true,
        })
    }

    /// The part of `acquire` under the shard lock: a local decision, a wait
    /// for the key's call under way, or what to ask Redis for.
    #[allow(clippy::too_many_arguments)]
    fn try_local(
        &self,
        shard: &Shard,
        redis: &Arc<Redis>,
        algo: Algorithm,
        hybrid: bool,
        key_id: &str,
        windows: &[Window],
        cost: u64,
        done: &mut std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
    ) -> Step {
        let inner = &*self.inner;
        let mut map = lock(&shard.map);
        let now = inner.now();
        if !map.contains_key(key_id) {
            map.insert(key_id.into(), KeyState::new(now));
        }
        let Some(state) = map.get_mut(key_id) else {
            return Step::Wait;
        };
        state.used_at(now);
        align(state, windows, now);
        let busy = state.busy();
        let leases = state.held.slice_mut();

        // Known to be over: no Redis call.
        if leases
            .iter()
            .any(|l| l.over(now) && cost > l.budget.saturating_add(l.available))
        {
            return Step::Done(Acquired {
                outcomes: leases
                    .iter()
                    .map(|l| {
                        if l.over(now) && cost > l.budget.saturating_add(l.available) {
                            outcome(l, now, false, l.over_until - now)
                        } else {
                            outcome(l, now, true, 0)
                        }
                    })
                    .collect(),
                asked_redis: false,
            });
        }

        // Enough budget held for every window: admit locally.
        if leases.iter().all(|l| l.budget >= cost) {
            for l in leases.iter_mut() {
                l.budget -= cost;
            }
            let outcomes = leases.iter().map(|l| outcome(l, now, true, 0)).collect();
            if hybrid && !busy && needs_top_up(state.held.slice()) {
                state.set_busy(true);
                let cap = inner.chunk_cap(key_id, state.held.slice(), now);
                spawn_top_up(
                    self.inner.clone(),
                    redis.clone(),
                    algo,
                    key_id.to_string(),
                    windows.to_vec(),
                    cap,
                );
            }
            return Step::Done(Acquired {
                outcomes,
                asked_redis: false,
            });
        }

        if hybrid && busy {
            // Registered before the lock is let go: the wake-up cannot be missed.
            done.as_mut().enable();
            return Step::Wait;
        }
        let reserved: Vec<u64> = leases.iter().map(|l| l.budget.min(cost)).collect();
        let need: Vec<u64> = reserved.iter().map(|r| cost - r).collect();
        for (l, r) in leases.iter_mut().zip(&reserved) {
            l.budget -= r;
        }
        let max_chunk = if hybrid {
            state.set_busy(true);
            inner.chunk_cap(key_id, state.held.slice(), now)
        } else {
            0
        };
        Step::Ask {
            need,
            reserved,
            max_chunk,
        }
    }

    /// Remembers the Redis handle for the keeper and starts it if needed.
    fn keep(&self, redis: &Arc<Redis>, algo: Algorithm) {
        let inner = &*self.inner;
        let same = inner
            .redis
            .load()
            .as_ref()
            .is_some_and(|r| Arc::ptr_eq(r, redis));
        if !same {
            inner.redis.store(Some(redis.clone()));
        }
        if inner.algo.load(Ordering::Relaxed) != algo_code(algo) {
            inner.algo.store(algo_code(algo), Ordering::Relaxed);
        }
        if !inner.keeper_running.load(Ordering::Acquire)
            && !inner.keeper_running.swap(true, Ordering::AcqRel)
        {
            spawn_keeper(Arc::downgrade(&self.inner));
        }
    }

    /// Takes `units` out of the budget held for `windows`; returns what the
    /// budget could not cover (to be charged in Redis).
    pub async fn consume(&self, key_id: &str, windows: &[Window], units: u64) -> u64 {
        let inner = &*self.inner;
        let mut map = lock(&inner.shard(key_id).map);
        let now = inner.now();
        let Some(state) = map.get_mut(key_id) else {
            return if windows.is_empty() { 0 } else { units };
        };
        let mut uncovered = 0;
        for w in windows {
            let held = state
                .held
                .slice_mut()
                .iter_mut()
                .find(|l| l.window.is(w) && l.expires > now);
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
        let inner = &*self.inner;
        let mut map = lock(&inner.shard(key_id).map);
        let now = inner.now();
        if let Some(state) = map.get_mut(key_id) {
            for l in state
                .held
                .slice_mut()
                .iter_mut()
                .filter(|l| windows.iter().any(|w| l.window.is(w)) && l.expires > now)
            {
                l.budget = l.budget.saturating_add(cost);
            }
        }
    }

    /// Takes every unused unit of every live lease, for handing back to
    /// Redis when the process stops; a lease whose window ends within
    /// RETURN_MARGIN_US is left to end (its hand-back could land in the
    /// next window and let that one admit more than its limit).
    pub async fn drain(&self) -> Vec<(String, Window, u64)> {
        let keep_until = self.inner.now().saturating_add(RETURN_MARGIN_US);
        self.inner.take_unused(|_, l| l.expires > keep_until).await
    }

    /// Hands back to Redis the leases of keys not seen for `idle` (at least
    /// 1/RETURN_SHARE of the limit, in a window with time left), so another
    /// instance can admit them; also forgets keys whose leases have all
    /// ended. Returns how many leases went back.
    pub async fn hand_back_idle(&self, redis: &Redis, algo: Algorithm, idle: Duration) -> usize {
        self.inner.hand_back_idle(redis, algo, idle).await
    }

    pub fn keys(&self) -> usize {
        self.inner.keys()
    }

    /// Unused units this instance holds for `window` of `key_id` (tests).
    #[cfg(test)]
    pub fn held(&self, key_id: &str, window: &Window) -> u64 {
        let inner = &*self.inner;
        let now = inner.now();
        let map = lock(&inner.shard(key_id).map);
        map.get(key_id)
            .and_then(|s| {
                s.held
                    .slice()
                    .iter()
                    .find(|l| l.window.is(window) && l.expires > now)
                    .map(|l| l.budget)
            })
            .unwrap_or(0)
    }
}

impl Inner {
    fn keys(&self) -> usize {
        self.shards.iter().map(|s| lock(&s.map).len()).sum()
    }

    /// Zeroes and returns the budget of every live lease `pick` chooses
    /// (given the key's state and the lease). One shard at a time, letting
    /// other tasks run in between (see `sweep`).
    async fn take_unused(
        &self,
        pick: impl Fn(&KeyState, &Lease) -> bool,
    ) -> Vec<(String, Window, u64)> {
        let now = self.now();
        let mut unused = Vec::new();
        for shard in self.shards.iter() {
            {
                let mut map = lock(&shard.map);
                for (key, state) in map.iter_mut() {
                    for i in 0..state.held.slice().len() {
                        let l = &state.held.slice()[i];
                        if l.budget > 0 && l.expires > now && pick(state, l) {
                            unused.push((key.to_string(), l.window.window(), l.budget));
                            state.held.slice_mut()[i].budget = 0;
                        }
                    }
                }
            }
            tokio::task::yield_now().await;
        }
        unused
    }

    /// Forgets keys that nobody is using and whose leases have all ended,
    /// and gives the memory back. One shard at a time, letting other tasks
    /// run in between: fixed windows all end at once, and freeing every key
    /// of a large instance in one go held its worker thread (bench/memory.py:
    /// 135,000 keys in 7 ms; now at most 0.15 ms per shard), delaying every
    /// request and lease answer on it.
    async fn sweep(&self) {
        for shard in self.shards.iter() {
            self.sweep_shard(shard);
            tokio::task::yield_now().await;
        }
    }

    fn sweep_shard(&self, shard: &Shard) {
        let now = self.now();
        let mut map = lock(&shard.map);
        let before = map.len();
        map.retain(|_, k| {
            k.busy()
                || k.held
                    .slice()
                    .iter()
                    .any(|l| l.expires > now || l.over(now))
        });
        // Shrunk only well below capacity, so a map that empties and
        // fills again with each window does not reallocate every time.
        if map.len() < before && map.capacity() > 4 * map.len() + 64 {
            map.shrink_to_fit();
        }
    }

    async fn hand_back_idle(&self, redis: &Redis, algo: Algorithm, idle: Duration) -> usize {
        self.sweep().await;
        let now = self.now();
        let idle = us(idle);
        let unused = self
            .take_unused(|k, l| {
                !k.busy()
                    && now.saturating_sub(k.last_used()) >= idle
                    && l.expires > now.saturating_add(RETURN_MARGIN_US)
                    && l.budget.saturating_mul(RETURN_SHARE) >= l.window.requests
            })
            .await;
        let mut returned = 0;
        for (key, window, units) in unused {
            let n = i64::try_from(units).unwrap_or(i64::MAX);
            if remote::charge(redis, algo, &key, &[window], -n)
                .await
                .is_ok()
            {
                returned += 1;
            } else {
                // Still counted as used in Redis: the units stay this instance's.
                let mut map = lock(&self.shard(&key).map);
                if let Some(l) = map
                    .get_mut(key.as_str())
                    .and_then(|s| s.held.slice_mut().iter_mut().find(|l| l.window.is(&window)))
                {
                    l.budget = l.budget.saturating_add(units);
                }
            }
        }
        returned
    }
}

/// Sweeps ended keys and hands idle leases back every KEEP_EVERY while this
/// instance holds any key, with the Redis handle of the latest acquire; it
/// stops when no key is left (the next acquire starts it again) or when the
/// leases are dropped.
fn spawn_keeper(inner: Weak<Inner>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(KEEP_EVERY).await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let redis = inner.redis.load_full();
            let algo = algo_from(inner.algo.load(Ordering::Relaxed));
            match redis {
                Some(redis) => {
                    inner.hand_back_idle(&redis, algo, IDLE).await;
                }
                None => inner.sweep().await,
            }
            if inner.keys() == 0 {
                inner.keeper_running.store(false, Ordering::Release);
                // A key that arrived meanwhile saw the keeper running.
                if inner.keys() == 0 || inner.keeper_running.swap(true, Ordering::AcqRel) {
                    return;
                }
            }
        }
    });
}

/// Fetches the next lease before the current one runs out, so requests far
/// from their limit rarely wait on Redis.
fn spawn_top_up(
    inner: Arc<Inner>,
    redis: Arc<Redis>,
    algo: Algorithm,
    key_id: String,
    windows: Vec<Window>,
    max_chunk: u64,
) {
    tokio::spawn(async move {
        let _busy = Busy {
            shard: inner.shard(&key_id),
            key: &key_id,
        };
        let need = vec![0; windows.len()];
        let Ok(grants) =
            remote::acquire(&redis, algo, &key_id, &windows, &need, DIVISOR, max_chunk).await
        else {
            return;
        };
        inner.apply(&key_id, algo, &windows, &grants, &need, &need, true);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_state_is_64_bytes() {
        // Memory per key (README, bench/memory.py): one state per key, its
        // one lease inline.
        assert_eq!(std::mem::size_of::<Lease>(), 56);
        assert_eq!(std::mem::size_of::<Slots<Lease>>(), 56);
        assert_eq!(std::mem::size_of::<KeyState>(), 64);
        let mut k = KeyState::new(12_345);
        k.set_busy(true);
        k.used_at(99_999);
        assert!(k.busy());
        assert_eq!(k.last_used(), 99_999);
        k.set_busy(false);
        assert!(!k.busy());
        assert_eq!(k.last_used(), 99_999);
    }

    fn lease(requests: u64, available: u64, left_secs: u64, now: u64) -> Lease {
        Lease {
            available,
            expires: now + left_secs * 1_000_000,
            ..Lease::fresh(Window::every(requests, Duration::from_secs(60)), now)
        }
    }

    #[test]
    fn far_from_the_limit_a_first_lease_is_a_small_share_of_the_limit() {
        let now = 1_000_000_000;
        // Limit 10^6, all available: 976 units before any rate is known.
        assert_eq!(far_floor(&[lease(1_000_000, 1_000_000, 40, now)]), 976);
        // Capped, and never under MIN_CHUNK.
        assert_eq!(
            far_floor(&[lease(u64::MAX / 4, u64::MAX / 4, 40, now)]),
            4096
        );
        assert_eq!(far_floor(&[lease(300, 300, 40, now)]), MIN_CHUNK);
        // Half or less available: no floor beyond MIN_CHUNK; the tightest
        // window decides.
        assert_eq!(far_floor(&[lease(1_000_000, 400_000, 40, now)]), MIN_CHUNK);
        assert_eq!(
            far_floor(&[
                lease(1_000_000, 1_000_000, 40, now),
                lease(100_000, 100_000, 40, now)
            ]),
            97
        );
    }

    #[test]
    fn horizon_grows_with_headroom() {
        let now = 5_000_000;
        // All of the limit available: the rest of the window, with margin.
        assert_eq!(horizon_secs(&lease(1000, 1000, 40, now), now), 60.0);
        // Three quarters: half of that.
        assert_eq!(horizon_secs(&lease(1000, 750, 40, now), now), 30.0);
        // Half or less: two seconds, as before.
        assert_eq!(horizon_secs(&lease(1000, 500, 40, now), now), 2.0);
        assert_eq!(horizon_secs(&lease(1000, 0, 40, now), now), 2.0);
        // A lease that has ended: a whole window ahead.
        assert_eq!(horizon_secs(&lease(1000, 1000, 0, now), now), 90.0);
    }

    #[test]
    fn cap_is_the_floor_before_the_rate_is_known() {
        let leases = Leases::default();
        let now = leases.inner.now();
        let l = [lease(1_000_000, 1_000_000, 50, now)];
        assert_eq!(leases.inner.chunk_cap("k:new", &l, now), 976);
        let near = [lease(1_000, 100, 50, now)];
        assert_eq!(leases.inner.chunk_cap("k:new", &near, now), MIN_CHUNK);
    }

    #[tokio::test]
    async fn keys_whose_leases_ended_are_swept() {
        let leases = Leases::default();
        let now = leases.inner.now();
        for i in 0..5000 {
            let key = format!("k:{i}");
            let shard = leases.inner.shard(&key);
            let ended = i % 2 == 0;
            lock(&shard.map).insert(
                key.into(),
                KeyState {
                    held: Slots::One(lease(100, 100, if ended { 0 } else { 60 }, now)),
                    stamp: now,
                },
            );
        }
        assert_eq!(leases.keys(), 5000);
        leases.inner.sweep().await;
        assert_eq!(leases.keys(), 2500);
        // The live ones: consumed and refunded as before.
        let w = [Window::every(100, Duration::from_secs(60))];
        assert_eq!(leases.consume("k:1", &w, 3).await, 3);
        assert_eq!(leases.consume("k:0", &w, 3).await, 3);
        assert!(leases.drain().await.is_empty());
    }

    #[tokio::test]
    async fn a_sweep_lets_requests_run_between_shards() {
        let leases = Leases::default();
        let now = leases.inner.now();
        for i in 0..SHARDS * 50 {
            let key = format!("k:{i}");
            let shard = leases.inner.shard(&key);
            lock(&shard.map).insert(
                key.into(),
                KeyState {
                    held: Slots::One(lease(100, 100, 0, now)),
                    stamp: now,
                },
            );
        }
        let ((), turns) = super::super::turns_beside(leases.inner.sweep()).await;
        assert_eq!(leases.keys(), 0);
        assert!(turns >= SHARDS - 1, "{turns} turns in {SHARDS} shards");
        let (unused, turns) =
            super::super::turns_beside(leases.inner.take_unused(|_, _| true)).await;
        assert!(unused.is_empty());
        assert!(turns >= SHARDS - 1, "{turns} turns in {SHARDS} shards");
    }
}
