//! The `/admin/` endpoints: token lifecycle, quotas, usage analytics. Each
//! returns its answer or the [`Refusal`] that explains why not.

use super::{json_answer, Answer};
use crate::analytics;
use crate::auth::issue::{mint, IssueOptions};
use crate::auth::store::{channel, record_key};
use crate::config::parse_duration;
use crate::config::KeyPart;
use crate::error::Refusal;
use crate::ratelimit::rules::{key_of, Caller, Token};
use crate::ratelimit::{Limiter, Scope};
use crate::redis_client::{Query, Redis};
use crate::state::State;
use http::StatusCode;
use redis::Script;
use serde::Deserialize;
use serde_json::json;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(1);
static BLOCK: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../../lua/block.lua")));

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

fn bad_request(message: impl Into<String>) -> Refusal {
    Refusal::BadRequest(message.into().into())
}

fn not_found(api_key: &str) -> Refusal {
    Refusal::NotFound(format!("no stored token for api_key {api_key:?}").into())
}

const REDIS_REQUIRED: Refusal = Refusal::Unconfigured {
    code: "redis_required",
    message: "this endpoint needs a redis section in the config",
};

const JWT_REQUIRED: Refusal = Refusal::Unconfigured {
    code: "jwt_required",
    message: "issuing tokens needs an HS* secret in auth.jwt",
};

fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Refusal> {
    let body = if body.is_empty() {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid JSON body: {e}")))
}

fn ttl_of(text: &str) -> Result<Duration, Refusal> {
    match parse_duration(text) {
        Ok(d) if d.as_secs() >= 1 => Ok(d),
        Ok(_) => Err(bad_request("ttl must be at least 1s")),
        Err(e) => Err(bad_request(format!("ttl: {e}"))),
    }
}

fn ok(body: serde_json::Value) -> Result<Answer, Refusal> {
    Ok(json_answer(StatusCode::OK, &body))
}

pub struct Api<'a> {
    pub state: &'a Arc<State>,
    pub limiter: &'a Arc<Limiter>,
}

