//! Readiness of the configured Redis: a PING every second through the Redis
//! layer (so `rediss://` and Cluster are probed exactly as they are used),
//! on a connection of the probe's own. `/ready` answers 503 while it fails.

use crate::redis_client::OwnConnection;
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
        let was_ok = std::sync::Mutex::new(None);
        let own = tokio::sync::Mutex::new(OwnConnection::default());
        crate::background::every(&mut shutdown, Duration::from_secs(1), || async {
            let state = self.state.load_full();
            let mut own = own.lock().await;
            let Some(redis) = own.follow(state.redis.as_ref()) else {
                return;
            };
            let result = redis.ping().await;
            let ok = result.is_ok();
            self.health.redis_reachable.store(ok, Ordering::Relaxed);
            let Ok(mut was) = was_ok.lock() else { return };
            if *was != Some(ok) {
                match result {
                    Ok(()) => log::info!("redis reachable"),
                    Err(e) => log::warn!("redis unreachable: {e}"),
                }
                *was = Some(ok);
            }
        })
        .await
    }
}
