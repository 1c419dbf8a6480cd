//! `limits.concurrency`: requests in flight per api_key, across every
//! instance. Each instance holds *slots* leased from Redis
//! (`lua/concurrency.lua`): the fleet's slots never add up to more than the
//! limit, so neither do its requests in flight. A request takes a slot this
//! instance already holds (no Redis call) or asks Redis for one more; the
//! slot is given back when the answer ends, the client goes away or a
//! tunnel closes (the guard's drop), and a holding not renewed within
//! [`LEASE`] — an instance that died — frees its slots for the others.
//!
//! A key far below its limit keeps a few spare slots, so most requests
//! need no Redis call; spare slots go back as soon as they outnumber that
//! allowance, so a quiet instance never sits on slots another one needs.
//! Without Redis (or with `on_failure: local` while it is down) the count
//! is this instance's alone.

use crate::cache::KeyMap;
use crate::config::{LimitSettings, OnFailure};
use crate::error::Refusal;
use crate::redis_client::OwnConnection;
use crate::redis_client::{Redis, Unavailable};
use crate::state::SharedState;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use redis::Script;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

static SLOTS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/concurrency.lua")));

/// How long a holding lasts without renewal: a dead instance's slots come
/// back within this.
pub const LEASE: Duration = Duration::from_secs(30);

/// Spare slots a key may keep: a share of its limit, none for small limits
/// (where every slot counts, and each one is asked for when needed).
fn spare(limit: u64) -> u64 {
    if limit < 16 {
        0
    } else {
        limit / 16
    }
}

#[derive(Debug, Default, Clone)]
struct Slots {
    held: u64,
    in_flight: u64,
    limit: u64,
    /// One request at a time asks Redis for this key's slots, so answers
    /// never overtake each other.
    asking: Arc<tokio::sync::Mutex<()>>,
}

/// This instance's slots per key.
pub struct Concurrency {
    instance: String,
    keys: Mutex<KeyMap<String, Slots>>,
}

impl Default for Concurrency {
    fn default() -> Self {
        let mut id = [0u8; 8];
        let _ = getrandom::fill(&mut id);
        Concurrency {
            instance: format!("{}-{}", std::process::id(), u64::from_le_bytes(id)),
            keys: Mutex::new(KeyMap::default()),
        }
    }
}

/// A slot taken for one request; dropping it gives it back.
pub struct Slot {
    owner: Arc<Concurrency>,
    key: String,
    limit: u64,
    redis: Option<Arc<Redis>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let excess = self.owner.release(&self.key, self.limit);
        if let (true, Some(redis)) = (excess, self.redis.clone()) {
            let owner = self.owner.clone();
            let key = self.key.clone();
            // Outside the request: the answer has gone already.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { owner.trim(&redis, &key).await });
            }
        }
    }
}

/// The concurrency limit of a caller (its tier's, else the default).
pub fn limit_of(limits: &LimitSettings, tier: Option<&str>) -> Option<u64> {
    tier.and_then(|t| limits.concurrency.tiers.get(t).copied())
        .or(limits.concurrency.default)
}

fn key_name(prefix: &str, key: &str) -> String {
    format!("{prefix}cc:{{{key}}}")
}

impl Concurrency {
    /// Takes a slot for `key` (`limit` in flight at most), or refuses with
    /// 429 `concurrency_limited`. `key` is the limiter's id of the caller;
    /// `fleet` the instances sharing the Redis (while it cannot be reached,
    /// this instance runs what Redis granted it or its share of the limit).
    pub async fn acquire(
        self: &Arc<Self>,
        redis: Option<&Arc<Redis>>,
        key: &str,
        limit: u64,
        fleet: u64,
    ) -> Result<Slot, Refusal> {
        let slot = |redis: Option<&Arc<Redis>>| Slot {
            owner: self.clone(),
            key: key.to_string(),
            limit,
            redis: redis.cloned(),
        };
        self.set_limit(key, limit);
        if self.take_held(key) {
            return Ok(slot(redis));
        }
        let Some(redis) = redis else {
            return self.take_local(key, limit).map(|()| slot(None));
        };
        let share = limit / fleet.max(1);
        let asking = self.asking(key);
        let _turn = asking.lock().await;
        // Someone before us may have brought enough slots.
        if self.take_held(key) {
            return Ok(slot(Some(redis)));
        }
        let want = self.in_flight(key) + 1 + spare(limit);
        match self.hold(redis, key, want, limit).await {
            Ok(_) if self.take_held(key) => Ok(slot(Some(redis))),
            Ok(_) => Err(refused(limit)),
            Err(_) => match redis.settings.on_failure {
                OnFailure::Local => self.take_local(key, share).map(|()| slot(None)),
                OnFailure::Open => {
                    self.count_unheld(key);
                    Ok(slot(None))
                }
                OnFailure::Closed => Err(Refusal::LimiterUnavailable),
            },
        }
    }