impl Api<'_> {
    fn redis(&self) -> Result<&Arc<Redis>, Refusal> {
        self.state.redis.as_ref().ok_or(REDIS_REQUIRED)
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, Refusal> {
        self.redis()?
            .query(op, Query::Cmd(cmd), TIMEOUT)
            .await
            .map_err(|_| Refusal::RedisUnavailable)
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

    pub async fn issue(&self, body: &[u8]) -> Result<Answer, Refusal> {
        let body: IssueBody = parse_json(body)?;
        let jwt = self.state.config.auth.jwt.as_ref().ok_or(JWT_REQUIRED)?;
        let secret = self
            .state
            .verifier
            .as_ref()
            .and_then(|v| v.hmac_secret())
            .ok_or(JWT_REQUIRED)?;
        let algorithm = jwt
            .algorithms
            .iter()
            .copied()
            .find(|a| a.family() == jsonwebtoken::AlgorithmFamily::Hmac)
            .ok_or(JWT_REQUIRED)?;
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
        ttl_of(&options.ttl)?;
        let issued = mint(&options).map_err(|e| bad_request(e.to_string()))?;
        if let Some(redis) = &self.state.redis {
            let cmd = redis::cmd("SET")
                .arg(record_key(redis.prefix(), &issued.api_key))
                .arg(issued.record.to_string())
                .arg("EX")
                .arg(issued.ttl.as_secs())
                .to_owned();
            self.query::<()>("token_store", &cmd).await?;
            self.publish(redis, &issued.api_key).await;
        }
        Ok(json_answer(
            StatusCode::CREATED,
            &json!({ "token": issued.token, "api_key": issued.api_key, "expires_at": issued.expires_at }),
        ))
    }

    pub async fn revoke(&self, api_key: &str) -> Result<Answer, Refusal> {
        let redis = self.redis()?;
        let cmd = redis::cmd("DEL")
            .arg(record_key(redis.prefix(), api_key))
            .to_owned();
        match self.query::<i64>("token_revoke", &cmd).await? {
            0 => Err(not_found(api_key)),
            _ => {
                self.publish(redis, api_key).await;
                ok(json!({ "api_key": api_key, "revoked": true }))
            }
        }
    }

    pub async fn block(&self, api_key: &str, blocked: bool) -> Result<Answer, Refusal> {
        let redis = self.redis()?;
        let mut invocation = BLOCK.prepare_invoke();
        invocation
            .key(record_key(redis.prefix(), api_key))
            .arg(if blocked { "1" } else { "0" });
        let changed = redis
            .invoke::<i64>("token_block", &invocation, TIMEOUT)
            .await
            .map_err(|_| Refusal::RedisUnavailable)?;
        if changed == 0 {
            return Err(not_found(api_key));
        }
        self.publish(redis, api_key).await;
        ok(json!({ "api_key": api_key, "blocked": blocked }))
    }

    pub async fn keep_alive(&self, api_key: &str, body: &[u8]) -> Result<Answer, Refusal> {
        let redis = self.redis()?;
        let body: KeepAliveBody = parse_json(body)?;
        let ttl = ttl_of(&body.ttl)?;
        let cmd = redis::cmd("EXPIRE")
            .arg(record_key(redis.prefix(), api_key))
            .arg(ttl.as_secs())
            .to_owned();
        match self.query::<i64>("token_keep_alive", &cmd).await? {
            0 => Err(not_found(api_key)),
            _ => ok(json!({ "api_key": api_key, "expires_in": ttl.as_secs() })),
        }
    }

    /// The stored claims of a key (rate_limit, tier, org say which windows apply).
    async fn stored_claims(&self, api_key: &str) -> Result<Option<serde_json::Value>, Refusal> {
        let Some(redis) = &self.state.redis else {
            return Ok(None);
        };
        let cmd = redis::cmd("GET")
            .arg(record_key(redis.prefix(), api_key))
            .to_owned();
        let record: Option<String> = self.query("token_lookup", &cmd).await?;
        Ok(record.map(|text| {
            serde_json::from_str::<serde_json::Value>(&text)
                .map(|v| v["claims"].clone())
                .unwrap_or_default()
        }))
    }

    pub async fn quota(&self, api_key: &str) -> Result<Answer, Refusal> {
        let stored = self.stored_claims(api_key).await?;
        let claims = stored.clone().unwrap_or_default();
        let names = self
            .state
            .config
            .auth
            .jwt
            .as_ref()
            .map(|j| j.claims.clone())
            .unwrap_or_default();
        let token = Token {
            key: api_key,
            rate_limit: claims.get(&names.rate_limit).and_then(|v| v.as_u64()),
            tier: claims.get(&names.tier).and_then(|v| v.as_str()),
            org: claims.get(&names.org).and_then(|v| v.as_str()),
            claims: &[],
        };
        let config = &self.state.config;
        let limits = &config.limits;
        // The token's windows and its org's once; then each rule whose key
        // an api key alone determines (api_key, org, route), per route it
        // covers when the route is part of the key.
        let mut scopes = crate::ratelimit::scopes(
            limits,
            usize::MAX,
            &Caller {
                client_ip: None,
                token: Some(token),
                route: "",
                request: None,
            },
        );
        scopes.retain(|s| !s.id.starts_with("r:"));
        for rule in &limits.rules {
            let per_route = rule.key.0.contains(&KeyPart::Route);
            let covered: Vec<usize> = match &rule.routes {
                Some(r) => r.clone(),
                None => (0..config.routes.len()).collect(),
            };
            let routes: Vec<usize> = if per_route {
                covered
            } else {
                covered.into_iter().take(1).collect()
            };
            for route in routes {
                let caller = Caller {
                    client_ip: None,
                    token: Some(token),
                    route: &config.routes[route].name,
                    request: None,
                };
                if let Some(id) = key_of(&rule.name, &rule.key, &caller, limits.client_ipv6_prefix)
                {
                    scopes.push(Scope {
                        id: id.into(),
                        name: &rule.name,
                        windows: rule.windows.as_slice().into(),
                        shadow: rule.shadow,
                    });
                }
            }
        }
        let windows = self
            .limiter
            .quota(limits, self.state.redis.as_ref(), &scopes)
            .await
            .map_err(|_| Refusal::RedisUnavailable)?;
        let now = crate::ratelimit::now_us();
        let list: Vec<serde_json::Value> = windows
            .iter()
            .map(|c| {
                let scope = &scopes[c.scope];
                let w = c.window;
                let kind = match scope.id.get(..2) {
                    Some("o:") => "org",
                    Some("r:") => "rule",
                    _ => "key",
                };
                json!({
                    "scope": kind,
                    "policy": format!("{}-{}", scope.name, w.label()),
                    "limit": w.requests,
                    "window": w.label(),
                    "window_seconds": crate::ratelimit::window_secs(&w, now),
                    "calendar": w.calendar.is_some(),
                    "shadow": scope.shadow,
                    "used": c.used,
                    "leased": c.leased,
                    "remaining": c.remaining,
                    "reset": c.reset_us.div_ceil(1_000_000),
                })
            })
            .collect();
        ok(json!({ "api_key": api_key, "stored": stored.is_some(), "windows": list }))
    }

    pub async fn top(&self, query: Option<&str>) -> Result<Answer, Refusal> {
        let redis = self.redis()?;
        let n = match query
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("n="))
            .map(str::parse::<usize>)
        {
            None => 10,
            Some(Ok(n)) if (1..=1000).contains(&n) => n,
            Some(_) => return Err(bad_request("n must be a number from 1 to 1000")),
        };
        let [all, _, hour_prefix] = analytics::keys(redis.prefix());
        let (secs, _): (u64, u64) = self.query("stats", &redis::cmd("TIME")).await?;
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
        let (all_time, this_hour): (Ranking, Ranking) = redis
            .query("stats", Query::Pipe(&pipe), TIMEOUT)
            .await
            .map_err(|_| Refusal::RedisUnavailable)?;
        let list = |v: Vec<(String, f64)>| -> Vec<serde_json::Value> {
            v.into_iter()
                .map(|(k, c)| json!({ "api_key": k, "requests": c as u64 }))
                .collect()
        };
        ok(json!({ "n": n, "all_time": list(all_time), "current_hour": list(this_hour) }))
    }

    pub async fn unique(&self) -> Result<Answer, Refusal> {
        let redis = self.redis()?;
        let [_, unique, _] = analytics::keys(redis.prefix());
        let count: u64 = self
            .query("stats", &redis::cmd("PFCOUNT").arg(unique).to_owned())
            .await?;
        ok(json!({ "unique_keys": count }))
    }
}
