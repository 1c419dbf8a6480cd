//! Upstream credentials (`upstream_auth` on a route): an OAuth2
//! client-credentials token fetched in the background, refreshed before it
//! expires, and injected as `Authorization: Bearer` towards the upstream.
//!
//! With Redis, instances share the token: one takes a short lock and calls
//! the token endpoint, the others read what it stored, so N instances make
//! one call per refresh, not N. A failed refresh keeps the last good token
//! until it expires.

use crate::config::UpstreamAuthSettings;
use crate::http_client::{HttpClient, HttpError};
use crate::metrics;
use crate::redis_client::{OwnConnection, Query, Redis};
use crate::state::SharedState;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// First requests wait at most this long for the first token.
const WAIT_FOR_TOKEN: Duration = Duration::from_secs(2);
const LOCK_FOR: Duration = Duration::from_secs(10);
const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UpstreamToken {
    pub access_token: String,
    /// Unix seconds: the token is used until then.
    pub expires_at: u64,
    /// Unix seconds: a new one is fetched from then on (`refresh`, or four
    /// fifths of the lifetime the endpoint gave, whichever comes first).
    pub refresh_at: u64,
}

use crate::clock::now_secs;

/// What names one token: everything the endpoint decides it by. Hashed,
/// so the secret never appears in a Redis key.
pub fn token_key(
    token_url: &crate::http_client::HttpUrl,
    client_id: &str,
    client_secret: &str,
    scope: Option<&str>,
) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for part in [
        token_url.to_string().as_str(),
        client_id,
        client_secret,
        scope.unwrap_or(""),
    ] {
        // Length-prefixed: no two different tuples hash the same input.
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.update([u8::from(scope.is_some())]);
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Tokens by [`token_key`]: a reload that changes a route's endpoint,
/// client, secret or scope gets a new token (also from Redis, where other
/// instances share them under the same key); one that does not, or only
/// renames the route, keeps the current one.
pub struct Credentials {
    tokens: Mutex<HashMap<String, UpstreamToken>>,
    changed: watch::Sender<u64>,
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials {
            tokens: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
        }
    }
}

impl Credentials {
    fn current(&self, settings: &UpstreamAuthSettings) -> Option<String> {
        let now = now_secs();
        self.tokens
            .lock()
            .ok()?
            .get(&settings.token_key)
            .filter(|t| t.expires_at > now)
            .map(|t| t.access_token.clone())
    }

    /// The route's token, waiting briefly for the first one.
    pub async fn token_for(&self, settings: &UpstreamAuthSettings) -> Option<String> {
        if let Some(t) = self.current(settings) {
            return Some(t);
        }
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + WAIT_FOR_TOKEN;
        loop {
            if let Some(t) = self.current(settings) {
                return Some(t);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return self.current(settings);
            }
        }
    }

    fn store(&self, settings: &UpstreamAuthSettings, token: UpstreamToken) {
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert(settings.token_key.clone(), token);
        }
        self.changed.send_modify(|g| *g += 1);
    }

    fn refresh_at(&self, settings: &UpstreamAuthSettings) -> Option<u64> {
        self.tokens
            .lock()
            .ok()?
            .get(&settings.token_key)
            .map(|t| t.refresh_at)
    }

    /// Forgets tokens no route of the running config asks for.
    fn keep_only(&self, wanted: &[&str]) {
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.retain(|key, _| wanted.contains(&key.as_str()));
        }
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Http(#[from] crate::http_client::HttpError),
    #[error("token endpoint answered {0}")]
    Status(u16),
    #[error("not a token answer: {0}")]
    NotToken(String),
    #[error("the access token has characters not allowed in a header")]
    BadToken,
}

/// The client-credentials grant, form-encoded.
fn grant(settings: &UpstreamAuthSettings) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", "client_credentials")
        .append_pair("client_id", &settings.client_id)
        .append_pair("client_secret", &settings.client_secret);
    if let Some(scope) = &settings.scope {
        form.append_pair("scope", scope);
    }
    form.finish()
}

