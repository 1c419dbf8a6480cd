//! What one request sees: a config and everything compiled from it, swapped
//! whole on reload. A request takes one snapshot at its start and keeps it,
//! so it never sees half of two configs.
//!
//! A snapshot is built by diff against the one it replaces: the long-lived
//! parts whose settings did not change are carried over as they are (the
//! JWKS key set and its fetch schedule, the verified-token cache, the Redis
//! client with its connection and back-off, upstreams with their resolved
//! addresses and health). What is new is made ready before the swap
//! ([`State::prepare`]): a new JWKS endpoint must answer first.

use crate::auth::jwks::Jwks;
use crate::auth::{KeyMaterial, Verifier};
use crate::config::{Config, ConfigProblem};
use crate::edge::tls::TlsListener;
use crate::redis_client::Redis;
use crate::routes::RouteTable;
use crate::upstream::{self, Upstream};
use arc_swap::ArcSwap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub struct State {
    pub config: Arc<Config>,
    pub routes: RouteTable,
    /// Request metrics of each route (same order as `config.routes`).
    pub route_metrics: Box<[crate::metrics::RouteMetrics]>,
    pub upstreams: Vec<Arc<Upstream>>,
    pub verifier: Option<Arc<Verifier>>,
    /// Connected lazily, inside the proxy's runtime, on first use.
    pub redis: Option<Arc<Redis>>,
    /// One per `server.tls` listener, built from the files at each (re)load
    /// — while the config's listeners are those the process listens on (see
    /// [`Listening`]).
    pub tls: Vec<Arc<TlsListener>>,
    /// The listeners this process listens on, from the config it started with.
    pub listening: Arc<Listening>,
    /// `telemetry.tracing`: kept across reloads that leave it as it was.
    pub tracer: Option<Arc<crate::trace::Tracer>>,
}

/// The proxy listeners as bound at start, each with whether it is HTTPS.
/// A reload cannot move them (only a new process can bind other sockets):
/// when a reloaded config names other listeners, the TLS listeners and
/// their certificates stay as they were, so a port bound for HTTPS is never
/// served as plain text, until `serve --upgrade` binds the new set.
#[derive(Debug, PartialEq, Eq)]
pub struct Listening(Vec<(String, bool)>);

impl Listening {
    pub fn of(config: &Config) -> Listening {
        let server = &config.server;
        let mut set: Vec<(String, bool)> = server
            .listen
            .iter()
            .map(|a| (a.clone(), false))
            .chain(server.tls.iter().map(|t| (t.listen.clone(), true)))
            .collect();
        set.sort();
        Listening(set)
    }
}

/// Every claim some route forwards as a header or a limit rule keys on.
fn forwarded_claims(config: &Config) -> Vec<String> {
    let mut forwarded: Vec<String> = config
        .routes
        .iter()
        .flat_map(|r| r.forward_claims.iter().map(|(claim, _)| claim.clone()))
        .chain(
            config
                .limits
                .rules
                .iter()
                .flat_map(|r| r.key.claims().map(str::to_string)),
        )
        .collect();
    forwarded.sort();
    forwarded.dedup();
    forwarded
}

/// The verifier of `jwt`: the running one when nothing it depends on
/// changed (its key set and token cache carry over), else a new one that
/// keeps the running key set when that still serves.
fn verifier(
    jwt: &crate::config::JwtSettings,
    config: &Config,
    previous: Option<&State>,
) -> Result<Arc<Verifier>, ConfigProblem> {
    let material = KeyMaterial::load(&jwt.key)?;
    let forwarded = forwarded_claims(config);
    let old = previous.and_then(|p| p.verifier.as_ref());
    // A CA file rotated in place is a change too: the key set is then
    // fetched again through the new CAs before the swap.
    let kept = |v: &&Arc<Verifier>| {
        v.same_settings(jwt, &material, &forwarded) && v.jwks().is_none_or(|j| j.ca_unchanged())
    };
    if let Some(v) = old.filter(kept) {
        return Ok(v.clone());
    }
    let jwks = old.and_then(|v| v.jwks()).filter(|j| j.serves(jwt));
    Verifier::new(jwt, material, forwarded, jwks).map(Arc::new)
}