    /// Takes one of the slots already held, if one is free.
    fn take_held(&self, key: &str) -> bool {
        let Ok(mut keys) = self.keys.lock() else {
            return false;
        };
        match keys.get_mut(key) {
            Some(s) if s.in_flight < s.held.min(s.limit) => {
                s.in_flight += 1;
                true
            }
            _ => false,
        }
    }

    /// On this instance's own (no Redis, or Redis unreachable): in flight
    /// against `allowed`, or the slots Redis granted if there are more.
    /// Slots taken this way are not held: once Redis answers again, the
    /// next request asks for what is really in flight.
    fn take_local(&self, key: &str, allowed: u64) -> Result<(), Refusal> {
        let Ok(mut keys) = self.keys.lock() else {
            return Err(Refusal::LimiterUnavailable);
        };
        let s = keys.entry(key.to_string()).or_default();
        if s.in_flight >= allowed.max(s.held.min(s.limit)) {
            return Err(refused(s.limit.max(allowed)));
        }
        s.in_flight += 1;
        Ok(())
    }

    fn count_unheld(&self, key: &str) {
        if let Ok(mut keys) = self.keys.lock() {
            let s = keys.entry(key.to_string()).or_default();
            s.in_flight += 1;
        }
    }

    fn asking(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.keys
            .lock()
            .map(|mut k| k.entry(key.to_string()).or_default().asking.clone())
            .unwrap_or_default()
    }

    /// Records the key's limit (it may change with a reload).
    fn set_limit(&self, key: &str, limit: u64) {
        if let Ok(mut keys) = self.keys.lock() {
            keys.entry(key.to_string()).or_default().limit = limit;
        }
    }

    fn in_flight(&self, key: &str) -> u64 {
        self.keys
            .lock()
            .ok()
            .and_then(|k| k.get(key).map(|s| s.in_flight))
            .unwrap_or(0)
    }

    /// Asks Redis to hold `want` slots for `key`; records what it granted.
    async fn hold(
        &self,
        redis: &Redis,
        key: &str,
        want: u64,
        limit: u64,
    ) -> Result<u64, Unavailable> {
        let mut invocation = SLOTS.prepare_invoke();
        invocation
            .key(key_name(redis.prefix(), key))
            .arg(&self.instance)
            .arg(want)
            .arg(limit)
            .arg(LEASE.as_millis() as u64);
        let held: u64 = redis
            .invoke("concurrency", &invocation, redis.settings.timeout)
            .await?;
        if let Ok(mut keys) = self.keys.lock() {
            let s = keys.entry(key.to_string()).or_default();
            s.held = held;
            // Forget an idle key (unless a request is asking for it).
            if s.held == 0 && s.in_flight == 0 && Arc::strong_count(&s.asking) == 1 {
                keys.remove(key);
            }
        }
        Ok(held)
    }

    /// A request ended: its slot is free again. Returns whether spare slots
    /// should go back to Redis.
    fn release(&self, key: &str, limit: u64) -> bool {
        let Ok(mut keys) = self.keys.lock() else {
            return false;
        };
        let Some(s) = keys.get_mut(key) else {
            return false;
        };
        s.in_flight = s.in_flight.saturating_sub(1);
        s.held > s.in_flight + spare(limit)
    }

