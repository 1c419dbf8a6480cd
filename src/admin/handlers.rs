//! The `/admin/` endpoints: token lifecycle, quotas, usage analytics.

use super::{error, json_answer, Answer};
use crate::analytics;
use crate::auth::issue::{mint, IssueOptions};
use crate::auth::permissions::RouteMatcher;
use crate::auth::store::{channel, record_key};
use crate::auth::Identity;
use crate::config::{format_duration, parse_duration, KeySource};
use crate::ratelimit::Limiter;
use crate::redis_client::{Query, Redis};
use crate::state::State;
use once_cell::sync::Lazy;
use redis::Script;
use serde::Deserialize;
use serde_json::json;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(1);
static BLOCK: Lazy<Script> = Lazy::new(|| Script::new(include_str!("../../lua/block.lua")));

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IssueBody {
    api_key: Option<String>,
    rate_limit: Option<u64>,
    allowed_routes: Option<Vec<String>>,
    tier: Option<String>,
    org: Option<String>,
    ttl: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeepAliveBody {
    ttl: String,
}

fn bad_request(message: impl AsRef<str>) -> Answer {
    error(400, "bad_request", message)
}

fn redis_down() -> Answer {
    error(503, "redis_unavailable", "Redis did not answer")
}

fn not_found(api_key: &str) -> Answer {
    error(
        404,
        "not_found",
        format!("no stored token for api_key {api_key:?}"),
    )
}

fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Box<Answer>> {
    let body = if body.is_empty() {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| Box::new(bad_request(format!("invalid JSON body: {e}"))))
}

fn ttl_of(text: &str) -> Result<Duration, Box<Answer>> {
    match parse_duration(text) {
        Ok(d) if d.as_secs() >= 1 => Ok(d),
        Ok(_) => Err(Box::new(bad_request("ttl must be at least 1s"))),
        Err(e) => Err(Box::new(bad_request(format!("ttl: {e}")))),
    }
}

pub struct Api<'a> {
    pub state: &'a Arc<State>,
    pub limiter: &'a Arc<Limiter>,
}

