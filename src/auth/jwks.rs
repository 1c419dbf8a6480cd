//! Keys from a JWKS endpoint: fetched by a background service (never on the
//! request path), refreshed periodically, refetched once — single-flight and
//! at most every ten seconds — when a token names a key id the set lacks.
//! A failed fetch keeps the last good set; before the first good fetch,
//! requests wait for it briefly and then get a 503, never a 401.

use crate::metrics;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// Unknown key ids trigger at most one refetch per this long.
const REFETCH_EVERY: Duration = Duration::from_secs(10);
/// How long a request waits for keys that are being fetched.
const WAIT_FOR_KEYS: Duration = Duration::from_secs(2);
const MAX_BODY: usize = 1024 * 1024;

use crate::http_client::{HttpClient, HttpError, HttpUrl};

/// A key of the set and the accepted algorithms it may verify: those of
/// its own family, narrowed to its `alg` when the JWK names one.
pub struct JwksKey {
    pub key: DecodingKey,
    pub algorithms: Vec<Algorithm>,
}

pub type KeyMap = HashMap<String, JwksKey>;

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("answered {0}")]
    Status(u16),
    #[error("not a JWKS: {0}")]
    NotJwks(String),
}

pub struct Jwks {
    client: HttpClient,
    refresh: Duration,
    algorithms: Vec<Algorithm>,
    keys: ArcSwap<Option<Arc<KeyMap>>>,
    generation: watch::Sender<u64>,
    wake: Notify,
    last_attempt: Mutex<Option<Instant>>,
    last_success: Mutex<Option<Instant>>,
    refetch_wanted: Mutex<bool>,
    /// The last fetch asked for by an unknown key id.
    last_refetch: Mutex<Option<Instant>>,
}

impl Jwks {
    /// Builds the client (CA store, connector) once; fetches nothing.
    pub fn new(
        url: HttpUrl,
        refresh: Duration,
        algorithms: Vec<Algorithm>,
    ) -> Result<Self, HttpError> {
        Ok(Jwks {
            client: HttpClient::new(url)?,
            refresh,
            algorithms,
            keys: ArcSwap::from_pointee(None),
            generation: watch::channel(0).0,
            wake: Notify::new(),
            last_attempt: Mutex::new(None),
            last_success: Mutex::new(None),
            refetch_wanted: Mutex::new(false),
            last_refetch: Mutex::new(None),
        })
    }

    /// Whether this key set is the one `settings` ask for, so a reload that
    /// changes other auth settings can keep it (and its keys).
    pub fn serves(&self, settings: &crate::config::JwtSettings) -> bool {
        matches!(&settings.key, crate::config::KeySource::JwksUrl(url) if *url == self.client.url)
            && self.refresh == settings.jwks_refresh
            && self.algorithms == settings.algorithms
            && self.ca_unchanged()
    }

    /// Whether `jwks_ca_file` still holds the CAs the client was built with.
    pub fn ca_unchanged(&self) -> bool {
        self.client.ca_unchanged()
    }

    /// Where the key set comes from (for logs).
    pub fn url(&self) -> &HttpUrl {
        &self.client.url
    }

    pub fn keys(&self) -> Option<Arc<KeyMap>> {
        self.keys.load().as_ref().clone()
    }

    /// Asks the background service for a fresh set (unknown key id, or no
    /// set yet) and waits briefly for it. Returns whether a new set arrived.
    pub async fn refetch_and_wait(&self) -> bool {
        let recently = self
            .last_refetch
            .lock()
            .ok()
            .and_then(|l| *l)
            .is_some_and(|r| r.elapsed() < REFETCH_EVERY);
        if recently && self.keys().is_some() {
            // Rate-limited: answer now rather than wait for a fetch that won't come.
            return false;
        }
        let mut changes = self.generation.subscribe();
        let seen = *changes.borrow_and_update();
        if let Ok(mut w) = self.refetch_wanted.lock() {
            *w = true;
        }
        self.wake.notify_one();
        let arrived = tokio::time::timeout(WAIT_FOR_KEYS, changes.wait_for(|g| *g != seen))
            .await
            .is_ok_and(|r| r.is_ok());
        arrived
    }

    fn due(&self) -> bool {
        let now = Instant::now();
        let last_attempt = self.last_attempt.lock().ok().and_then(|l| *l);
        let last_success = self.last_success.lock().ok().and_then(|l| *l);
        let wanted = self.refetch_wanted.lock().map(|w| *w).unwrap_or(false);
        let last_refetch = self.last_refetch.lock().ok().and_then(|l| *l);
        match (last_attempt, last_success) {
            (None, _) => true,
            // No good set yet: keep trying every second.
            (Some(a), None) => now.duration_since(a) >= Duration::from_secs(1),
            (Some(a), Some(s)) => {
                let since_attempt = now.duration_since(a);
                // Periodic refresh (retried every few seconds while failing),
                // or an unknown key id, at most every REFETCH_EVERY.
                (now.duration_since(s) >= self.refresh
                    && since_attempt >= self.refresh.min(Duration::from_secs(5)))
                    || (wanted
                        && last_refetch.is_none_or(|r| now.duration_since(r) >= REFETCH_EVERY))
            }
        }
    }

