//! `tollgate token issue`: mints an HS256 token (and optionally stores it in
//! Redis under `<prefix>token:<api_key>` with the same lifetime).

use crate::config::{format_duration, parse_duration, ClaimNames, RedisSettings};
use crate::redis_client::{BlockingError, Unavailable};
use anyhow::{anyhow, bail, Context};
use base64::Engine;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;
use std::time::Duration;

pub struct IssueOptions {
    pub secret: String,
    pub api_key: Option<String>,
    pub limit: Option<u64>,
    pub routes: Vec<String>,
    pub ttl: String,
    pub tier: Option<String>,
    pub org: Option<String>,
    pub algorithm: jsonwebtoken::Algorithm,
    /// Claim names the verifying proxy reads (`auth.jwt.claims`).
    pub claims: ClaimNames,
    /// `iss` and `aud`, set when the verifying proxy checks them.
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

/// `--routes /a/*,/b`: the comma-separated form of the command line.
pub fn split_routes(routes: &str) -> Vec<String> {
    routes
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_string)
        .collect()
}

pub struct Issued {
    pub token: String,
    pub api_key: String,
    pub expires_at: u64,
    pub ttl: Duration,
    /// JSON stored in Redis: the token and its claims.
    pub record: serde_json::Value,
}

/// A random url-safe api key: 18 random bytes, 24 characters.
pub fn random_api_key() -> anyhow::Result<String> {
    let mut bytes = [0u8; 18];
    getrandom::fill(&mut bytes).map_err(|e| anyhow!("no randomness available: {e}"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

pub fn mint(o: &IssueOptions) -> anyhow::Result<Issued> {
    if o.secret.is_empty() {
        bail!("--secret must not be empty");
    }
    let ttl = parse_duration(&o.ttl).map_err(|e| anyhow!("--ttl: {e}"))?;
    if ttl.as_secs() == 0 {
        bail!("--ttl must be at least 1s");
    }
    let api_key = match &o.api_key {
        Some(k) if k.is_empty() || k.len() > 256 || !k.bytes().all(|b| b.is_ascii_graphic()) => {
            bail!("--api-key must be 1 to 256 printable characters")
        }
        Some(k) => k.clone(),
        None => random_api_key()?,
    };
    let routes = &o.routes;
    super::permissions::RouteMatcher::compile(routes).map_err(|e| anyhow!("--routes: {e}"))?;
    let now = super::now_secs();
    let expires_at = now + ttl.as_secs();
    let names = &o.claims;
    let mut claims = serde_json::Map::new();
    claims.insert(names.key.clone(), json!(api_key));
    claims.insert(names.routes.clone(), json!(routes));
    claims.insert("iat".into(), json!(now));
    claims.insert("exp".into(), json!(expires_at));
    if let Some(limit) = o.limit {
        claims.insert(names.rate_limit.clone(), json!(limit));
    }
    if let Some(tier) = &o.tier {
        claims.insert(names.tier.clone(), json!(tier));
    }
    if let Some(org) = &o.org {
        claims.insert(names.org.clone(), json!(org));
    }
    if let Some(iss) = &o.issuer {
        claims.insert("iss".into(), json!(iss));
    }
    if let Some(aud) = &o.audience {
        claims.insert("aud".into(), json!(aud));
    }
    let claims = serde_json::Value::Object(claims);
    let token = encode(
        &Header::new(o.algorithm),
        &claims,
        &EncodingKey::from_secret(o.secret.as_bytes()),
    )
    .context("cannot sign the token")?;
    let record = json!({ "token": token, "claims": claims, "blocked": false });
    Ok(Issued {
        token,
        api_key,
        expires_at,
        ttl,
        record,
    })
}

/// Stores the record under `<prefix>token:<api_key>` with the token's TTL,
/// through the Redis layer (so `rediss://` works as it does for the proxy).
pub fn store(redis: RedisSettings, issued: &Issued) -> anyhow::Result<String> {
    let key = super::store::record_key(&redis.key_prefix, &issued.api_key);
    let cmd = redis::cmd("SET")
        .arg(&key)
        .arg(issued.record.to_string())
        .arg("EX")
        .arg(issued.ttl.as_secs())
        .to_owned();
    let at = redis
        .urls
        .iter()
        .map(|u| masked(u))
        .collect::<Vec<_>>()
        .join(", ");
    crate::redis_client::blocking_query::<()>(redis, "token_store", cmd).map_err(|e| {
        let why = match e {
            BlockingError::Redis(Unavailable::Failed { cause, .. }) => cause,
            BlockingError::Redis(Unavailable::TimedOut { .. }) => "no answer in 5 s".into(),
            other => other.to_string(),
        };
        anyhow!("cannot store the token in Redis at {at}: {why}")
    })?;
    Ok(key)
}

/// A Redis URL fit for a message: its password replaced by `***`.
pub fn masked(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        // `user:password`, or a lone word that may well be a password.
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => format!("{scheme}://***@{host}{path}"),
        },
        None => url.to_string(),
    }
}

/// `tollgate token issue`: options from the command line, falling back to
/// the proxy's config (`-c`) for the secret, claim names, issuer, audience
/// and Redis, so the token is one that proxy accepts. Prints the token.
pub fn run(args: crate::cli::IssueArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Some(crate::config::load(path).map_err(|e| {
            anyhow!(
                "invalid config {}:\n  {}",
                path.display(),
                crate::config::join(&e.problems, "\n  ")
            )
        })?),
        None => None,
    };
    let jwt = config.as_ref().and_then(|c| c.auth.jwt.as_ref());
    let secret = match (&args.secret, jwt.map(|j| &j.key)) {
        (Some(s), _) => s.clone(),
        (None, Some(crate::config::KeySource::Secret(s))) => {
            String::from_utf8_lossy(s).into_owned()
        }
        (None, Some(_)) => {
            bail!("the config's auth.jwt has no HS* secret to sign with; give --secret")
        }
        (None, None) => {
            bail!("give --secret (or TOLLGATE_AUTH__JWT__SECRET), or -c with an auth.jwt.secret")
        }
    };
    let redis = match (&args.redis, config.as_ref().and_then(|c| c.redis.clone())) {
        (Some(url), from_config) => Some(RedisSettings {
            urls: vec![url.clone()],
            cluster: false,
            key_prefix: String::new(),
            timeout: Duration::from_secs(5),
            on_failure: crate::config::OnFailure::Closed,
            ca_file: from_config.and_then(|c| c.ca_file),
        }),
        (None, from_config) => from_config.map(|c| RedisSettings {
            timeout: Duration::from_secs(5),
            ..c
        }),
    };
    let prefix = args
        .prefix
        .clone()
        .or_else(|| {
            config
                .as_ref()
                .and_then(|c| c.redis.as_ref())
                .map(|r| r.key_prefix.clone())
        })
        .unwrap_or_else(|| "tollgate:".to_string());
    let opts = IssueOptions {
        secret,
        api_key: args.api_key,
        limit: args.limit,
        routes: split_routes(&args.routes),
        ttl: args.ttl,
        tier: args.tier,
        org: args.org,
        algorithm: jwt
            .and_then(|j| {
                j.algorithms
                    .iter()
                    .copied()
                    .find(|a| a.family() == jsonwebtoken::AlgorithmFamily::Hmac)
            })
            .unwrap_or(jsonwebtoken::Algorithm::HS256),
        claims: jwt.map(|j| j.claims.clone()).unwrap_or_default(),
        issuer: args.issuer.or_else(|| jwt.and_then(|j| j.issuer.clone())),
        audience: args
            .audience
            .or_else(|| jwt.and_then(|j| j.audience.clone())),
    };
    let issued = mint(&opts)?;
    let stored = match redis {
        Some(settings) => Some(store(
            RedisSettings {
                key_prefix: prefix,
                ..settings
            },
            &issued,
        )?),
        None => None,
    };
    print!("{}", describe(&issued, stored.as_deref(), &args.url));
    Ok(())
}

