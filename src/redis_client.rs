//! The one Redis layer: every Redis call tollgate makes goes through a
//! [`Redis`] — the limiter's leases, stored tokens, the revocation channel,
//! analytics, shared upstream credentials, the readiness probe and
//! `token issue --redis`. It owns the connection (one server or a Cluster,
//! `redis://` or `rediss://` verified against the system CAs or
//! `redis.ca_file`), puts a timeout on every call, counts calls and errors,
//! and after a failure leaves Redis alone for a second so an outage costs
//! requests no latency.
//!
//! The async client spawns its connection driver on the runtime that first
//! connects, so a connection is made lazily, inside the runtime that uses
//! it. A background service whose runtime may outlive or predate the
//! proxy's takes its own connection with [`Redis::detached`].

use crate::clock::Instant;
use crate::config::{ConfigProblem, RedisSettings};
use crate::metrics;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Client, FromRedisValue, TlsCertificates};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OnceCell;

/// How long Redis is skipped after a failed call.
const BACKOFF: Duration = Duration::from_secs(1);

/// Why a Redis call did not happen or did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    #[error("skipped: redis failed less than a second ago")]
    BackingOff,
    #[error("{op}: {cause}")]
    Failed { op: &'static str, cause: String },
    #[error("{op} timed out")]
    TimedOut { op: &'static str },
    #[error("{op}: unexpected answer: {what}")]
    Unexpected { op: &'static str, what: String },
}

/// The Redis client of one `redis` config section.
pub struct Redis {
    pub settings: RedisSettings,
    /// The contents of `ca_file` when the client was built: a reload
    /// compares them with the file, so a CA rotated in place is not missed.
    ca_pem: Option<Vec<u8>>,
    clients: Clients,
    conn: OnceCell<Conn>,
    down_until: Mutex<Option<Instant>>,
    /// Calls that found the connection lost (Redis restarted, or went away).
    reconnects: std::sync::atomic::AtomicU64,
    /// When the client was built, in order: a later config's client has a
    /// higher number (a detached copy keeps its parent's).
    generation: u64,
}

/// The next `Redis::generation`.
fn next_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

// One per config: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
enum Clients {
    Single(Client),
    Cluster(redis::cluster::ClusterClient),
    /// A simulated server (the limiter's simulation).
    #[cfg(test)]
    Sim(Arc<dyn sim::Link>),
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    #[cfg(test)]
    Sim(sim::Conn),
}

/// The seam the limiter's simulation plugs a simulated Redis into: every
/// command of a `Redis` built with [`Redis::simulated`] goes to its `Link`.
#[cfg(test)]
pub mod sim {
    use redis::{Cmd, RedisFuture, Value};
    use std::sync::Arc;

    pub trait Link: Send + Sync {
        /// Runs one command (its answer, or the error the connection saw).
        fn request(&self, cmd: &Cmd) -> RedisFuture<'static, Value>;
    }

    #[derive(Clone)]
    pub struct Conn(pub Arc<dyn Link>);

    impl redis::aio::ConnectionLike for Conn {
        fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
            self.0.request(cmd)
        }

        fn req_packed_commands<'a>(
            &'a mut self,
            _pipeline: &'a redis::Pipeline,
            _offset: usize,
            _count: usize,
        ) -> RedisFuture<'a, Vec<Value>> {
            Box::pin(async {
                Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "pipelines are not simulated",
                )))
            })
        }

        fn get_db(&self) -> i64 {
            0
        }
    }
}

/// A command or a pipeline, run with [`Redis::query`].
pub enum Query<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
}