/// POSTs the client-credentials grant to `token_url`.
async fn fetch(
    settings: &UpstreamAuthSettings,
    client: &HttpClient,
) -> Result<UpstreamToken, FetchError> {
    let now = now_secs();
    let (status, answer) = client
        .call("POST", Some(grant(settings)), TIMEOUT, 64 * 1024)
        .await?;
    if status != 200 {
        return Err(FetchError::Status(status));
    }
    let parsed: TokenAnswer =
        serde_json::from_slice(&answer).map_err(|e| FetchError::NotToken(e.to_string()))?;
    if parsed.access_token.is_empty() || !parsed.access_token.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(FetchError::BadToken);
    }
    let life = parsed.expires_in.unwrap_or(3600).max(1);
    let refresh = settings.refresh.as_secs().max(1).min(life * 4 / 5).max(1);
    Ok(UpstreamToken {
        access_token: parsed.access_token,
        expires_at: now + life,
        refresh_at: now + refresh,
    })
}

fn needs_refresh(refresh_at: Option<u64>) -> bool {
    refresh_at.is_none_or(|at| now_secs() >= at)
}

pub struct CredentialsRefresher {
    state: SharedState,
    credentials: Arc<Credentials>,
    /// One client (CA store, connector) per route's token endpoint.
    clients: Mutex<HashMap<String, Arc<HttpClient>>>,
}

