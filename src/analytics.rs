//! Usage analytics: requests per key (all time and current hour) and the
//! number of distinct keys, kept in Redis. The request path only bumps an
//! in-process counter; a background service writes the batch once a second
//! (and keeps writing through a graceful stop's grace period), so analytics
//! never cost a request a Redis call.
//! On shutdown the same task hands unused rate-limit leases back to Redis.

use crate::cache::KeyMap;
use crate::redis_client::{OwnConnection, Redis};
use crate::state::{SharedState, State};
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use redis::Script;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

static FLUSH: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/analytics.lua")));

/// Pending counts kept while Redis is away, at most this many keys.
const MAX_PENDING: usize = 100_000;

pub fn keys(prefix: &str) -> [String; 3] {
    [
        format!("{prefix}{{stats}}:requests"),
        format!("{prefix}{{stats}}:unique"),
        format!("{prefix}{{stats}}:requests:hour:"),
    ]
}

#[derive(Default)]
pub struct Analytics {
    pending: Mutex<KeyMap<String, u64>>,
}

impl Analytics {
    pub fn record(&self, api_key: &str) {
        if let Ok(mut p) = self.pending.lock() {
            if let Some(n) = p.get_mut(api_key) {
                *n += 1;
            } else if p.len() < MAX_PENDING {
                p.insert(api_key.to_string(), 1);
            }
        }
    }

    fn take(&self) -> KeyMap<String, u64> {
        self.pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }

    fn put_back(&self, batch: KeyMap<String, u64>) {
        if let Ok(mut p) = self.pending.lock() {
            for (k, n) in batch {
                if p.len() < MAX_PENDING || p.contains_key(&k) {
                    *p.entry(k).or_default() += n;
                }
            }
        }
    }
}

/// Keys per analytics script call: each holds Redis while it runs, and
/// lease calls wait behind it. With 200,000 keys in the sorted sets a slice
/// of 500 took 4.6 ms (median; up to 25 ms on a busy machine, past the
/// default `redis.timeout`).
const FLUSH_SLICE: usize = 100;

pub struct Flusher {
    pub state: SharedState,
    pub analytics: Arc<Analytics>,
    pub limiter: Arc<crate::ratelimit::Limiter>,
    pub drain: Arc<crate::edge::drain::Drain>,
}

impl Flusher {
    /// Writes the pending counts through this service's own connection to
    /// the current config's Redis; without Redis they are dropped.
    async fn tick<'a>(&self, own: &'a mut OwnConnection) -> Option<(Arc<State>, &'a Redis)> {
        let state = self.state.load_full();
        let Some(redis) = own.follow(state.redis.as_ref()) else {
            self.analytics.take();
            return None;
        };
        self.flush(redis).await;
        Some((state, redis))
    }

    async fn flush(&self, redis: &Redis) {
        let batch = self.analytics.take();
        if batch.is_empty() {
            return;
        }
        let [all, unique, hour] = keys(redis.prefix());
        let batch: Vec<(String, u64)> = batch.into_iter().collect();
        // In slices, so one script never holds Redis long enough to push a
        // request's lease call past `redis.timeout` (200,000 keys in one
        // script took tens of milliseconds).
        let mut failed = KeyMap::default();
        for slice in batch.chunks(FLUSH_SLICE) {
            let mut invocation = FLUSH.prepare_invoke();
            invocation.key(&all).key(&unique).key(&hour);
            for (k, n) in slice {
                invocation.arg(k).arg(*n);
            }
            if redis
                .invoke::<String>("analytics", &invocation, Duration::from_secs(2))
                .await
                .is_err()
            {
                failed.extend(slice.iter().cloned());
            }
        }
        if !failed.is_empty() {
            self.analytics.put_back(failed);
        }
    }
}

#[async_trait]
impl BackgroundService for Flusher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let own = tokio::sync::Mutex::new(OwnConnection::default());
        let ticks = std::sync::atomic::AtomicU64::new(0);
        crate::background::every(&mut shutdown, Duration::from_secs(1), || async {
            self.tick(&mut *own.lock().await).await;
            // Every ten seconds, in-process counts whose windows ended go.
            if ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10 == 9 {
                // Not a guard: the sweep yields, and a reload may come meanwhile.
                let state = self.state.load_full();
                self.limiter.sweep_local(&state.config.limits).await;
            }
        })
        .await;
        // A stop has begun: every quarter second, so requests still answered
        // during the drain are written too; once the drain is over, a last
        // write, the unused leases back, and this service's stop is done
        // (the process exits when every service's is, see `edge::stop`).
        let mut own = own.into_inner();
        loop {
            // Read before the write, so the last write comes after the drain.
            let drained = self.drain.is_finished();
            let written = self.tick(&mut own).await;
            if drained {
                // Unused leases go back once no request can take from them any more.
                if written.is_some() {
                    let n = self.limiter.return_leases().await;
                    log::info!("stopping: handed {n} unused leases back to redis");
                }
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = self.drain.finished() => {}
            }
        }
    }
}