    /// Hands back the slots held beyond what is in flight and the spare
    /// allowance; in turn with the key's other Redis calls, so a smaller
    /// holding never lands after a larger one asked for later.
    async fn trim(&self, redis: &Redis, key: &str) {
        let asking = self.asking(key);
        let _turn = asking.lock().await;
        if let Some((keep, limit)) = self.shrink(key, |s| s.in_flight + spare(s.limit)) {
            let _ = self.hold(redis, key, keep, limit.max(keep)).await;
        }
    }

    /// Lowers what this instance may hand out for `key` to `keep(slots)`
    /// (never below what is in flight) *before* Redis is told, so no
    /// request takes a slot that is on its way back: what Redis records
    /// for this instance is never less than what it uses. Returns the new
    /// holding and the limit, or `None` when nothing changes.
    fn shrink(&self, key: &str, keep: impl Fn(&Slots) -> u64) -> Option<(u64, u64)> {
        let mut keys = self.keys.lock().ok()?;
        let s = keys.get_mut(key)?;
        let keep = keep(s).max(s.in_flight).min(s.held);
        s.held = keep;
        Some((keep, s.limit))
    }

    /// The keys this instance holds slots for, as they are now.
    fn key_names(&self) -> Vec<String> {
        self.keys
            .lock()
            .map(|k| k.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Renews every holding (so only a dead instance's slots expire) and
    /// hands back what is held and not needed; run well within [`LEASE`].
    pub async fn renew(&self, redis: &Redis) {
        let keys = self.key_names();
        for key in keys {
            let asking = self.asking(&key);
            let _turn = asking.lock().await;
            if let Some((keep, limit)) = self.shrink(&key, |s| s.in_flight + spare(s.limit)) {
                let _ = self.hold(redis, &key, keep, limit.max(keep)).await;
            }
        }
    }

    /// Gives every slot back (graceful stop).
    pub async fn give_back(&self, redis: &Redis) {
        let keys = self.key_names();
        for key in keys {
            let _ = self.hold(redis, &key, 0, 0).await;
        }
    }
}

/// Renews this instance's holdings every ten seconds, also while a stop
/// drains (a grace period longer than the lease must not let holdings
/// expire under requests still running); once the drain is over, gives
/// every slot back.
pub struct Renewer {
    pub state: SharedState,
    pub concurrency: Arc<Concurrency>,
    pub drain: Arc<crate::edge::drain::Drain>,
}

impl Renewer {
    async fn renew(&self, own: &tokio::sync::Mutex<OwnConnection>) {
        let state = self.state.load_full();
        let mut own = own.lock().await;
        if let Some(redis) = own.follow(state.redis.as_ref()) {
            self.concurrency.renew(redis).await;
        }
    }
}

#[async_trait]
impl BackgroundService for Renewer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let own = tokio::sync::Mutex::new(OwnConnection::default());
        crate::background::every(&mut shutdown, LEASE / 3, || self.renew(&own)).await;
        loop {
            tokio::select! {
                _ = self.drain.finished() => break,
                _ = tokio::time::sleep(LEASE / 3) => self.renew(&own).await,
            }
        }
        let state = self.state.load_full();
        let mut own = own.lock().await;
        if let Some(redis) = own.follow(state.redis.as_ref()) {
            self.concurrency.give_back(redis).await;
        }
    }
}

fn refused(limit: u64) -> Refusal {
    Refusal::ConcurrencyLimited { limit }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_counting_without_redis() {
        let c = Arc::new(Concurrency::default());
        let a = c.acquire(None, "k", 2, 1).await.unwrap();
        let b = c.acquire(None, "k", 2, 1).await.unwrap();
        assert!(matches!(
            c.acquire(None, "k", 2, 1).await,
            Err(Refusal::ConcurrencyLimited { limit: 2 })
        ));
        drop(a);
        let c2 = c.acquire(None, "k", 2, 1).await.unwrap();
        drop((b, c2));
        assert_eq!(c.in_flight("k"), 0);
        assert!(c.acquire(None, "other", 1, 1).await.is_ok());
    }
}
