//! `tollgate token issue`: mints an HS256 token (and optionally stores it in
//! Redis under `<prefix>token:<api_key>` with the same lifetime).

use crate::config::{format_duration, parse_duration};
use anyhow::{anyhow, bail, Context};
use base64::Engine;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub struct IssueOptions {
    pub secret: String,
    pub api_key: Option<String>,
    pub limit: Option<u64>,
    pub routes: Vec<String>,
    pub ttl: String,
    pub tier: Option<String>,
    pub org: Option<String>,
    pub redis: Option<String>,
    pub prefix: String,
    pub algorithm: jsonwebtoken::Algorithm,
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
    let mut claims = json!({
        "api_key": api_key,
        "allowed_routes": routes,
        "iat": now,
        "exp": expires_at,
    });
    if let Some(limit) = o.limit {
        claims["rate_limit"] = json!(limit);
    }
    if let Some(tier) = &o.tier {
        claims["tier"] = json!(tier);
    }
    if let Some(org) = &o.org {
        claims["org_id"] = json!(org);
    }
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

fn resp_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Stores the record with `SET key value EX ttl` over a plain connection.
pub fn store(url: &str, prefix: &str, issued: &Issued) -> anyhow::Result<String> {
    let (addr, user, password) = crate::redis_probe::parse_url(url)
        .ok_or_else(|| anyhow!("--redis: {url:?} is not a redis:// URL"))?;
    let mut stream =
        TcpStream::connect(&addr).with_context(|| format!("cannot connect to Redis at {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = Vec::new();
    let mut replies = 1;
    if let Some(p) = &password {
        replies += 1;
        request.extend(match &user {
            Some(u) => resp_command(&["AUTH", u, p]),
            None => resp_command(&["AUTH", p]),
        });
    }
    let key = format!("{prefix}token:{}", issued.api_key);
    let ttl = issued.ttl.as_secs().to_string();
    let value = issued.record.to_string();
    request.extend(resp_command(&["SET", &key, &value, "EX", &ttl]));
    stream.write_all(&request)?;
    let mut got = String::new();
    let mut buf = [0u8; 512];
    while got.matches("\r\n").count() < replies {
        let n = stream.read(&mut buf).context("no answer from Redis")?;
        if n == 0 {
            bail!("Redis closed the connection");
        }
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    if let Some(err) = got.lines().find(|l| l.starts_with('-')) {
        bail!("Redis refused: {}", &err[1..]);
    }
    Ok(key)
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
            redis: None,
            prefix: "tollgate:".into(),
            algorithm: jsonwebtoken::Algorithm::HS256,
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
        assert_ne!(mint(&opts()).unwrap().api_key, issued.api_key);
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
}
