//! Stored tokens (`require_stored: true`): a verified token is only good
//! while `<prefix>token:<api_key>` exists in Redis and is not blocked.
//!
//! Lookups are cached for a second, and every instance drops a key from its
//! cache the moment the admin API publishes a change on
//! `<prefix>revocations`, so revocation and blocking reach the whole fleet
//! within a second even if a message is lost.

use crate::cache::{Bound, ShardedMap};
use crate::redis_client::{OwnConnection, Query, Redis, Unavailable};
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
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

pub struct TokenStore {
    cache: ShardedMap<(Status, Instant)>,
}

impl Default for TokenStore {
    fn default() -> Self {
        TokenStore {
            cache: ShardedMap::new(SHARDS, Bound::SweepAt(SWEEP_AT)),
        }
    }
}

impl TokenStore {
    pub async fn status(&self, redis: &Redis, api_key: &str) -> Result<Status, Unavailable> {
        let now = Instant::now();
        let fresh = |(_, at): &(Status, Instant)| now.duration_since(*at) < CACHE_FOR;
        if let Some((status, _)) = self.cache.get_live(api_key, fresh) {
            return Ok(status);
        }
        let key = record_key(redis.prefix(), api_key);
        let record: Option<String> = redis
            .query(
                "token_lookup",
                Query::Cmd(&redis::cmd("GET").arg(&key).to_owned()),
                LOOKUP_TIMEOUT,
            )
            .await?;
        let status = parse_status(record.as_deref());
        self.cache.insert(api_key, (status, now), fresh);
        Ok(status)
    }

    pub fn invalidate(&self, api_key: &str) {
        self.cache.remove(api_key);
    }

    pub fn clear(&self) {
        self.cache.clear();
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
                redis.subscribe(&channel, || store.clear(), |key| store.invalidate(&key));
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
}
