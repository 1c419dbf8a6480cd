//! Readiness of the configured Redis: a PING every second through the Redis
//! layer (so `rediss://` and Cluster are probed exactly as they are used),
//! on a connection of the probe's own. `/ready` answers 503 while it fails.

use crate::redis_client::Redis;
use crate::state::{Health, SharedState};
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub struct RedisProbe {
    pub state: SharedState,
    pub health: Arc<Health>,
}

#[async_trait]
impl BackgroundService for RedisProbe {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut was_ok = None;
        let mut probe: Option<Redis> = None;
        loop {
            let state = self.state.load_full();
            match &state.redis {
                Some(redis) => {
                    if probe.as_ref().is_none_or(|p| p.settings != redis.settings) {
                        probe = Some(redis.detached());
                    }
                }
                None => probe = None,
            }
            if let Some(redis) = &probe {
                let result = redis.ping().await;
                let ok = result.is_ok();
                self.health.redis_reachable.store(ok, Ordering::Relaxed);
                if was_ok != Some(ok) {
                    match result {
                        Ok(()) => log::info!("redis reachable"),
                        Err(e) => log::warn!("redis unreachable: {e}"),
                    }
                    was_ok = Some(ok);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
