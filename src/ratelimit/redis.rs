//! The Redis side of the limiter: one connection (or cluster connection) per
//! config, created lazily inside the proxy's runtime, and one script call
//! per lease. Every call has a timeout; after a failure Redis is left alone
//! for a second so an outage costs no latency.

use crate::config::{Algorithm, RedisSettings, Window};
use crate::metrics;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::Script;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

static FIXED: once_cell::sync::Lazy<Script> =
    once_cell::sync::Lazy::new(|| Script::new(include_str!("../../lua/fixed_window.lua")));
static SLIDING: once_cell::sync::Lazy<Script> =
    once_cell::sync::Lazy::new(|| Script::new(include_str!("../../lua/sliding_window.lua")));
static CHARGE: once_cell::sync::Lazy<Script> =
    once_cell::sync::Lazy::new(|| Script::new(include_str!("../../lua/charge.lua")));
static GCRA: once_cell::sync::Lazy<Script> =
    once_cell::sync::Lazy::new(|| Script::new(include_str!("../../lua/gcra.lua")));

/// How long Redis is skipped after a failed call.
const BACKOFF: Duration = Duration::from_secs(1);

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// What Redis granted for one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub granted: u64,
    /// Units nobody holds after this grant.
    pub available: u64,
    pub reset_us: u64,
    pub retry_us: u64,
}

pub struct RedisBackend {
    pub settings: RedisSettings,
    conn: OnceCell<Conn>,
    down_until: Mutex<Option<Instant>>,
}

#[derive(Debug)]
pub struct Unavailable;

pub enum Query<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
}

impl RedisBackend {
    pub fn new(settings: RedisSettings) -> Self {
        RedisBackend {
            settings,
            conn: OnceCell::new(),
            down_until: Mutex::new(None),
        }
    }

    fn backing_off(&self) -> bool {
        self.down_until
            .lock()
            .ok()
            .and_then(|d| *d)
            .is_some_and(|until| Instant::now() < until)
    }

    fn failed(&self, what: &str) {
        metrics::REDIS_ERRORS.inc();
        if let Ok(mut d) = self.down_until.lock() {
            if d.is_none_or(|until| Instant::now() >= until) {
                log::warn!(
                    "redis unavailable ({what}); using redis.on_failure for the next second"
                );
            }
            *d = Some(Instant::now() + BACKOFF);
        }
    }

