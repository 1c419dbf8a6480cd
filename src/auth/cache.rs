//! Verified tokens, so a repeated token costs a hash lookup instead of a
//! signature check. Keyed by the whole token string (a hash collision can
//! never hand one caller another's identity), bounded, and entries die with
//! the token's `exp`.

use super::Identity;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

const SHARDS: usize = 16;

pub struct TokenCache {
    shards: Vec<Mutex<HashMap<Box<str>, Arc<Identity>>>>,
    per_shard: usize,
    hasher: RandomState,
}

impl TokenCache {
    pub fn new(capacity: usize) -> Self {
        TokenCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, token: &str) -> &Mutex<HashMap<Box<str>, Arc<Identity>>> {
        let i = (self.hasher.hash_one(token) as usize) % SHARDS;
        &self.shards[i]
    }

    /// The cached identity, unless it has expired by `now` (unix seconds).
    pub fn get(&self, token: &str, now: u64) -> Option<Arc<Identity>> {
        if self.per_shard == 0 {
            return None;
        }
        let mut shard = self.shard(token).lock().ok()?;
        match shard.get(token) {
            Some(id) if id.valid_until >= now => Some(id.clone()),
            Some(_) => {
                shard.remove(token);
                None
            }
            None => None,
        }
    }

    pub fn insert(&self, token: &str, identity: Arc<Identity>, now: u64) {
        if self.per_shard == 0 {
            return;
        }
        let Ok(mut shard) = self.shard(token).lock() else {
            return;
        };
        if shard.len() >= self.per_shard {
            shard.retain(|_, id| id.valid_until >= now);
            if shard.len() >= self.per_shard {
                // Still full of live tokens: drop an arbitrary eighth. Cheap,
                // and a dropped token only costs one more signature check.
                let drop: Vec<Box<str>> = shard
                    .keys()
                    .take((self.per_shard / 8).max(1))
                    .cloned()
                    .collect();
                for k in drop {
                    shard.remove(&k);
                }
            }
        }
        shard.insert(token.into(), identity);
    }

    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |s| s.len()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::permissions::RouteMatcher;

    fn id(valid_until: u64) -> Arc<Identity> {
        Arc::new(Identity {
            key: "k".into(),
            rate_limit: None,
            routes: RouteMatcher::compile(&["/*"]).unwrap(),
            tier: None,
            org: None,
            valid_until,
            forwarded: Vec::new(),
        })
    }

    #[test]
    fn hits_until_expiry() {
        let c = TokenCache::new(100);
        c.insert("tok", id(100), 50);
        assert!(c.get("tok", 100).is_some());
        assert!(c.get("tok", 101).is_none());
        assert!(c.get("tok", 50).is_none(), "expired entries are removed");
        assert!(c.get("other", 0).is_none());
    }

    #[test]
    fn stays_bounded() {
        let c = TokenCache::new(64);
        for i in 0..10_000 {
            c.insert(&format!("token-{i}"), id(u64::MAX), 0);
        }
        assert!(c.len() <= 64 + SHARDS, "{}", c.len());
        let off = TokenCache::new(0);
        off.insert("t", id(u64::MAX), 0);
        assert!(off.get("t", 0).is_none());
    }
}