impl CredentialsRefresher {
    pub fn new(state: SharedState, credentials: Arc<Credentials>) -> Self {
        CredentialsRefresher {
            state,
            credentials,
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn client(
        &self,
        route: &str,
        settings: &UpstreamAuthSettings,
    ) -> Result<Arc<HttpClient>, HttpError> {
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| HttpError::Exchange("lock poisoned".into()))?;
        let usable = |c: &&Arc<HttpClient>| c.url == settings.token_url && c.ca_unchanged();
        if let Some(c) = clients.get(route).filter(usable) {
            return Ok(c.clone());
        }
        let client = Arc::new(HttpClient::new(settings.token_url.clone())?);
        clients.insert(route.to_string(), client.clone());
        Ok(client)
    }

    async fn refresh(&self, route: &str, settings: &UpstreamAuthSettings, redis: Option<&Redis>) {
        let Some(redis) = redis else {
            self.fetch_and_store(route, settings, None).await;
            return;
        };
        let prefix = redis.prefix();
        let key = format!("{prefix}upstream_token:{{{}}}", settings.token_key);
        // Another instance may have refreshed already.
        let stored: Result<Option<String>, _> = redis
            .query(
                "upstream_token",
                Query::Cmd(&redis::cmd("GET").arg(&key).to_owned()),
                TIMEOUT,
            )
            .await;
        if let Ok(Some(text)) = &stored {
            if let Ok(token) = serde_json::from_str::<UpstreamToken>(text) {
                if !needs_refresh(Some(token.refresh_at)) {
                    self.credentials.store(settings, token);
                    return;
                }
            }
        }
        let lock = redis::cmd("SET")
            .arg(format!("{key}:lock"))
            .arg(std::process::id())
            .arg("NX")
            .arg("PX")
            .arg(LOCK_FOR.as_millis() as u64)
            .to_owned();
        match redis
            .query::<Option<String>>("upstream_token", Query::Cmd(&lock), TIMEOUT)
            .await
        {
            Ok(Some(_)) => {
                self.fetch_and_store(route, settings, Some((redis, &key)))
                    .await
            }
            // Someone else is fetching: read their result on the next round.
            Ok(None) => {}
            // Redis is away: fetch for this instance alone.
            Err(_) => self.fetch_and_store(route, settings, None).await,
        }
    }

    async fn fetch_and_store(
        &self,
        route: &str,
        settings: &UpstreamAuthSettings,
        shared: Option<(&Redis, &str)>,
    ) {
        metrics::UPSTREAM_TOKEN_FETCHES
            .with_label_values(&[route, "attempt"])
            .inc();
        let fetched = match self.client(route, settings) {
            Ok(client) => fetch(settings, &client).await,
            Err(e) => Err(e.into()),
        };
        match fetched {
            Ok(token) => {
                if let Some((redis, key)) = shared {
                    let ttl = token.expires_at.saturating_sub(now_secs()).max(1);
                    let cmd = redis::cmd("SET")
                        .arg(key)
                        .arg(serde_json::to_string(&token).unwrap_or_default())
                        .arg("EX")
                        .arg(ttl)
                        .to_owned();
                    let _ = redis
                        .query::<()>("upstream_token", Query::Cmd(&cmd), TIMEOUT)
                        .await;
                }
                log::info!("upstream credentials for route {route} refreshed");
                self.credentials.store(settings, token);
            }
            Err(e) => {
                metrics::UPSTREAM_TOKEN_FETCHES
                    .with_label_values(&[route, "failure"])
                    .inc();
                log::warn!("upstream credentials for route {route}: {e}; keeping the last good token until it expires");
            }
        }
    }
}

#[async_trait]
impl BackgroundService for CredentialsRefresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let own = tokio::sync::Mutex::new(OwnConnection::default());
        crate::background::every(&mut shutdown, Duration::from_millis(250), || async {
            let state = self.state.load_full();
            let mut own = own.lock().await;
            let redis = own.follow(state.redis.as_ref());
            let wanted: Vec<&str> = state
                .config
                .routes
                .iter()
                .filter_map(|r| Some(r.upstream_auth.as_ref()?.token_key.as_str()))
                .collect();
            self.credentials.keep_only(&wanted);
            for route in &state.config.routes {
                let Some(auth) = &route.upstream_auth else {
                    continue;
                };
                if needs_refresh(self.credentials.refresh_at(auth)) {
                    self.refresh(&route.name, auth, redis).await;
                }
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grant_is_form_encoded() {
        let settings = UpstreamAuthSettings {
            token_url: crate::http_client::HttpUrl::parse("http://auth/token").unwrap(),
            client_id: "a b&c".into(),
            client_secret: "=d/é".into(),
            scope: Some("read write".into()),
            refresh: Duration::from_secs(60),
            token_key: String::new(),
        };
        assert_eq!(
            grant(&settings),
            "grant_type=client_credentials&client_id=a+b%26c&client_secret=%3Dd%2F%C3%A9&scope=read+write"
        );
    }

    #[test]
    fn every_part_of_the_grant_names_another_token() {
        let url = crate::http_client::HttpUrl::parse("http://auth/token").unwrap();
        let other = crate::http_client::HttpUrl::parse("http://auth/token2").unwrap();
        let base = token_key(&url, "id", "secret", Some("read"));
        assert_eq!(base.len(), 64);
        assert_eq!(base, token_key(&url, "id", "secret", Some("read")));
        for changed in [
            token_key(&other, "id", "secret", Some("read")),
            token_key(&url, "id2", "secret", Some("read")),
            token_key(&url, "id", "secret2", Some("read")),
            token_key(&url, "id", "secret", Some("write")),
            token_key(&url, "id", "secret", None),
            token_key(&url, "id", "secret", Some("")),
            token_key(&url, "ids", "ecret", Some("read")),
        ] {
            assert_ne!(changed, base);
        }
        assert_ne!(
            token_key(&url, "id", "secret", None),
            token_key(&url, "id", "secret", Some(""))
        );
        assert!(!base.contains("secret"));
    }

    #[test]
    fn refresh_when_due() {
        let now = now_secs();
        assert!(needs_refresh(None));
        assert!(needs_refresh(Some(now)));
        assert!(!needs_refresh(Some(now + 60)));
    }
}