impl State {
    /// Builds the live state of `config`, keeping every part of `previous`
    /// whose settings did not change. Reads key and CA files and resolves
    /// upstream names (blocking); connects nothing and fetches nothing.
    pub fn build(config: Config, previous: Option<&State>) -> Result<Self, Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        let upstreams = match upstream::build_all(
            &config.upstreams,
            previous.map_or(&[][..], |p| p.upstreams.as_slice()),
        ) {
            Ok(u) => u,
            Err(e) => {
                problems.push(e);
                Vec::new()
            }
        };
        let listening =
            previous.map_or_else(|| Arc::new(Listening::of(&config)), |p| p.listening.clone());
        let tls = match previous {
            Some(p) if Listening::of(&config) != *listening => p.tls.clone(),
            _ => config
                .server
                .tls
                .iter()
                .enumerate()
                .filter_map(|(i, l)| {
                    TlsListener::build(i, l)
                        .map(Arc::new)
                        .map_err(|e| problems.push(e))
                        .ok()
                })
                .collect(),
        };
        let verifier = match &config.auth.jwt {
            Some(jwt) => match verifier(jwt, &config, previous) {
                Ok(v) => Some(v),
                Err(e) => {
                    problems.push(e);
                    None
                }
            },
            None => None,
        };
        let redis = match (&config.redis, previous.and_then(|p| p.redis.as_ref())) {
            (Some(settings), Some(old)) if old.settings == *settings && old.ca_unchanged() => {
                Some(old.clone())
            }
            (Some(settings), _) => match Redis::new(settings.clone()) {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => {
                    problems.push(e);
                    None
                }
            },
            (None, _) => None,
        };
        let tracer = match (&config.tracing, previous.and_then(|p| p.tracer.as_ref())) {
            (Some(settings), Some(old)) if old.settings == *settings => Some(old.clone()),
            (Some(settings), _) if problems.is_empty() => {
                match crate::trace::Tracer::new(settings.clone()) {
                    Ok(t) => Some(Arc::new(t)),
                    Err(e) => {
                        problems.push(e);
                        None
                    }
                }
            }
            _ => None,
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(State {
            tracer,
            routes: RouteTable::new(&config.routes),
            route_metrics: config
                .routes
                .iter()
                .map(|r| crate::metrics::RouteMetrics::new(&r.name))
                .collect(),
            upstreams,
            verifier,
            redis,
            tls,
            listening,
            config: Arc::new(config),
        })
    }

    /// Makes what `build` created anew ready to serve before it is swapped
    /// in: a JWKS endpoint that `previous` did not use is fetched now, and
    /// if that fails the new state must not be used.
    pub async fn prepare(&self, previous: &State) -> Result<(), ConfigProblem> {
        let Some(jwks) = self.verifier.as_ref().and_then(|v| v.jwks()) else {
            return Ok(());
        };
        let kept = previous
            .verifier
            .as_ref()
            .and_then(|v| v.jwks())
            .is_some_and(|old| Arc::ptr_eq(&old, &jwks));
        if kept || jwks.keys().is_some() {
            return Ok(());
        }
        jwks.refresh_once().await.map_err(|e| {
            ConfigProblem::new(
                "auth.jwt.jwks_url",
                format!("the new key set could not be fetched ({e})"),
            )
        })
    }

    /// The Redis whose revocation channel this config follows: only stored
    /// tokens (`auth.jwt.require_stored`) need it.
    pub fn revocations_redis(&self) -> Option<Arc<Redis>> {
        let stored = self.verifier.as_ref().is_some_and(|v| v.require_stored());
        self.redis.clone().filter(|_| stored)
    }

    /// The JWKS key set this config verifies with, if keys come from one.
    pub fn jwks(&self) -> Option<Arc<Jwks>> {
        self.verifier.as_ref().and_then(|v| v.jwks())
    }

    /// The HTTPS listener a connection accepted on `local` came in on.
    pub fn tls_listener(&self, local: std::net::SocketAddr) -> Option<&TlsListener> {
        self.tls
            .iter()
            .map(|t| t.as_ref())
            .find(|t| t.serves(local))
    }

    /// Things an operator should know that do not stop the config from
    /// serving (a peer name that does not resolve).
    pub fn warnings(&self) -> Vec<String> {
        let listeners = (Listening::of(&self.config) != *self.listening).then(|| {
            "server.listen/server.tls: the listeners differ from those this process listens on; \
             the HTTPS listeners keep their certificates as they were until `serve --upgrade`"
                .to_string()
        });
        self.upstreams
            .iter()
            .flat_map(|u| {
                u.unresolved().into_iter().map(move |why| {
                    format!(
                        "upstreams.{}.peers: {why}; that peer stays out of rotation until it resolves",
                        u.settings.name
                    )
                })
            })
            .chain(listeners)
            .collect()
    }
}

pub type SharedState = Arc<ArcSwap<State>>;

/// Process-wide facts that are not configuration.
#[derive(Default)]
pub struct Health {
    /// False while a configured Redis does not answer.
    pub redis_reachable: AtomicBool,
}
