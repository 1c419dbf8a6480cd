//! What one request sees: a config and everything compiled from it, swapped
//! whole on reload. A request takes one snapshot at its start and keeps it,
//! so it never sees half of two configs.

use crate::auth::Verifier;
use crate::config::Config;
use crate::ratelimit::redis::RedisBackend;
use crate::routes::RouteTable;
use crate::upstream::{self, Upstream};
use arc_swap::ArcSwap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub struct State {
    pub config: Arc<Config>,
    pub routes: RouteTable,
    pub upstreams: Vec<Arc<Upstream>>,
    pub verifier: Option<Verifier>,
    /// Connected lazily, inside the proxy's runtime, on first use.
    pub redis: Option<Arc<RedisBackend>>,
}

impl State {
    pub fn build(config: Config) -> Result<Self, Vec<String>> {
        let upstreams = upstream::build_all(&config.upstreams).map_err(|e| vec![e])?;
        let verifier = match &config.auth.jwt {
            Some(jwt) => {
                let mut forwarded: Vec<String> = config
                    .routes
                    .iter()
                    .flat_map(|r| r.forward_claims.iter().map(|(claim, _)| claim.clone()))
                    .collect();
                forwarded.sort();
                forwarded.dedup();
                Some(Verifier::new(jwt, forwarded).map_err(|e| vec![e])?)
            }
            None => None,
        };
        Ok(State {
            routes: RouteTable::new(&config.routes),
            upstreams,
            verifier,
            redis: config.redis.clone().map(|r| Arc::new(RedisBackend::new(r))),
            config: Arc::new(config),
        })
    }
}

pub type SharedState = Arc<ArcSwap<State>>;

/// Process-wide facts that are not configuration.
#[derive(Default)]
pub struct Health {
    /// False while a configured Redis does not answer.
    pub redis_reachable: AtomicBool,
}
