//! The one concurrent map behind tollgate's in-process caches and per-key
//! state: string keys spread over mutex-guarded shards (a random hasher per
//! map, so keys chosen by clients cannot pile into one shard), with a bound
//! that is enforced when an entry is added.
//!
//! The map does not know when an entry is dead: each call that may add an
//! entry passes a `live` test (an expiry against the caller's clock, a
//! window that has passed, a lease nobody holds), and [`ShardedMap::get_live`]
//! drops a dead entry it finds. That keeps one type for caches with a TTL,
//! caches whose entries carry their own expiry, and state that is only
//! stale once an algorithm says so.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The hasher of the in-process maps keyed by what requests bring (tokens,
/// limit keys): foldhash, seeded at random for each map. std's SipHash took
/// about 1,100 instructions a request hashing a token for its shard and its
/// table (callgrind); the keys that reach these maps are verified tokens or
/// names tollgate derived, and every map has its own seed.
#[cfg(not(test))]
pub type KeyHasher = foldhash::fast::RandomState;
/// Seeded the same in unit tests, so a simulation replays exactly.
#[cfg(test)]
pub type KeyHasher = foldhash::fast::FixedState;
pub type KeyMap<K, V> = HashMap<K, V, KeyHasher>;

/// How a shard keeps its size in check when an entry is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// At most this many entries in all (split evenly over the shards; 0
    /// stores nothing). A full shard first drops its dead entries, then, if
    /// still full, an arbitrary eighth of the rest: for a cache, where a
    /// dropped entry costs one more lookup.
    Capacity(usize),
    /// No hard limit: a shard that reaches this many entries (split evenly
    /// over the shards) drops its dead ones, and sweeps again only once it
    /// holds twice what survived. For state that must not be forgotten while
    /// live; the growing threshold keeps sweeps rare when most keys are live.
    SweepAt(usize),
}

struct Shard<V> {
    map: KeyMap<Box<str>, V>,
    /// Size at which the next sweep happens.
    sweep_at: usize,
}

pub struct ShardedMap<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    hasher: KeyHasher,
    bound: Bound,
    /// `Capacity`: entries per shard; `SweepAt`: the first sweep threshold.
    per_shard: usize,
}