fn certificates(settings: &RedisSettings) -> Result<Option<TlsCertificates>, String> {
    let Some(path) = &settings.ca_file else {
        return Ok(None);
    };
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {path:?}: {e}"))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("{path:?} holds no PEM certificate"));
    }
    Ok(Some(TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

impl Redis {
    /// Builds the client (parses URLs, reads the CA file); connects nothing.
    /// Errors name the config key they are about.
    pub fn new(settings: RedisSettings) -> Result<Self, ConfigProblem> {
        // rustls needs a process-wide crypto provider for rediss://.
        pingora::tls::install_default_crypto_provider();
        let certs = certificates(&settings).map_err(|e| ConfigProblem::new("redis.ca_file", e))?;
        let ca_pem = certs.as_ref().and_then(|c| c.root_cert.clone());
        let clients = if settings.cluster {
            let mut builder = redis::cluster::ClusterClient::builder(settings.urls.clone())
                .connection_timeout(settings.timeout.max(Duration::from_millis(250)))
                .response_timeout(settings.timeout)
                .retries(0);
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            Clients::Cluster(
                builder
                    .build()
                    .map_err(|e| ConfigProblem::new("redis.cluster", e.to_string()))?,
            )
        } else {
            let url = settings.urls.first().cloned().unwrap_or_default();
            let client = match certs {
                Some(certs) => Client::build_with_tls(url.as_str(), certs),
                None => Client::open(url.as_str()),
            };
            Clients::Single(client.map_err(|e| ConfigProblem::new("redis.url", e.to_string()))?)
        };
        Ok(Redis {
            settings,
            ca_pem,
            clients,
            conn: OnceCell::new(),
            down_until: Mutex::new(None),
            reconnects: Default::default(),
            generation: next_generation(),
        })
    }

    /// Whether `redis.ca_file` still holds the CAs this client trusts.
    pub fn ca_unchanged(&self) -> bool {
        match (&self.settings.ca_file, &self.ca_pem) {
            (Some(path), Some(pem)) => std::fs::read(path).is_ok_and(|now| now == *pem),
            _ => true,
        }
    }

    /// Whether `other` is built from the same settings and CAs.
    pub fn same_as(&self, other: &Redis) -> bool {
        self.settings == other.settings && self.ca_pem == other.ca_pem
    }

    /// A client whose commands go to a simulated server.
    #[cfg(test)]
    pub fn simulated(settings: RedisSettings, link: Arc<dyn sim::Link>) -> Self {
        Redis {
            settings,
            ca_pem: None,
            clients: Clients::Sim(link),
            conn: OnceCell::new(),
            down_until: Mutex::new(None),
            reconnects: Default::default(),
            generation: next_generation(),
        }
    }

    /// The same client with a connection of its own (made in the runtime
    /// that first uses it) and a back-off of its own.
    pub fn detached(&self) -> Redis {
        Redis {
            settings: self.settings.clone(),
            ca_pem: self.ca_pem.clone(),
            clients: self.clients.clone(),
            conn: OnceCell::new(),
            down_until: Mutex::new(None),
            reconnects: Default::default(),
            generation: self.generation,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.settings.key_prefix
    }

    fn backing_off(&self) -> bool {
        self.down_until
            .lock()
            .ok()
            .and_then(|d| *d)
            .is_some_and(|until| Instant::now() < until)
    }

    fn failed(&self, why: &Unavailable) {
        metrics::REDIS_ERRORS.inc();
        if let Ok(mut d) = self.down_until.lock() {
            if d.is_none_or(|until| Instant::now() >= until) {
                log::warn!("redis unavailable ({why}); using redis.on_failure for the next second");
            }
            *d = Some(Instant::now() + BACKOFF);
        }
    }

    async fn connect(&self) -> redis::RedisResult<Conn> {
        match &self.clients {
            #[cfg(test)]
            Clients::Sim(link) => Ok(Conn::Sim(sim::Conn(link.clone()))),
            Clients::Cluster(client) => Ok(Conn::Cluster(client.get_async_connection().await?)),
            Clients::Single(client) => {
                let timeout = self.settings.timeout;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout.max(Duration::from_millis(250))))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1);
                Ok(Conn::Single(
                    ConnectionManager::new_with_config(client.clone(), config).await?,
                ))
            }
        }
    }

    async fn connection(&self, op: &'static str) -> Result<Conn, Unavailable> {
        if self.backing_off() {
            return Err(Unavailable::BackingOff);
        }
        let limit = self.settings.timeout.max(Duration::from_millis(250));
        let conn = self
            .bounded(op, limit, self.conn.get_or_try_init(|| self.connect()))
            .await?;
        Ok(conn.clone())
    }

    /// Waits for `call` at most `timeout`; a failure starts the back-off.
    async fn bounded<T>(
        &self,
        op: &'static str,
        timeout: Duration,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        let err = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => Unavailable::Failed {
                op,
                cause: e.to_string(),
            },
            Err(_) => Unavailable::TimedOut { op },
        };
        self.failed(&err);
        Err(err)
    }

    /// Runs one command (or a pipeline) with a timeout, counted as `op`.
    pub async fn query<T: FromRedisValue>(
        &self,
        op: &'static str,
        cmd: Query<'_>,
        timeout: Duration,
    ) -> Result<T, Unavailable> {
        let conn = self.connection(op).await?;
        metrics::REDIS_CALLS.with_label_values(&[op]).inc();
        let call = async {
            match (conn, cmd) {
                (Conn::Single(mut c), Query::Cmd(q)) => q.query_async(&mut c).await,
                (Conn::Cluster(mut c), Query::Cmd(q)) => q.query_async(&mut c).await,
                (Conn::Single(mut c), Query::Pipe(p)) => p.query_async(&mut c).await,
                (Conn::Cluster(mut c), Query::Pipe(p)) => p.query_async(&mut c).await,
                #[cfg(test)]
                (Conn::Sim(mut c), Query::Cmd(q)) => q.query_async(&mut c).await,
                #[cfg(test)]
                (Conn::Sim(mut c), Query::Pipe(p)) => p.query_async(&mut c).await,
            }
        };
        self.bounded(op, timeout, call).await
    }

    /// Runs a prepared script (EVALSHA, falling back to EVAL on NOSCRIPT).
    /// A call that finds its connection lost (Redis restarted) is made once
    /// more on a fresh one, within the same timeout, before it fails.
    pub async fn invoke<T: FromRedisValue>(
        &self,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
        timeout: Duration,
    ) -> Result<T, Unavailable> {
        let deadline = Instant::now() + timeout;
        let mut again = true;
        loop {
            let conn = self.connection(op).await?;
            metrics::REDIS_CALLS.with_label_values(&[op]).inc();
            let call = async {
                match conn {
                    Conn::Single(mut c) => invocation.invoke_async::<T>(&mut c).await,
                    Conn::Cluster(mut c) => invocation.invoke_async::<T>(&mut c).await,
                    #[cfg(test)]
                    Conn::Sim(mut c) => invocation.invoke_async::<T>(&mut c).await,
                }
            };
            let err = match tokio::time::timeout_at(deadline, call).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => {
                    let lost =
                        e.is_connection_dropped() || e.is_io_error() || e.is_connection_refusal();
                    if lost {
                        self.reconnects
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if std::mem::take(&mut again) {
                            continue;
                        }
                    }
                    Unavailable::Failed {
                        op,
                        cause: e.to_string(),
                    }
                }
                Err(_) => Unavailable::TimedOut { op },
            };
            self.failed(&err);
            return Err(err);
        }
    }

    /// Clients built later (by a later config) have higher generations.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How many calls found the connection lost so far: a change tells the
    /// limiter that Redis may have restarted and lost counts.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Marks an answer that could not be used as a failure (starts the back-off).
    pub fn unexpected(&self, op: &'static str, what: String) -> Unavailable {
        let err = Unavailable::Unexpected { op, what };
        self.failed(&err);
        err
    }

    /// `PING` with the configured timeout (at least 250 ms): the readiness probe.
    pub async fn ping(&self) -> Result<(), Unavailable> {
        let limit = self.settings.timeout.max(Duration::from_millis(250));
        let pong: String = self
            .query("ping", Query::Cmd(&redis::cmd("PING")), limit)
            .await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(self.unexpected("ping", pong))
        }
    }

    /// Subscribes to `channel` and calls `each` with every message until the
    /// subscription ends (connection lost). `subscribed` runs once the
    /// subscription is in place. Cluster: PUBLISH reaches every node, so the
    /// first node serves.
    pub async fn subscribe(
        &self,
        channel: &str,
        subscribed: impl FnOnce(),
        mut each: impl FnMut(String),
    ) -> Result<(), Unavailable> {
        let op = "subscribe";
        let client = match &self.clients {
            Clients::Single(c) => c.clone(),
            #[cfg(test)]
            Clients::Sim(_) => {
                return Err(Unavailable::Failed {
                    op,
                    cause: "not simulated".into(),
                })
            }
            Clients::Cluster(_) => {
                let url = self.settings.urls.first().cloned().unwrap_or_default();
                let certs = certificates(&self.settings)
                    .map_err(|cause| Unavailable::Failed { op, cause })?;
                match certs {
                    Some(certs) => Client::build_with_tls(url.as_str(), certs),
                    None => Client::open(url.as_str()),
                }
                .map_err(|e| Unavailable::Failed {
                    op,
                    cause: e.to_string(),
                })?
            }
        };
        let failed = |e: redis::RedisError| Unavailable::Failed {
            op,
            cause: e.to_string(),
        };
        let limit = self.settings.timeout.max(Duration::from_millis(250));
        let mut pubsub = tokio::time::timeout(limit, client.get_async_pubsub())
            .await
            .map_err(|_| Unavailable::TimedOut { op })?
            .map_err(failed)?;
        pubsub.subscribe(channel).await.map_err(failed)?;
        subscribed();
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            if let Ok(payload) = msg.get_payload::<String>() {
                each(payload);
            }
        }
        Ok(())
    }
}