impl Api<'_> {
    fn redis(&self) -> Result<&Arc<Redis>, Box<Answer>> {
        self.state.redis.as_ref().ok_or_else(|| {
            Box::new(error(
                409,
                "redis_required",
                "this endpoint needs a redis section in the config",
            ))
        })
    }

    async fn publish(&self, redis: &Redis, api_key: &str) {
        let cmd = redis::cmd("PUBLISH")
            .arg(channel(redis.prefix()))
            .arg(api_key)
            .to_owned();
        // Instances re-read within a second even if this message is lost.
        let _ = redis
            .query::<i64>("publish", Query::Cmd(&cmd), TIMEOUT)
            .await;
    }

    pub async fn issue(&self, body: &[u8]) -> Answer {
        let body: IssueBody = match parse_json(body) {
            Ok(b) => b,
            Err(a) => return *a,
        };
        let Some(jwt) = &self.state.config.auth.jwt else {
            return error(
                409,
                "jwt_required",
                "issuing tokens needs an auth.jwt section",
            );
        };
        let (KeySource::Secret(secret), Some(alg)) = (
            &jwt.key,
            jwt.algorithms.iter().find(|a| a.starts_with("HS")),
        ) else {
            return error(
                409,
                "jwt_required",
                "issuing tokens needs an HS* secret in auth.jwt",
            );
        };
        let Ok(algorithm) = jsonwebtoken::Algorithm::from_str(alg) else {
            return error(
                409,
                "jwt_required",
                "issuing tokens needs an HS* secret in auth.jwt",
            );
        };
        let options = IssueOptions {
            secret: String::from_utf8_lossy(secret).into_owned(),
            api_key: body.api_key,
            limit: body.rate_limit,
            routes: body
                .allowed_routes
                .unwrap_or_else(|| vec!["/*".to_string()]),
            ttl: body.ttl.unwrap_or_else(|| "24h".to_string()),
            tier: body.tier,
            org: body.org,
            algorithm,
            // Tokens this proxy itself accepts: its claim names, issuer, audience.
            claims: jwt.claims.clone(),
            issuer: jwt.issuer.clone(),
            audience: jwt.audience.clone(),
        };
        if let Err(e) = ttl_of(&options.ttl) {
            return *e;
        }
        let issued = match mint(&options) {
            Ok(i) => i,
            Err(e) => return bad_request(e.to_string()),
        };
        if let Some(redis) = &self.state.redis {
            let cmd = redis::cmd("SET")
                .arg(record_key(redis.prefix(), &issued.api_key))
                .arg(issued.record.to_string())
                .arg("EX")
                .arg(issued.ttl.as_secs())
                .to_owned();
            if redis
                .query::<()>("token_store", Query::Cmd(&cmd), TIMEOUT)
                .await
                .is_err()
            {
                return redis_down();
            }
            self.publish(redis, &issued.api_key).await;
        }
        json_answer(
            201,
            &json!({ "token": issued.token, "api_key": issued.api_key, "expires_at": issued.expires_at }),
        )
    }

    pub async fn revoke(&self, api_key: &str) -> Answer {
        let redis = match self.redis() {
            Ok(r) => r,
            Err(a) => return *a,
        };
        let cmd = redis::cmd("DEL")
            .arg(record_key(redis.prefix(), api_key))
            .to_owned();
        match redis
            .query::<i64>("token_revoke", Query::Cmd(&cmd), TIMEOUT)
            .await
        {
            Ok(0) => not_found(api_key),
            Ok(_) => {
                self.publish(redis, api_key).await;
                json_answer(200, &json!({ "api_key": api_key, "revoked": true }))
            }
            Err(_) => redis_down(),
        }
    }

    pub async fn block(&self, api_key: &str, blocked: bool) -> Answer {
        let redis = match self.redis() {
            Ok(r) => r,
            Err(a) => return *a,
        };
        let mut invocation = BLOCK.prepare_invoke();
        invocation
            .key(record_key(redis.prefix(), api_key))
            .arg(if blocked { "1" } else { "0" });
        match redis
            .invoke::<i64>("token_block", &invocation, TIMEOUT)
            .await
        {
            Ok(0) => not_found(api_key),
            Ok(_) => {
                self.publish(redis, api_key).await;
                json_answer(200, &json!({ "api_key": api_key, "blocked": blocked }))
            }
            Err(_) => redis_down(),
        }
    }

    pub async fn keep_alive(&self, api_key: &str, body: &[u8]) -> Answer {
        let redis = match self.redis() {
            Ok(r) => r,
            Err(a) => return *a,
        };
        let body: KeepAliveBody = match parse_json(body) {
            Ok(b) => b,
            Err(a) => return *a,
        };
        let ttl = match ttl_of(&body.ttl) {
            Ok(t) => t,
            Err(a) => return *a,
        };
        let cmd = redis::cmd("EXPIRE")
            .arg(record_key(redis.prefix(), api_key))
            .arg(ttl.as_secs())
            .to_owned();
        match redis
            .query::<i64>("token_keep_alive", Query::Cmd(&cmd), TIMEOUT)
            .await
        {
            Ok(0) => not_found(api_key),
            Ok(_) => json_answer(
                200,
                &json!({ "api_key": api_key, "expires_in": ttl.as_secs() }),
            ),
            Err(_) => redis_down(),
        }
    }

    pub async fn quota(&self, api_key: &str) -> Answer {
        // The stored record says which windows apply (rate_limit, tier, org).
        let mut claims = serde_json::Value::Null;
        let mut stored = false;
        if let Some(redis) = &self.state.redis {
            let cmd = redis::cmd("GET")
                .arg(record_key(redis.prefix(), api_key))
                .to_owned();
            match redis
                .query::<Option<String>>("token_lookup", Query::Cmd(&cmd), TIMEOUT)
                .await
            {
                Ok(Some(text)) => {
                    stored = true;
                    claims = serde_json::from_str::<serde_json::Value>(&text)
                        .map(|v| v["claims"].clone())
                        .unwrap_or_default();
                }
                Ok(None) => {}
                Err(_) => return redis_down(),
            }
        }
        let names = self
            .state
            .config
            .auth
            .jwt
            .as_ref()
            .map(|j| j.claims.clone());
        let claim = |name: Option<&str>| name.and_then(|n| claims.get(n));
        let identity = Identity {
            key: api_key.to_string(),
            limit_key: crate::ratelimit::key_id(api_key),
            rate_limit: claim(names.as_ref().map(|n| n.rate_limit.as_str()))
                .and_then(|v| v.as_u64()),
            routes: RouteMatcher::nothing(),
            tier: claim(names.as_ref().map(|n| n.tier.as_str()))
                .and_then(|v| v.as_str())
                .map(str::to_string),
            org: claim(names.as_ref().map(|n| n.org.as_str()))
                .and_then(|v| v.as_str())
                .map(str::to_string),
            valid_until: 0,
            forwarded: Vec::new(),
        };
        let limits = &self.state.config.limits;
        let windows = match self
            .limiter
            .quota_now(limits, self.state.redis.as_ref(), &identity)
            .await
        {
            Ok(w) => w,
            Err(_) => return redis_down(),
        };
        let list: Vec<serde_json::Value> = windows
            .iter()
            .map(|(scope, w, o)| {
                json!({
                    "scope": scope,
                    "limit": w.requests,
                    "window": format_duration(w.window),
                    "used": w.requests.saturating_sub(o.remaining),
                    "remaining": o.remaining,
                    "reset": o.reset_us.div_ceil(1_000_000),
                })
            })
            .collect();
        json_answer(
            200,
            &json!({ "api_key": api_key, "stored": stored, "windows": list }),
        )
    }

    pub async fn top(&self, query: Option<&str>) -> Answer {
        let redis = match self.redis() {
            Ok(r) => r,
            Err(a) => return *a,
        };
        let n = match query
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("n="))
            .map(str::parse::<usize>)
        {
            None => 10,
            Some(Ok(n)) if (1..=1000).contains(&n) => n,
            Some(_) => return bad_request("n must be a number from 1 to 1000"),
        };
        let [all, _, hour_prefix] = analytics::keys(redis.prefix());
        let time: Result<(u64, u64), _> = redis
            .query("stats", Query::Cmd(&redis::cmd("TIME")), TIMEOUT)
            .await;
        let Ok((secs, _)) = time else {
            return redis_down();
        };
        let hour = format!("{hour_prefix}{}", secs / 3600);
        let mut pipe = redis::pipe();
        pipe.cmd("ZREVRANGE")
            .arg(&all)
            .arg(0)
            .arg(n - 1)
            .arg("WITHSCORES");
        pipe.cmd("ZREVRANGE")
            .arg(&hour)
            .arg(0)
            .arg(n - 1)
            .arg("WITHSCORES");
        type Ranking = Vec<(String, f64)>;
        let result: Result<(Ranking, Ranking), _> =
            redis.query("stats", Query::Pipe(&pipe), TIMEOUT).await;
        let Ok((all_time, this_hour)) = result else {
            return redis_down();
        };
        let list = |v: Vec<(String, f64)>| -> Vec<serde_json::Value> {
            v.into_iter()
                .map(|(k, c)| json!({ "api_key": k, "requests": c as u64 }))
                .collect()
        };
        json_answer(
            200,
            &json!({ "n": n, "all_time": list(all_time), "current_hour": list(this_hour) }),
        )
    }

    pub async fn unique(&self) -> Answer {
        let redis = match self.redis() {
            Ok(r) => r,
            Err(a) => return *a,
        };
        let [_, unique, _] = analytics::keys(redis.prefix());
        let cmd = redis::cmd("PFCOUNT").arg(unique).to_owned();
        match redis.query::<u64>("stats", Query::Cmd(&cmd), TIMEOUT).await {
            Ok(count) => json_answer(200, &json!({ "unique_keys": count })),
            Err(_) => redis_down(),
        }
    }
}