impl<V> ShardedMap<V> {
    /// A map of `shards` shards (at least one) bounded by `bound`.
    pub fn new(shards: usize, bound: Bound) -> Self {
        let shards = shards.max(1);
        let per_shard = match bound {
            Bound::Capacity(n) => n.div_ceil(shards),
            Bound::SweepAt(n) => n.div_ceil(shards).max(1),
        };
        ShardedMap {
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        map: KeyMap::default(),
                        sweep_at: per_shard,
                    })
                })
                .collect(),
            hasher: KeyHasher::default(),
            bound,
            per_shard,
        }
    }

    /// The shard of `key`, locked. A panic while a shard was held leaves a
    /// map that is still sound (at worst one entry half-updated), so a
    /// poisoned lock is taken over rather than wedging every later request.
    fn shard(&self, key: &str) -> MutexGuard<'_, Shard<V>> {
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn stores_nothing(&self) -> bool {
        self.bound == Bound::Capacity(0)
    }

    /// A copy of the entry of `key` if `live` says it still is; a dead one
    /// is removed.
    pub fn get_live(&self, key: &str, live: impl FnOnce(&V) -> bool) -> Option<V>
    where
        V: Clone,
    {
        let mut shard = self.shard(key);
        let value = shard.map.get(key)?;
        if live(value) {
            return Some(value.clone());
        }
        shard.map.remove(key);
        None
    }

    /// `f` over the entry of `key`, if there is one; adds nothing.
    pub fn with_existing<R>(&self, key: &str, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        self.shard(key).map.get_mut(key).map(f)
    }

    /// `f` over the entry of `key`, made with `V::default()` if missing
    /// (after making room, with `live` telling which entries may go).
    pub fn with_entry<R>(
        &self,
        key: &str,
        live: impl FnMut(&V) -> bool,
        f: impl FnOnce(&mut V) -> R,
    ) -> R
    where
        V: Default,
    {
        if self.stores_nothing() {
            return f(&mut V::default());
        }
        let mut shard = self.shard(key);
        self.make_room(&mut shard, live);
        match shard.map.get_mut(key) {
            Some(value) => f(value),
            None => f(shard.map.entry(key.into()).or_default()),
        }
    }

    /// Sets the entry of `key` (after making room, with `live` telling which
    /// entries may go).
    pub fn insert(&self, key: &str, value: V, live: impl FnMut(&V) -> bool) {
        if self.stores_nothing() {
            return;
        }
        let mut shard = self.shard(key);
        self.make_room(&mut shard, live);
        shard.map.insert(key.into(), value);
    }

    pub fn remove(&self, key: &str) -> Option<V> {
        self.shard(key).map.remove(key)
    }

    pub fn clear(&self) {
        for i in 0..self.shards.len() {
            let mut shard = self.shards[i]
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            shard.map.clear();
            shard.sweep_at = self.per_shard;
        }
    }

    /// Entries in all shards (dead ones not yet swept included).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).map.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn make_room(&self, shard: &mut Shard<V>, mut live: impl FnMut(&V) -> bool) {
        match self.bound {
            Bound::Capacity(_) => {
                if shard.map.len() < self.per_shard {
                    return;
                }
                shard.map.retain(|_, v| live(v));
                if shard.map.len() >= self.per_shard {
                    let drop: Vec<Box<str>> = shard
                        .map
                        .keys()
                        .take((self.per_shard / 8).max(1))
                        .cloned()
                        .collect();
                    for k in drop {
                        shard.map.remove(&k);
                    }
                }
            }
            Bound::SweepAt(_) => {
                if shard.map.len() < shard.sweep_at {
                    return;
                }
                shard.map.retain(|_, v| live(v));
                shard.sweep_at = (shard.map.len() * 2).max(self.per_shard);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALWAYS: fn(&u64) -> bool = |_| true;

    #[test]
    fn capacity_is_a_hard_bound() {
        let m = ShardedMap::new(16, Bound::Capacity(64));
        for i in 0..10_000u64 {
            m.insert(&format!("k{i}"), i, ALWAYS);
        }
        // Each of the 16 shards holds at most its share of 4.
        assert!(m.len() <= 64, "{}", m.len());
        assert!(m.len() >= 16, "full shards drop an eighth, not everything");
    }

    #[test]
    fn capacity_drops_dead_entries_before_live_ones() {
        let m = ShardedMap::new(1, Bound::Capacity(8));
        for i in 0..7u64 {
            m.insert(&format!("dead{i}"), 0, ALWAYS);
        }
        m.insert("live", 1, ALWAYS);
        m.insert("new", 1, |v| *v == 1);
        assert_eq!(m.len(), 2);
        assert_eq!(m.get_live("live", ALWAYS), Some(1));
    }

    #[test]
    fn zero_capacity_stores_nothing() {
        let m = ShardedMap::new(16, Bound::Capacity(0));
        m.insert("k", 1u64, ALWAYS);
        assert_eq!(m.get_live("k", ALWAYS), None);
        assert_eq!(m.with_entry("k", ALWAYS, |v| std::mem::replace(v, 5)), 0);
        assert!(m.is_empty());
    }

    #[test]
    fn expired_entries_are_not_returned_and_are_removed() {
        // Values are expiry times; "now" is 100.
        let m = ShardedMap::new(4, Bound::Capacity(100));
        m.insert("old", 99u64, ALWAYS);
        m.insert("fresh", 100, ALWAYS);
        let live = |until: &u64| *until >= 100;
        assert_eq!(m.get_live("old", live), None);
        assert_eq!(m.get_live("fresh", live), Some(100));
        assert_eq!(m.get_live("missing", live), None);
        assert_eq!(m.len(), 1, "the expired entry was removed");
    }

    #[test]
    fn sweeps_drop_only_dead_entries_and_back_off() {
        let m = ShardedMap::new(1, Bound::SweepAt(4));
        for i in 0..4u64 {
            m.insert(&format!("live{i}"), 1, ALWAYS);
        }
        // Reaching the threshold with only live entries drops nothing...
        m.insert("x", 0, |v| *v == 1);
        assert_eq!(m.len(), 5);
        // ...and the next sweep waits for twice the survivors (8).
        for i in 0..3u64 {
            m.insert(&format!("dead{i}"), 0, |v| *v == 1);
        }
        assert_eq!(m.len(), 8);
        m.insert("y", 1, |v| *v == 1);
        assert_eq!(m.len(), 5, "x and the three dead entries went");
    }

    #[test]
    fn entries_are_updated_in_place() {
        let m: ShardedMap<Vec<u64>> = ShardedMap::new(8, Bound::SweepAt(64));
        assert_eq!(m.with_existing("k", |v| v.len()), None);
        m.with_entry("k", |_| true, |v| v.push(1));
        m.with_entry("k", |_| true, |v| v.push(2));
        assert_eq!(m.with_existing("k", |v| v.clone()), Some(vec![1, 2]));
        assert_eq!(m.remove("k"), Some(vec![1, 2]));
        m.with_entry("a", |_| true, |v| v.push(1));
        m.clear();
        assert!(m.is_empty());
    }

    /// Runs `work(thread)` on 8 threads at once.
    fn on_threads(work: impl Fn(u64) + Sync) {
        std::thread::scope(|s| {
            for t in 0..8 {
                let work = &work;
                s.spawn(move || work(t));
            }
        });
    }

    #[test]
    fn concurrent_updates_are_not_lost() {
        let m: ShardedMap<u64> = ShardedMap::new(4, Bound::SweepAt(1024));
        on_threads(|t| {
            for i in 0..2_000u64 {
                m.with_entry(&format!("k{}", i % 16), |_| true, |n| *n += 1);
                // Lookups of missing keys meanwhile.
                m.get_live(&format!("t{t}-{i}"), |_| true);
            }
        });
        let total: u64 = (0..16)
            .map(|k| m.with_existing(&format!("k{k}"), |n| *n).unwrap())
            .sum();
        assert_eq!(total, 8 * 2_000);
    }

    #[test]
    fn concurrent_inserts_stay_bounded() {
        let m: ShardedMap<u64> = ShardedMap::new(16, Bound::Capacity(256));
        on_threads(|t| {
            for i in 0..5_000u64 {
                m.insert(&format!("{t}-{i}"), i, |_| true);
                // Another thread may already have evicted it.
                if let Some(v) = m.get_live(&format!("{t}-{i}"), |_| true) {
                    assert_eq!(v, i);
                }
            }
        });
        assert!(m.len() <= 256, "{}", m.len());
    }
}
