//! Stored tokens (`require_stored: true`): a verified token is only good
//! while `<prefix>token:<api_key>` exists in Redis and is not blocked.
//!
//! Lookups are cached for a second, and every instance drops a key from its
//! cache the moment the admin API publishes a change on
//! `<prefix>revocations`, so revocation and blocking reach the whole fleet
//! within a second even if a message is lost.
//!
//! When the store cannot answer (down, slow, or the Redis client backing
//! off after a failure), the check fails closed: only a token that Redis
//! confirmed stored within `auth.jwt.store_cache` still passes, so an outage
//! does not lock out active callers; a token last seen revoked or blocked
//! stays refused; any other token is refused as unavailable. A revocation
//! heard on the channel drops the confirmation at once.

use crate::cache::{Bound, ShardedMap};
use crate::metrics;
use crate::redis_client::{OwnConnection, Query, Redis, Unavailable};
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a lookup is trusted without a Redis round trip.
const CACHE_FOR: Duration = Duration::from_secs(1);
const LOOKUP_TIMEOUT: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Active,
    Blocked,
    Missing,
}

pub fn record_key(prefix: &str, api_key: &str) -> String {
    format!("{prefix}token:{api_key}")
}

pub fn channel(prefix: &str) -> String {
    format!("{prefix}revocations")
}

/// What a stored record says (`{"token", "claims", "blocked"}`).
pub fn parse_status(record: Option<&str>) -> Status {
    match record {
        None => Status::Missing,
        Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v) if v["blocked"].as_bool() == Some(true) => Status::Blocked,
            _ => Status::Active,
        },
    }
}

/// Lookups remembered, by API key. Stale entries are swept once this many
/// are held.
const SWEEP_AT: usize = 100_000;
const SHARDS: usize = 16;

/// What Redis last said about a key, and when it was asked.
#[derive(Debug, Clone, Copy)]
struct Seen {
    status: Status,
    at: Instant,
}

pub struct TokenStore {
    cache: ShardedMap<Seen>,
    /// Bumped by every eviction: a lookup that was in flight across one
    /// may carry an answer from before a revocation, so it is not kept.
    evictions: AtomicU64,
    /// Answers older than this (nanoseconds after `created`) are not used
    /// without asking Redis again: the channel had a gap after them.
    fresh_from: AtomicU64,
    created: Instant,
}

impl Default for TokenStore {
    fn default() -> Self {
        TokenStore {
            cache: ShardedMap::new(SHARDS, Bound::SweepAt(SWEEP_AT)),
            evictions: AtomicU64::new(0),
            fresh_from: AtomicU64::new(0),
            created: Instant::now(),
        }
    }
}

impl TokenStore {
    /// The stored status of `api_key`. When Redis cannot answer, what it
    /// said within `store_cache` stands in (counted in
    /// `tollgate_token_store_outage_answers_total`); without such an answer
    /// the error is returned and the caller must refuse.
    ///
    /// The Redis client skips Redis for a second after a failure, so during
    /// an outage this returns at once instead of waiting on a timeout.
    pub async fn status(
        &self,
        redis: &Redis,
        api_key: &str,
        store_cache: Duration,
    ) -> Result<Status, Unavailable> {
        let now = Instant::now();
        let keep = store_cache.max(CACHE_FOR);
        let seen = self
            .cache
            .get_live(api_key, |s| now.duration_since(s.at) < keep);
        let fresh_from =
            self.created + Duration::from_nanos(self.fresh_from.load(Ordering::Acquire));
        let fresh = |s: &Seen| now.duration_since(s.at) < CACHE_FOR && s.at >= fresh_from;
        if let Some(s) = seen.filter(fresh) {
            return Ok(s.status);
        }
        let evictions = self.evictions.load(Ordering::Acquire);
        match self.lookup(redis, api_key).await {
            Ok(status) => {
                if self.evictions.load(Ordering::Acquire) == evictions {
                    let seen = Seen { status, at: now };
                    let live = |s: &Seen| Instant::now().duration_since(s.at) < keep;
                    self.cache.insert(api_key, seen, live);
                }
                Ok(status)
            }
            Err(e) => {
                let recalled = seen.filter(|s| now.duration_since(s.at) < store_cache);
                let answer = match recalled.map(|s| s.status) {
                    Some(Status::Active) => "confirmed",
                    Some(_) => "refused",
                    None => "unavailable",
                };
                metrics::TOKEN_STORE_OUTAGE
                    .with_label_values(&[answer])
                    .inc();
                recalled.map(|s| s.status).ok_or(e)
            }
        }
    }

    async fn lookup(&self, redis: &Redis, api_key: &str) -> Result<Status, Unavailable> {
        let key = record_key(redis.prefix(), api_key);
        let record: Option<String> = redis
            .query(
                "token_lookup",
                Query::Cmd(&redis::cmd("GET").arg(&key).to_owned()),
                LOOKUP_TIMEOUT,
            )
            .await?;
        Ok(parse_status(record.as_deref()))
    }

    /// Forgets what is known of `api_key` (revoked, blocked, unblocked,
    /// issued again): its next check asks Redis, and an outage before that
    /// finds no confirmation to fall back on.
    pub fn invalidate(&self, api_key: &str) {
        self.evictions.fetch_add(1, Ordering::AcqRel);
        self.cache.remove(api_key);
    }