/// A background service's own connection to the current config's Redis
/// (see [`Redis::detached`]), made again when the Redis settings or CAs
/// change.
#[derive(Default)]
pub struct OwnConnection(Option<Redis>);

impl OwnConnection {
    /// The connection for `current` (the running config's client), if any.
    pub fn follow(&mut self, current: Option<&Arc<Redis>>) -> Option<&Redis> {
        match current {
            None => self.0 = None,
            Some(r) if self.0.as_ref().is_none_or(|own| !own.same_as(r)) => {
                self.0 = Some(r.detached());
            }
            Some(_) => {}
        }
        self.0.as_ref()
    }
}

/// Why a command from the CLI did not run.
#[derive(Debug, thiserror::Error)]
pub enum BlockingError {
    #[error("cannot start a runtime: {0}")]
    Runtime(#[from] std::io::Error),
    #[error(transparent)]
    Config(#[from] ConfigProblem),
    #[error(transparent)]
    Redis(#[from] Unavailable),
}

/// One command from a program that has no runtime of its own (the CLI):
/// a short-lived single-thread runtime runs it.
pub fn blocking_query<T: FromRedisValue + Send + 'static>(
    settings: RedisSettings,
    op: &'static str,
    cmd: redis::Cmd,
) -> Result<T, BlockingError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let redis = Redis::new(settings)?;
        Ok(redis
            .query(op, Query::Cmd(&cmd), Duration::from_secs(5))
            .await?)
    })
}
