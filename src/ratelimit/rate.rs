//! Units per second each key uses on this instance, for sizing its leases:
//! a count-min sketch (fixed memory, never stores keys; collisions only
//! over-count) over two one-second slots, the current and the previous
//! second. Time is passed in, so the estimate follows whatever clock the
//! limiter runs on (a virtual one in the simulation).

use crate::cache::KeyHasher;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

const HASHES: usize = 4;
const SLOTS: usize = 1024;

pub struct UsageRate {
    /// `counts[s % 2]` counts second `s`: one row of SLOTS per hash.
    counts: [Box<[AtomicU64]>; 2],
    hashers: [KeyHasher; HASHES],
    /// The second `counts[second % 2]` belongs to.
    second: AtomicU64,
}

impl Default for UsageRate {
    fn default() -> Self {
        let row = || (0..HASHES * SLOTS).map(|_| AtomicU64::new(0)).collect();
        UsageRate {
            counts: [row(), row()],
            hashers: std::array::from_fn(|_| KeyHasher::default()),
            second: AtomicU64::new(0),
        }
    }
}

impl UsageRate {
    fn cells(&self, key: &str) -> [usize; HASHES] {
        std::array::from_fn(|i| i * SLOTS + (self.hashers[i].hash_one((i, key)) as usize) % SLOTS)
    }

    /// Moves to the second of `now_us`, clearing the slot it reuses.
    fn roll(&self, now_us: u64) -> u64 {
        let now = now_us / 1_000_000;
        let seen = self.second.load(Ordering::Acquire);
        if now > seen
            && self
                .second
                .compare_exchange(seen, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // The slot of `now` last counted `now - 2` (or older): clear it;
            // after a gap of two seconds or more, the previous one too.
            let stale = if now - seen >= 2 { 2 } else { 1 };
            for s in 0..stale {
                for c in self.counts[((now + 2 - s) % 2) as usize].iter() {
                    c.store(0, Ordering::Relaxed);
                }
            }
        }
        now.max(seen)
    }

    pub fn observe(&self, key: &str, units: u64, now_us: u64) {
        let second = self.roll(now_us);
        let row = &self.counts[(second % 2) as usize];
        for c in self.cells(key) {
            let _ = row[c].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_add(units))
            });
        }
    }

    /// The key's units in the last whole second.
    pub fn rate(&self, key: &str, now_us: u64) -> f64 {
        let second = self.roll(now_us);
        if second > now_us / 1_000_000 + 1 {
            return 0.0;
        }
        let row = &self.counts[((second + 1) % 2) as usize];
        self.cells(key)
            .iter()
            .map(|&c| row[c].load(Ordering::Relaxed))
            .min()
            .unwrap_or(0) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    #[test]
    fn the_rate_is_the_last_whole_second() {
        let r = UsageRate::default();
        for i in 0..50 {
            r.observe("a", 2, 10 * S + i * 1000);
        }
        r.observe("b", 7, 10 * S);
        assert_eq!(r.rate("a", 10 * S + 500_000), 0.0);
        assert_eq!(r.rate("a", 11 * S), 100.0);
        assert_eq!(r.rate("b", 11 * S + 10), 7.0);
        assert_eq!(r.rate("c", 11 * S), 0.0);
        // Two seconds on, the old counts are gone.
        assert_eq!(r.rate("a", 12 * S), 0.0);
        r.observe("a", 1, 30 * S);
        assert_eq!(r.rate("a", 31 * S), 1.0);
    }
}