    async fn connect(&self) -> redis::RedisResult<Conn> {
        let timeout = self.settings.timeout;
        if self.settings.cluster {
            let client = redis::cluster::ClusterClient::builder(self.settings.urls.clone())
                .connection_timeout(timeout.max(Duration::from_millis(250)))
                .response_timeout(timeout)
                .retries(0)
                .build()?;
            Ok(Conn::Cluster(client.get_async_connection().await?))
        } else {
            let url = self.settings.urls.first().cloned().unwrap_or_default();
            let client = redis::Client::open(url.as_str())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout.max(Duration::from_millis(250))))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1);
            Ok(Conn::Single(
                ConnectionManager::new_with_config(client, config).await?,
            ))
        }
    }

    async fn connection(&self) -> Result<Conn, Unavailable> {
        if self.backing_off() {
            return Err(Unavailable);
        }
        let limit = self.settings.timeout.max(Duration::from_millis(250));
        match tokio::time::timeout(limit, self.conn.get_or_try_init(|| self.connect())).await {
            Ok(Ok(c)) => Ok(c.clone()),
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                Err(Unavailable)
            }
            Err(_) => {
                self.failed("connect timed out");
                Err(Unavailable)
            }
        }
    }

    /// Waits for a call at most `timeout`; a failure starts the back-off.
    async fn bounded<T>(
        &self,
        op: &'static str,
        timeout: Duration,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                Err(Unavailable)
            }
            Err(_) => {
                self.failed(&format!("{op} timed out"));
                Err(Unavailable)
            }
        }
    }

    /// Runs one command (or a pipeline) with a timeout, counted as `op`.
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: Query<'_>,
        timeout: Duration,
    ) -> Result<T, Unavailable> {
        let conn = self.connection().await?;
        metrics::REDIS_CALLS.with_label_values(&[op]).inc();
        let call = async {
            match (conn, cmd) {
                (Conn::Single(mut c), Query::Cmd(q)) => q.query_async(&mut c).await,
                (Conn::Cluster(mut c), Query::Cmd(q)) => q.query_async(&mut c).await,
                (Conn::Single(mut c), Query::Pipe(p)) => p.query_async(&mut c).await,
                (Conn::Cluster(mut c), Query::Pipe(p)) => p.query_async(&mut c).await,
            }
        };
        self.bounded(op, timeout, call).await
    }

    /// Runs a prepared script (EVALSHA, falling back to EVAL on NOSCRIPT).
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
        timeout: Duration,
    ) -> Result<T, Unavailable> {
        let conn = self.connection().await?;
        metrics::REDIS_CALLS.with_label_values(&[op]).inc();
        let call = async {
            match conn {
                Conn::Single(mut c) => invocation.invoke_async::<T>(&mut c).await,
                Conn::Cluster(mut c) => invocation.invoke_async::<T>(&mut c).await,
            }
        };
        self.bounded(op, timeout, call).await
    }

    fn base_key(&self, key_id: &str, w: &Window) -> String {
        format!(
            "{}rl:{{{key_id}}}:{}",
            self.settings.key_prefix,
            w.window.as_secs()
        )
    }

    /// Charges `units` to every window of `key_id`, over the limit or not
    /// (negative units hand leased budget back).
    pub async fn charge(
        &self,
        algo: Algorithm,
        key_id: &str,
        windows: &[Window],
        units: i64,
    ) -> Result<(), Unavailable> {
        let mut invocation = CHARGE.prepare_invoke();
        let name = match algo {
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::Gcra => "gcra",
        };
        invocation.arg(name).arg(windows.len());
        for w in windows {
            invocation.key(self.base_key(key_id, w));
            invocation
                .arg(w.requests)
                .arg(w.window.as_micros() as u64)
                .arg(units);
        }
        self.invoke::<i64>("charge", &invocation, self.settings.timeout)
            .await
            .map(|_| ())
    }

    /// One lease call for all windows of `key_id`. `need[i]` units must be
    /// available in every window or nothing is granted; beyond that each
    /// window grants up to `available / divisor` (at most `max_chunk`).
    pub async fn acquire(
        &self,
        algo: Algorithm,
        key_id: &str,
        windows: &[Window],
        need: &[u64],
        divisor: u64,
        max_chunk: u64,
    ) -> Result<Vec<Grant>, Unavailable> {
        let script = match algo {
            Algorithm::FixedWindow => &*FIXED,
            Algorithm::SlidingWindow => &*SLIDING,
            Algorithm::Gcra => &*GCRA,
        };
        let mut invocation = script.prepare_invoke();
        invocation.arg(windows.len());
        for (w, need) in windows.iter().zip(need) {
            invocation.key(self.base_key(key_id, w));
            invocation
                .arg(w.requests)
                .arg(w.window.as_micros() as u64)
                .arg(*need)
                .arg(divisor)
                .arg(max_chunk);
        }
        let values: Vec<i64> = self
            .invoke("acquire", &invocation, self.settings.timeout)
            .await?;
        if values.len() != windows.len() * 4 {
            self.failed(&format!(
                "unexpected script answer of {} values",
                values.len()
            ));
            return Err(Unavailable);
        }
        let clamp = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(values
            .chunks_exact(4)
            .map(|c| Grant {
                granted: clamp(c[0]),
                available: clamp(c[1]),
                reset_us: clamp(c[2]),
                retry_us: clamp(c[3]),
            })
            .collect())
    }
}
