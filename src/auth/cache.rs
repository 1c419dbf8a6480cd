//! Verified tokens, so a repeated token costs a hash lookup instead of a
//! signature check. Keyed by the whole token string (a hash collision can
//! never hand one caller another's identity), bounded, and entries die with
//! the token's `exp`.

use super::Identity;
use crate::cache::{Bound, ShardedMap};
use std::sync::Arc;

const SHARDS: usize = 16;

pub struct TokenCache {
    tokens: ShardedMap<Arc<Identity>>,
}

impl TokenCache {
    pub fn new(capacity: usize) -> Self {
        TokenCache {
            tokens: ShardedMap::new(SHARDS, Bound::Capacity(capacity)),
        }
    }

    /// The cached identity, unless it has expired by `now` (unix seconds).
    pub fn get(&self, token: &str, now: u64) -> Option<Arc<Identity>> {
        self.tokens.get_live(token, |id| id.valid_until >= now)
    }

    /// When full of live tokens, an arbitrary eighth goes: cheap, and a
    /// dropped token only costs one more signature check.
    pub fn insert(&self, token: &str, identity: Arc<Identity>, now: u64) {
        self.tokens
            .insert(token, identity, |id| id.valid_until >= now);
    }

    pub(crate) fn len(&self) -> usize {
        self.tokens.len()
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
        assert!(c.len() <= 64, "{}", c.len());
        let off = TokenCache::new(0);
        off.insert("t", id(u64::MAX), 0);
        assert!(off.get("t", 0).is_none());
    }
}