    /// Parses a key set; keys are pinned to the configured algorithms, and
    /// shared-secret ("oct") keys are refused: a JWKS only carries public keys.
    pub fn parse(&self, body: &[u8]) -> Result<KeyMap, JwksError> {
        let set: JwkSet =
            serde_json::from_slice(body).map_err(|e| JwksError::NotJwks(e.to_string()))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let family = match jwk.algorithm {
                AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
                AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
                AlgorithmParameters::OctetKeyPair(_) => AlgorithmFamily::Ed,
                // Shared secrets ("oct") never come from a key set.
                _ => continue,
            };
            let mut algorithms: Vec<Algorithm> = self
                .algorithms
                .iter()
                .copied()
                .filter(|a| a.family() == family)
                .collect();
            if let Some(alg) = jwk.common.key_algorithm {
                let Ok(alg) = alg.to_string().parse::<Algorithm>() else {
                    continue;
                };
                algorithms.retain(|a| *a == alg);
            }
            if algorithms.is_empty() {
                continue;
            }
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => {
                    keys.insert(kid, JwksKey { key, algorithms });
                }
                Err(e) => log::warn!("jwks: skipping key {kid:?}: {e}"),
            }
        }
        Ok(keys)
    }

    async fn fetch(&self) -> Result<KeyMap, JwksError> {
        let (status, body) = self
            .client
            .call("GET", None, Duration::from_secs(5), MAX_BODY)
            .await?;
        if status != 200 {
            return Err(JwksError::Status(status));
        }
        self.parse(&body)
    }

    /// One fetch; on success the set is replaced, on failure the last good
    /// set stays. Waiters learn that the attempt is over either way.
    pub async fn refresh_once(&self) -> Result<(), JwksError> {
        if let Ok(mut l) = self.last_attempt.lock() {
            *l = Some(Instant::now());
        }
        if let Ok(mut w) = self.refetch_wanted.lock() {
            if *w {
                if let Ok(mut r) = self.last_refetch.lock() {
                    *r = Some(Instant::now());
                }
            }
            *w = false;
        }
        metrics::JWKS_FETCHES.with_label_values(&["attempt"]).inc();
        let result = self.fetch().await;
        match &result {
            Ok(keys) => {
                log::info!("jwks: {} keys from {}", keys.len(), self.client.url);
                if let Ok(mut s) = self.last_success.lock() {
                    *s = Some(Instant::now());
                }
            }
            Err(e) => {
                metrics::JWKS_FETCHES.with_label_values(&["failure"]).inc();
                log::warn!(
                    "jwks: fetch from {} failed, keeping the last good set: {e}",
                    self.client.url
                );
            }
        }
        let outcome = result.map(|keys| self.keys.store(Arc::new(Some(Arc::new(keys)))));
        self.generation.send_modify(|g| *g += 1);
        outcome
    }
}

/// Yields the key set the current config verifies with (`None`: no JWKS).
pub type CurrentJwks = Box<dyn Fn() -> Option<Arc<Jwks>> + Send + Sync>;

/// Keeps the key set of whatever config is current.
pub struct JwksRefresher {
    pub current: CurrentJwks,
}

#[async_trait]
impl BackgroundService for JwksRefresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Every second, or at once when a request asks for a key it lacks.
        crate::background::every_or_woken(&mut shutdown, Duration::from_secs(1), || async {
            let jwks = (self.current)()?;
            if jwks.due() {
                // A failure is logged and counted there; the last good set stays.
                let _ = jwks.refresh_once().await;
            }
            Some(async move { jwks.wake.notified().await })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_secret_keys_and_foreign_algorithms() {
        let jwks = Jwks::new(
            HttpUrl::parse("http://x/").unwrap(),
            Duration::from_secs(300),
            vec![Algorithm::RS256],
        )
        .unwrap();
        let body = br#"{"keys": [
            {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"},
            {"kty": "EC", "kid": "ec", "alg": "ES256", "crv": "P-256",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}
        ]}"#;
        let keys = jwks.parse(body).unwrap();
        assert!(keys.is_empty(), "{:?}", keys.keys().collect::<Vec<_>>());
        assert!(jwks.parse(b"not json").is_err());
    }
}
