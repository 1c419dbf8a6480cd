//! The in-process store: exact within one process. It is the whole limiter
//! when no Redis is configured, and the fallback for `on_failure: local`.
//!
//! Sharded by key; each key holds the state of each of its windows, matched
//! by (limit, window) so a reload that keeps a window keeps its count.

use super::algo::{self, Outcome, Period, WindowState};
use super::packed::{PackedWindow, Slots};
use crate::cache::{KeyHasher, KeyMap};
use crate::config::{Algorithm, Window};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

const SHARDS: usize = 64;
/// A shard is swept for stale keys when it grows past this many.
const SWEEP_AT: usize = 4096;

/// One window of a key: 48 bytes, held inline for a key with one window.
#[derive(Clone, Copy)]
struct Slot {
    window: PackedWindow,
    state: WindowState,
}

/// A key's windows and when it was last counted (the shard's use counter,
/// not the clock: keys counted within the same second must still be told
/// apart, or a full store could forget a key used a moment ago): the least
/// recently used go first when the store is full.
struct Entry {
    slots: Slots<Slot>,
    used: u32,
}

struct Shard {
    keys: KeyMap<Box<str>, Entry>,
    sweep_at: usize,
    /// Counts the shard's uses; `Entry::used` is its value at the key's
    /// last use.
    clock: u32,
}

impl Shard {
    /// The next use's number. Once in 2^32 uses the numbers are renumbered
    /// in their order, so the order survives the counter's wrap.
    fn tick(&mut self) -> u32 {
        if self.clock == u32::MAX {
            let mut uses: Vec<u32> = self.keys.values().map(|e| e.used).collect();
            uses.sort_unstable();
            for e in self.keys.values_mut() {
                // Rank among the uses: at most the number of keys.
                let rank = uses.partition_point(|&u| u < e.used);
                e.used = u32::try_from(rank).unwrap_or(u32::MAX - 1);
            }
            self.clock = u32::try_from(uses.len()).unwrap_or(u32::MAX - 1);
        }
        self.clock += 1;
        self.clock
    }
}

pub struct LocalStore {
    shards: Vec<Mutex<Shard>>,
    hasher: KeyHasher,
    /// Keys kept per shard (`limits.max_keys`).
    per_shard: AtomicUsize,
}

impl Default for LocalStore {
    fn default() -> Self {
        LocalStore {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        keys: KeyMap::default(),
                        sweep_at: SWEEP_AT,
                        clock: 0,
                    })
                })
                .collect(),
            hasher: KeyHasher::default(),
            per_shard: AtomicUsize::new(super::hybrid::DEFAULT_MAX_KEYS.div_ceil(SHARDS)),
        }
    }
}

fn period(w: &Window) -> Period {
    Period::of(w)
}

/// Every window of the key has ended: the key can go.
fn all_stale(slots: &Slots<Slot>, algo: Algorithm, now: u64) -> bool {
    slots
        .slice()
        .iter()
        .all(|s| algo::is_stale(algo, &s.state, now, s.window.period()))
}

/// Makes room for one more key in a full shard: keys whose windows all
/// ended go, then, if it is still full, the least recently used eighth.
fn make_room(shard: &mut Shard, algo: Algorithm, now: u64, cap: usize) {
    if shard.keys.len() < cap {
        return;
    }
    shard.keys.retain(|_, e| !all_stale(&e.slots, algo, now));
    if shard.keys.len() < cap {
        return;
    }
    let mut ages: Vec<u32> = shard.keys.values().map(|e| e.used).collect();
    let go = (cap / 8).max(1).min(ages.len());
    let (_, cut, _) = ages.select_nth_unstable(go - 1);
    let cut = *cut;
    let before = shard.keys.len();
    let mut left = go;
    shard.keys.retain(|_, e| {
        if left > 0 && e.used <= cut {
            left -= 1;
            false
        } else {
            true
        }
    });
    crate::metrics::RATELIMIT_KEYS_EVICTED.inc_by((before - shard.keys.len()) as u64);
}

impl LocalStore {
    /// `limits.max_keys`: keys this store keeps.
    pub fn set_max_keys(&self, max_keys: usize) {
        self.per_shard
            .store(max_keys.div_ceil(SHARDS).max(1), Ordering::Relaxed);
    }