/// What `token issue` prints.
pub fn describe(issued: &Issued, stored_as: Option<&str>, example_url: &str) -> String {
    let mut out = format!(
        "{}\n\napi_key:    {}\nexpires_at: {} (in {})\n",
        issued.token,
        issued.api_key,
        issued.expires_at,
        format_duration(issued.ttl)
    );
    if let Some(key) = stored_as {
        out.push_str(&format!("stored as:  {key}\n"));
    }
    out.push_str(&format!(
        "\ncurl -H 'Authorization: Bearer {}' {example_url}\n",
        issued.token
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> IssueOptions {
        IssueOptions {
            secret: "s".into(),
            api_key: None,
            limit: Some(5),
            routes: split_routes("/api/*, /status"),
            ttl: "1h".into(),
            tier: Some("free".into()),
            org: None,
            algorithm: jsonwebtoken::Algorithm::HS256,
            claims: ClaimNames::default(),
            issuer: None,
            audience: None,
        }
    }

    #[test]
    fn mints_a_token_with_the_asked_claims() {
        let issued = mint(&opts()).unwrap();
        assert_eq!(issued.api_key.len(), 24);
        let claims = &issued.record["claims"];
        assert_eq!(claims["rate_limit"], 5);
        assert_eq!(claims["allowed_routes"], json!(["/api/*", "/status"]));
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            3600
        );
        assert!(claims.get("org_id").is_none());
        assert!(claims.get("iss").is_none());
        assert_ne!(mint(&opts()).unwrap().api_key, issued.api_key);
    }

    #[test]
    fn uses_the_configured_claim_names_issuer_and_audience() {
        let mut o = opts();
        o.claims.key = "sub".into();
        o.claims.routes = "scopes".into();
        o.claims.rate_limit = "rl".into();
        o.issuer = Some("https://issuer.example".into());
        o.audience = Some("tollgate".into());
        let issued = mint(&o).unwrap();
        let claims = &issued.record["claims"];
        assert_eq!(claims["sub"], json!(issued.api_key));
        assert_eq!(claims["scopes"], json!(["/api/*", "/status"]));
        assert_eq!(claims["rl"], 5);
        assert_eq!(claims["iss"], "https://issuer.example");
        assert_eq!(claims["aud"], "tollgate");
        assert!(claims.get("api_key").is_none());
    }

    #[test]
    fn refuses_bad_options() {
        let mut o = opts();
        o.ttl = "soon".into();
        assert!(mint(&o).is_err());
        let mut o = opts();
        o.routes = vec!["/a*".into()];
        assert!(mint(&o).is_err());
        let mut o = opts();
        o.api_key = Some("has space".into());
        assert!(mint(&o).is_err());
    }

    #[test]
    fn redis_passwords_never_reach_a_message() {
        assert_eq!(masked("redis://127.0.0.1:1"), "redis://127.0.0.1:1");
        assert_eq!(
            masked("redis://:hunter2@db:6379/0"),
            "redis://:***@db:6379/0"
        );
        assert_eq!(
            masked("rediss://app:hunter2@db:6380"),
            "rediss://app:***@db:6380"
        );
        assert_eq!(masked("redis://hunter2@db"), "redis://***@db");
    }
}
