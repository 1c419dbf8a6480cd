//! Readiness of the configured Redis: a PING every second over a plain TCP
//! connection, with the configured timeout. `/ready` answers 503 while it fails.

use crate::state::{Health, SharedState};
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct RedisProbe {
    pub state: SharedState,
    pub health: Arc<Health>,
}

/// `redis://[user[:password]@]host[:port][/db]` -> (host:port, user, password).
pub fn parse_url(url: &str) -> Option<(String, Option<String>, Option<String>)> {
    let rest = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))?;
    let rest = rest.split(['/', '?']).next().unwrap_or(rest);
    let (auth, hostport) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    let (user, password) = match auth {
        Some(a) => match a.split_once(':') {
            Some((u, p)) => ((!u.is_empty()).then(|| u.to_string()), Some(p.to_string())),
            None => (None, Some(a.to_string())),
        },
        None => (None, None),
    };
    let addr = if hostport.is_empty() {
        "127.0.0.1:6379".to_string()
    } else if hostport.contains(':') && !hostport.ends_with(']') {
        hostport.to_string()
    } else {
        format!("{hostport}:6379")
    };
    Some((addr, user, password))
}

fn command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}

async fn ping(url: &str) -> Result<(), String> {
    let (addr, user, password) = parse_url(url).ok_or("not a redis:// URL")?;
    let mut stream = TcpStream::connect(&addr).await.map_err(|e| e.to_string())?;
    let mut request = Vec::new();
    if let Some(p) = &password {
        request.extend(match &user {
            Some(u) => command(&["AUTH", u, p]),
            None => command(&["AUTH", p]),
        });
    }
    request.extend(command(&["PING"]));
    stream
        .write_all(&request)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 256];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("PONG") {
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        got.extend_from_slice(&buf[..n]);
        if got.starts_with(b"-") {
            return Err(String::from_utf8_lossy(&got).trim().to_string());
        }
    }
    Ok(())
}

#[async_trait]
impl BackgroundService for RedisProbe {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut was_ok = None;
        loop {
            let state = self.state.load_full();
            if let Some(redis) = &state.config.redis {
                let mut ok = true;
                let mut reason = String::new();
                for url in &redis.urls {
                    let limit = redis.timeout.max(Duration::from_millis(250));
                    match tokio::time::timeout(limit, ping(url)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => (ok, reason) = (false, e),
                        Err(_) => (ok, reason) = (false, "timed out".into()),
                    }
                }
                self.health.redis_reachable.store(ok, Ordering::Relaxed);
                if was_ok != Some(ok) {
                    if ok {
                        log::info!("redis reachable");
                    } else {
                        log::warn!("redis unreachable: {reason}");
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

#[cfg(test)]
mod tests {
    use super::parse_url;

    #[test]
    fn parses_redis_urls() {
        assert_eq!(
            parse_url("redis://127.0.0.1:6380").unwrap().0,
            "127.0.0.1:6380"
        );
        assert_eq!(parse_url("redis://redis/0").unwrap().0, "redis:6379");
        let (addr, user, pass) = parse_url("redis://u:p@h:1/2").unwrap();
        assert_eq!(
            (addr.as_str(), user.as_deref(), pass.as_deref()),
            ("h:1", Some("u"), Some("p"))
        );
        let (_, user, pass) = parse_url("redis://:secret@h:1").unwrap();
        assert_eq!((user, pass.as_deref()), (None, Some("secret")));
        assert!(parse_url("http://x").is_none());
    }
}