    fn shard(&self, key: &str) -> &Mutex<Shard> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// Checks every window of `key`; charges all of them only if all admit.
    /// Returns one outcome per window, in order.
    pub fn acquire(
        &self,
        algo: Algorithm,
        key: &str,
        windows: &[Window],
        cost: u64,
        now: u64,
    ) -> Vec<Outcome> {
        // A poisoned lock means a panic elsewhere; admit rather than wedge.
        let admit = || {
            windows
                .iter()
                .map(|w| Outcome {
                    allowed: true,
                    remaining: w.requests,
                    reset_us: period(w).length(),
                    retry_us: 0,
                })
                .collect()
        };
        let Ok(mut shard) = self.shard(key).lock() else {
            return admit();
        };
        if shard.keys.len() >= shard.sweep_at {
            shard.keys.retain(|_, e| !all_stale(&e.slots, algo, now));
            shard.sweep_at = (shard.keys.len() * 2).max(SWEEP_AT);
        }
        // The key's name is copied only for a key seen the first time.
        if !shard.keys.contains_key(key) {
            make_room(
                &mut shard,
                algo,
                now,
                self.per_shard.load(Ordering::Relaxed),
            );
            shard.keys.insert(
                key.into(),
                Entry {
                    slots: Slots::default(),
                    used: 0,
                },
            );
        }
        let used = shard.tick();
        let Some(entry) = shard.keys.get_mut(key) else {
            return admit();
        };
        entry.used = used;
        let slots = &mut entry.slots;
        // Keep the state of windows that still apply, start new ones.
        let _ = slots.align(
            windows,
            |s, w| s.window.same_counter(w),
            |w| Slot {
                window: PackedWindow::of(w),
                state: WindowState::EMPTY,
            },
        );
        // A reload that changed only a limit keeps the count.
        for (s, w) in slots.slice_mut().iter_mut().zip(windows) {
            s.window = PackedWindow::of(w);
        }
        let outcomes: Vec<Outcome> = slots
            .slice_mut()
            .iter_mut()
            .map(|s| {
                algo::check(
                    algo,
                    &mut s.state,
                    now,
                    s.window.requests,
                    s.window.period(),
                    cost,
                )
            })
            .collect();
        if outcomes.iter().all(|o| o.allowed) {
            for s in slots.slice_mut() {
                algo::commit(
                    algo,
                    &mut s.state,
                    now,
                    s.window.requests,
                    s.window.period(),
                    cost,
                );
            }
        }
        outcomes
    }

    /// Applies `f(state, limit, period)` to the
    /// slots of `key` that belong to `windows`.
    fn adjust(&self, key: &str, windows: &[Window], f: impl Fn(&mut WindowState, u64, Period)) {
        let Ok(mut shard) = self.shard(key).lock() else {
            return;
        };
        if let Some(entry) = shard.keys.get_mut(key) {
            for s in entry
                .slots
                .slice_mut()
                .iter_mut()
                .filter(|s| windows.iter().any(|w| s.window.same_counter(w)))
            {
                f(&mut s.state, s.window.requests, s.window.period());
            }
        }
    }

    /// Takes back a charge made by `acquire` (a later key refused the request).
    pub fn refund(&self, algo: Algorithm, key: &str, windows: &[Window], cost: u64, now: u64) {
        self.adjust(key, windows, |state, limit, window| {
            algo::refund(algo, state, now, limit, window, cost)
        });
    }

    /// Charges `cost` whether or not it fits (cost reported after the answer).
    pub fn charge(&self, algo: Algorithm, key: &str, windows: &[Window], cost: u64, now: u64) {
        self.adjust(key, windows, |state, limit, window| {
            algo::commit(algo, state, now, limit, window, cost)
        });
    }

    /// Read-only view for the quota API: outcome of a zero-cost check.
    pub fn peek(&self, algo: Algorithm, key: &str, windows: &[Window], now: u64) -> Vec<Outcome> {
        let shard = self.shard(key).lock().ok();
        windows
            .iter()
            .map(|w| {
                let mut state = shard
                    .as_ref()
                    .and_then(|s| s.keys.get(key))
                    .and_then(|e| e.slots.slice().iter().find(|s| s.window.same_counter(w)))
                    .map_or(WindowState::EMPTY, |s| s.state);
                algo::check(algo, &mut state, now, w.requests, period(w), 0)
            })
            .collect()
    }