    /// Subscribed again after a gap in which changes may have been missed:
    /// every key is asked of Redis again at its next check. What Redis last
    /// confirmed still stands in while Redis cannot answer, as it would
    /// have without the gap: dropping it would refuse every active caller
    /// for as long as the request path's client still backs off.
    pub fn resync(&self) {
        self.evictions.fetch_add(1, Ordering::AcqRel);
        let since = u64::try_from(self.created.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.fresh_from.fetch_max(since, Ordering::AcqRel);
    }
}

/// Yields the Redis whose revocation channel to follow under the current
/// config: `None` when stored tokens are off (or there is no Redis).
pub type Follow = Box<dyn Fn() -> Option<Arc<Redis>> + Send + Sync>;

/// Listens on the revocation channel and drops changed keys from the cache.
pub struct Revocations {
    pub follow: Follow,
    pub store: Arc<TokenStore>,
}

#[async_trait]
impl BackgroundService for Revocations {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let own = tokio::sync::Mutex::new(OwnConnection::default());
        // Ends a subscription when the service stops.
        let stop = shutdown.clone();
        // Subscribes while the config asks for stored tokens; after a lost
        // subscription, tries again a second later.
        crate::background::every(&mut shutdown, Duration::from_secs(1), || async {
            let wanted = (self.follow)();
            let mut own = own.lock().await;
            let Some(redis) = own.follow(wanted.as_ref()) else {
                return;
            };
            let channel = channel(redis.prefix());
            let store = &self.store;
            // Messages may have been missed while disconnected.
            let subscription =
                redis.subscribe(&channel, || store.resync(), |key| store.invalidate(&key));
            let mut stop = stop.clone();
            tokio::select! {
                result = subscription => {
                    if let Err(e) = result {
                        log::debug!("revocation channel: {e}");
                    }
                }
                _ = stop.changed() => {}
                // A reload may change or drop the Redis section.
                _ = self.unwanted(redis) => {}
            }
        })
        .await
    }
}

impl Revocations {
    /// Resolves once the current config no longer follows the channel of
    /// `redis` (its settings changed or were dropped by a reload).
    async fn unwanted(&self, redis: &Redis) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if (self.follow)().is_none_or(|r| r.settings != redis.settings) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_status() {
        assert_eq!(parse_status(None), Status::Missing);
        assert_eq!(
            parse_status(Some(r#"{"token":"t","blocked":false}"#)),
            Status::Active
        );
        assert_eq!(
            parse_status(Some(r#"{"token":"t","blocked":true}"#)),
            Status::Blocked
        );
        assert_eq!(parse_status(Some("not json")), Status::Active);
    }

    /// A client whose Redis refuses every connection.
    fn unreachable() -> Redis {
        Redis::new(crate::config::RedisSettings {
            urls: vec!["redis://127.0.0.1:1".into()],
            cluster: false,
            key_prefix: "t:".into(),
            timeout: Duration::from_millis(50),
            on_failure: crate::config::OnFailure::Local,
            ca_file: None,
        })
        .unwrap()
    }

    /// Pretends Redis said `status` about `key` `ago`.
    fn seen(store: &TokenStore, key: &str, status: Status, ago: Duration) {
        let at = Instant::now().checked_sub(ago).unwrap();
        store.cache.insert(key, Seen { status, at }, |_| true);
    }

    #[tokio::test]
    async fn an_outage_keeps_confirmations_within_store_cache_and_nothing_else() {
        let redis = unreachable();
        let store = TokenStore::default();
        let ago = Duration::from_secs(5);
        seen(&store, "active", Status::Active, ago);
        seen(&store, "revoked", Status::Missing, ago);
        seen(&store, "blocked", Status::Blocked, ago);
        let long = Duration::from_secs(30);
        assert_eq!(
            store.status(&redis, "active", long).await.unwrap(),
            Status::Active
        );
        assert_eq!(
            store.status(&redis, "revoked", long).await.unwrap(),
            Status::Missing
        );
        assert_eq!(
            store.status(&redis, "blocked", long).await.unwrap(),
            Status::Blocked
        );
        // Never looked up: nothing to stand in for Redis.
        assert!(store.status(&redis, "unknown", long).await.is_err());
        // Confirmed longer ago than store_cache.
        let short = Duration::from_secs(3);
        assert!(store.status(&redis, "active", short).await.is_err());
        // A revocation heard on the channel drops the confirmation.
        seen(&store, "active", Status::Active, ago);
        store.invalidate("active");
        assert!(store.status(&redis, "active", long).await.is_err());
    }

    #[tokio::test]
    async fn a_gap_in_the_channel_forces_lookups_but_keeps_confirmations() {
        let redis = unreachable();
        let store = TokenStore::default();
        seen(&store, "k", Status::Active, Duration::ZERO);
        seen(&store, "gone", Status::Missing, Duration::ZERO);
        store.resync();
        // Not answered from the one-second cache (Redis is asked and fails)...
        let long = Duration::from_secs(30);
        assert_eq!(
            store.status(&redis, "k", long).await.unwrap(),
            Status::Active
        );
        assert_eq!(
            store.status(&redis, "gone", long).await.unwrap(),
            Status::Missing
        );
        // ...which an outage grace of zero shows: Redis had to be asked.
        assert!(store.status(&redis, "k", Duration::ZERO).await.is_err());
    }

    #[tokio::test]
    async fn a_fresh_answer_is_used_without_asking_redis() {
        let redis = unreachable();
        let store = TokenStore::default();
        seen(&store, "k", Status::Active, Duration::ZERO);
        // store_cache 0: no outage grace, but the one-second lookup cache holds.
        assert_eq!(
            store.status(&redis, "k", Duration::ZERO).await.unwrap(),
            Status::Active
        );
        seen(&store, "k", Status::Active, Duration::from_secs(2));
        assert!(store.status(&redis, "k", Duration::ZERO).await.is_err());
    }
}