    /// Drops every key whose windows have all ended, and gives the maps'
    /// spare room back: run now and then, so keys counted here while Redis
    /// was unreachable do not stay once their windows are over. One shard at
    /// a time, letting other tasks run in between, so freeing many keys at
    /// once does not hold up the requests on this thread.
    pub async fn sweep(&self, algo: Algorithm, now: u64) -> usize {
        let mut dropped = 0;
        for shard in &self.shards {
            dropped += Self::sweep_shard(shard, algo, now);
            tokio::task::yield_now().await;
        }
        dropped
    }

    fn sweep_shard(shard: &Mutex<Shard>, algo: Algorithm, now: u64) -> usize {
        let Ok(mut shard) = shard.lock() else {
            return 0;
        };
        let before = shard.keys.len();
        shard.keys.retain(|_, e| !all_stale(&e.slots, algo, now));
        if shard.keys.capacity() > 2 * shard.keys.len() + 64 {
            shard.keys.shrink_to_fit();
        }
        shard.sweep_at = (shard.keys.len() * 2).max(SWEEP_AT);
        before - shard.keys.len()
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |s| s.keys.len()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn w(requests: u64, secs: u64) -> Window {
        Window::every(requests, Duration::from_secs(secs))
    }

    const NOW: u64 = 1_000_000_000_000;

    #[test]
    fn all_windows_must_admit_and_none_is_charged_otherwise() {
        let store = LocalStore::default();
        let windows = [w(5, 5), w(7, 60)];
        let mut admitted = 0;
        for i in 0..20u64 {
            // 5 per 5 s, 7 per minute: two full 5 s windows give 5 + 2.
            let now = NOW + (i / 10) * 5_000_000;
            let o = store.acquire(Algorithm::FixedWindow, "k", &windows, 1, now);
            if o.iter().all(|o| o.allowed) {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 7);
        let minute = store.peek(Algorithm::FixedWindow, "k", &windows, NOW + 10_000_000);
        assert_eq!(minute[1].remaining, 0);
    }

    #[test]
    fn reloads_keep_state_of_unchanged_windows() {
        let store = LocalStore::default();
        for _ in 0..3 {
            store.acquire(Algorithm::FixedWindow, "k", &[w(5, 60)], 1, NOW);
        }
        let o = store.acquire(Algorithm::FixedWindow, "k", &[w(10, 1), w(5, 60)], 1, NOW);
        assert_eq!(o[1].remaining, 1);
        assert_eq!(o[0].remaining, 9);
    }

    #[test]
    fn stale_keys_are_swept() {
        let store = LocalStore::default();
        for i in 0..(SHARDS * SWEEP_AT * 2) {
            store.acquire(Algorithm::FixedWindow, &format!("k{i}"), &[w(5, 1)], 1, NOW);
        }
        let before = store.len();
        for i in 0..(SHARDS * SWEEP_AT) {
            store.acquire(
                Algorithm::FixedWindow,
                &format!("n{i}"),
                &[w(5, 1)],
                1,
                NOW + 5_000_000,
            );
        }
        assert!(
            store.len() < before + SHARDS * SWEEP_AT,
            "{} vs {before}",
            store.len()
        );
    }

    #[tokio::test]
    async fn a_sweep_drops_keys_whose_windows_ended() {
        let store = LocalStore::default();
        for i in 0..1000 {
            store.acquire(Algorithm::FixedWindow, &format!("k{i}"), &[w(5, 1)], 1, NOW);
        }
        store.acquire(Algorithm::FixedWindow, "long", &[w(5, 60)], 1, NOW);
        assert_eq!(store.sweep(Algorithm::FixedWindow, NOW).await, 0);
        assert_eq!(
            store.sweep(Algorithm::FixedWindow, NOW + 2_000_000).await,
            1000
        );
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn a_key_with_one_window_costs_one_72_byte_entry() {
        // Memory per key without Redis (README): the key's name, one
        // inline slot and when it was last used, no allocation of its own.
        assert_eq!(std::mem::size_of::<Slots<Slot>>(), 48);
        assert_eq!(std::mem::size_of::<(Box<str>, Entry)>(), 72);
        let store = LocalStore::default();
        store.acquire(Algorithm::FixedWindow, "one", &[w(5, 1)], 1, NOW);
        store.acquire(Algorithm::FixedWindow, "two", &[w(5, 1), w(9, 60)], 1, NOW);
        let shard = store.shard("one").lock().unwrap();
        assert!(matches!(
            shard.keys.get("one").map(|e| &e.slots),
            Some(Slots::One(_))
        ));
        drop(shard);
        let shard = store.shard("two").lock().unwrap();
        assert!(
            matches!(shard.keys.get("two").map(|e| &e.slots), Some(Slots::Many(s)) if s.len() == 2)
        );
    }

    #[tokio::test]
    async fn a_sweep_lets_requests_run_between_shards() {
        let store = LocalStore::default();
        for i in 0..SHARDS * 50 {
            store.acquire(Algorithm::FixedWindow, &format!("k{i}"), &[w(5, 1)], 1, NOW);
        }
        let (dropped, turns) =
            super::super::turns_beside(store.sweep(Algorithm::FixedWindow, NOW + 2_000_000)).await;
        assert_eq!(dropped, SHARDS * 50);
        assert!(turns >= SHARDS - 1, "{turns} turns in {SHARDS} shards");
    }

    #[test]
    fn a_full_store_forgets_the_least_recently_used_keys() {
        let store = LocalStore::default();
        store.set_max_keys(SHARDS * 8);
        // A hot key, counted every second, and a flood of keys used once.
        for i in 0..SHARDS as u64 * 100 {
            let now = NOW + i * 10_000;
            store.acquire(Algorithm::FixedWindow, "hot", &[w(1_000_000, 3600)], 1, now);
            store.acquire(
                Algorithm::FixedWindow,
                &format!("r{i}"),
                &[w(5, 3600)],
                1,
                now,
            );
        }
        assert!(store.len() <= SHARDS * 8, "{}", store.len());
        let o = store.peek(Algorithm::FixedWindow, "hot", &[w(1_000_000, 3600)], NOW);
        assert_eq!(o[0].remaining, 1_000_000 - SHARDS as u64 * 100);
    }

    #[test]
    fn keys_counted_within_one_second_are_still_told_apart_when_the_store_is_full() {
        let store = LocalStore::default();
        store.set_max_keys(SHARDS * 16);
        // Keys of one shard, so every new key presses on the hot ones.
        let home = store.shard("hot0") as *const _;
        let mut names = (0..).map(|i| format!("k{i}"));
        let mut same_shard = || loop {
            let name = names.next().unwrap_or_default();
            if std::ptr::eq(store.shard(&name), home) {
                return name;
            }
        };
        let hot: Vec<String> = (0..4).map(|_| same_shard()).collect();
        // All at the same instant: hot keys between floods of new keys.
        for _ in 0..200 {
            for h in &hot {
                store.acquire(Algorithm::FixedWindow, h, &[w(5, 3600)], 1, NOW);
            }
            for _ in 0..4 {
                let cold = same_shard();
                store.acquire(Algorithm::FixedWindow, &cold, &[w(5, 3600)], 1, NOW);
            }
        }
        for h in &hot {
            let o = store.peek(Algorithm::FixedWindow, h, &[w(5, 3600)], NOW);
            assert_eq!(o[0].remaining, 0, "{h}: the hot key's count was forgotten");
        }
    }

    #[test]
    fn the_use_counter_keeps_its_order_across_its_wrap() {
        let store = LocalStore::default();
        store.set_max_keys(SHARDS * 8);
        for name in ["a", "b", "c"] {
            store.acquire(Algorithm::FixedWindow, name, &[w(5, 3600)], 1, NOW);
        }
        let mut shard = store.shard("a").lock().unwrap();
        shard.clock = u32::MAX - 1;
        let before = shard.keys.get("a").map(|e| e.used);
        let first = shard.tick();
        assert_eq!(first, u32::MAX);
        let second = shard.tick();
        // Renumbered: every key's number is below the new one.
        assert!(shard.keys.values().all(|e| e.used < second), "{second}");
        assert!(before.is_some());
    }

    #[test]
    fn refund_returns_the_charge() {
        let store = LocalStore::default();
        store.acquire(Algorithm::FixedWindow, "k", &[w(2, 60)], 2, NOW);
        store.refund(Algorithm::FixedWindow, "k", &[w(2, 60)], 2, NOW);
        assert!(store.acquire(Algorithm::FixedWindow, "k", &[w(2, 60)], 2, NOW)[0].allowed);
    }
}
