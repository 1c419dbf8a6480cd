//! JWT verification with keys pinned to their algorithms.
//!
//! The key is parsed once, at load, for the configured algorithm family; the
//! token's `alg` header is only accepted if it is in `auth.jwt.algorithms`, and
//! it never selects the key type (a token signed HS256 with an RSA public key
//! as the secret fails, as does `alg: none`). Claims are read with their types
//! checked: a claim of the wrong type makes the token invalid.

mod cache;
pub mod issue;
pub mod jwks;
pub mod permissions;
pub mod store;

use crate::config::{ConfigProblem, JwtSettings, KeySource};
use crate::error::Refusal;
use cache::TokenCache;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use permissions::RouteMatcher;
use serde_json::{Map, Value};
use std::sync::Arc;

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// What a verified token says about its caller.
#[derive(Debug)]
pub struct Identity {
    /// The rate-limit key (`api_key` claim by default).
    pub key: String,
    pub rate_limit: Option<u64>,
    pub routes: RouteMatcher,
    pub tier: Option<String>,
    pub org: Option<String>,
    /// `exp` plus leeway, unix seconds.
    pub valid_until: u64,
    /// Claims that routes forward as headers: (claim name, header-safe value).
    pub forwarded: Vec<(String, String)>,
}

impl Identity {
    pub fn forwarded(&self, claim: &str) -> Option<&str> {
        self.forwarded
            .iter()
            .find(|(c, _)| c == claim)
            .map(|(_, v)| v.as_str())
    }
}

/// Where the verifying key comes from.
enum Keys {
    Static(DecodingKey),
    Jwks(Arc<jwks::Jwks>),
}

/// Why a token could not be checked yet (JWKS keys missing), or a refusal.
#[derive(Debug)]
pub enum VerifyError {
    Refused(Refusal),
    /// The token names a key id the current key set lacks.
    UnknownKey,
    /// No key set has been fetched yet.
    NoKeys,
}

impl From<Refusal> for VerifyError {
    fn from(r: Refusal) -> Self {
        VerifyError::Refused(r)
    }
}

pub struct Verifier {
    keys: Keys,
    material: KeyMaterial,
    validation: Validation,
    /// One validation per accepted algorithm, for JWKS keys (each key
    /// verifies only the algorithms of its own family).
    per_algorithm: Vec<(Algorithm, Validation)>,
    settings: JwtSettings,
    forwarded_claims: Vec<String>,
    cache: TokenCache,
}

pub use crate::clock::now_secs;

/// The verifying key as read when the live state is built: file contents
/// are read then, so a reload sees a rotated key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMaterial {
    Secret(Vec<u8>),
    Pem(Vec<u8>),
    Jwks,
}

impl KeyMaterial {
    pub fn load(source: &KeySource) -> Result<KeyMaterial, ConfigProblem> {
        let read = |key: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| {
                ConfigProblem::new(key, format!("cannot read {}: {e}", path.display()))
            })
        };
        Ok(match source {
            KeySource::Secret(s) => KeyMaterial::Secret(s.clone()),
            KeySource::SecretFile(path) => {
                let secret = read("auth.jwt.secret_file", path)?
                    .trim_ascii_end()
                    .to_vec();
                if secret.is_empty() {
                    return Err(ConfigProblem::new(
                        "auth.jwt.secret_file",
                        format!("{} is empty", path.display()),
                    ));
                }
                KeyMaterial::Secret(secret)
            }
            KeySource::PublicKeyFile(path) => {
                KeyMaterial::Pem(read("auth.jwt.public_key_file", path)?)
            }
            KeySource::JwksUrl(_) => KeyMaterial::Jwks,
        })
    }
}

/// A PEM public key for the family of `alg`.
fn public_key(alg: Algorithm, pem: &[u8]) -> Result<DecodingKey, ConfigProblem> {
    let parsed = match alg.family() {
        jsonwebtoken::AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(pem),
        jsonwebtoken::AlgorithmFamily::Ec => DecodingKey::from_ec_pem(pem),
        jsonwebtoken::AlgorithmFamily::Ed => DecodingKey::from_ed_pem(pem),
        _ => {
            return Err(ConfigProblem::new(
                "auth.jwt.public_key_file",
                "HS* algorithms take a secret",
            ))
        }
    };
    parsed.map_err(|e| {
        ConfigProblem::new(
            "auth.jwt.public_key_file",
            format!("not a {alg:?} public key in PEM form: {e}"),
        )
    })
}

fn invalid(why: impl Into<String>) -> Refusal {
    Refusal::InvalidToken(why.into().into())
}

impl Verifier {
    /// `material`: the key as loaded ([`KeyMaterial::load`]).
    /// `forwarded_claims`: every claim some route forwards as a header.
    /// `jwks`: a key set to keep (from the config this one replaces) when
    /// it serves these settings; otherwise a new one is made.
    pub fn new(
        settings: &JwtSettings,
        material: KeyMaterial,
        forwarded_claims: Vec<String>,
        jwks: Option<Arc<jwks::Jwks>>,
    ) -> Result<Self, ConfigProblem> {
        let algorithms = settings.algorithms.clone();
        let first = *algorithms.first().ok_or_else(|| {
            ConfigProblem::new("auth.jwt.algorithms", "list at least one algorithm")
        })?;
        let keys = match (&material, &settings.key) {
            (KeyMaterial::Secret(secret), _) => Keys::Static(DecodingKey::from_secret(secret)),
            (KeyMaterial::Pem(pem), _) => Keys::Static(public_key(first, pem)?),
            (KeyMaterial::Jwks, KeySource::JwksUrl(url)) => match jwks {
                Some(kept) => Keys::Jwks(kept),
                None => Keys::Jwks(Arc::new(
                    jwks::Jwks::new(url.clone(), settings.jwks_refresh, algorithms.clone())
                        .map_err(|e| ConfigProblem::new("auth.jwt.jwks_ca_file", e.to_string()))?,
                )),
            },
            (KeyMaterial::Jwks, _) => {
                return Err(ConfigProblem::new("auth.jwt", "no key source"));
            }
        };
        let mut validation = Validation::new(first);
        validation.algorithms = algorithms.clone();
        validation.leeway = settings.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        if let Some(iss) = &settings.issuer {
            validation.set_issuer(&[iss]);
            validation.set_required_spec_claims(&["exp", "iss"]);
        }
        match &settings.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                let mut required = vec!["exp", "aud"];
                if settings.issuer.is_some() {
                    required.push("iss");
                }
                validation.set_required_spec_claims(&required);
            }
            None => validation.validate_aud = false,
        }
        let per_algorithm = algorithms
            .iter()
            .map(|a| {
                let mut v = validation.clone();
                v.algorithms = vec![*a];
                (*a, v)
            })
            .collect();
        Ok(Verifier {
            keys,
            material,
            validation,
            per_algorithm,
            settings: settings.clone(),
            forwarded_claims,
            cache: TokenCache::new(settings.cache_size),
        })
    }

    /// Whether this verifier already does what `settings` ask, so a reload
    /// can keep it (with its key set and its cache of verified tokens).
    pub fn same_settings(
        &self,
        settings: &JwtSettings,
        material: &KeyMaterial,
        forwarded_claims: &[String],
    ) -> bool {
        self.settings == *settings
            && self.material == *material
            && self.forwarded_claims == forwarded_claims
    }

    /// The shared secret, when tokens are HMAC-signed (the admin API mints with it).
    pub fn hmac_secret(&self) -> Option<&[u8]> {
        match &self.material {
            KeyMaterial::Secret(s) => Some(s),
            _ => None,
        }
    }

    /// The JWKS key set, when keys come from a JWKS endpoint.
    pub fn jwks(&self) -> Option<Arc<jwks::Jwks>> {
        match &self.keys {
            Keys::Jwks(j) => Some(j.clone()),
            Keys::Static(_) => None,
        }
    }

    /// Verifies a bearer token, from the cache when it was seen before.
    pub fn verify(&self, token: &str) -> Result<Arc<Identity>, Refusal> {
        self.try_verify(token).map_err(|e| match e {
            VerifyError::Refused(r) => r,
            VerifyError::UnknownKey => invalid("the token's key id is unknown"),
            VerifyError::NoKeys => Refusal::AuthUnavailable,
        })
    }

    /// Whether `token` is among the verified tokens kept (a cache hit).
    pub fn knows(&self, token: &str) -> bool {
        token.len() <= MAX_TOKEN_LEN && self.cache.get(token, now_secs()).is_some()
    }

    /// Like `verify`, but tells a missing JWKS key apart, so the caller can
    /// fetch the key set and try once more.
    pub fn try_verify(&self, token: &str) -> Result<Arc<Identity>, VerifyError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(invalid("the token is too large").into());
        }
        let now = now_secs();
        if let Some(id) = self.cache.get(token, now) {
            return Ok(id);
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| invalid("the token is malformed"))?;
        // RFC 7515 §4.1.11: extensions named critical must be understood, and
        // tollgate understands none.
        if header.crit.is_some() {
            return Err(invalid("the token names critical header extensions (crit)").into());
        }
        let jwks_keys;
        let (key, validation) = match &self.keys {
            Keys::Static(k) => (k, &self.validation),
            Keys::Jwks(j) => {
                let kid = header
                    .kid
                    .ok_or_else(|| invalid("the token has no key id (kid)"))?;
                jwks_keys = j.keys().ok_or(VerifyError::NoKeys)?;
                let found = jwks_keys.get(&kid).ok_or(VerifyError::UnknownKey)?;
                // The key's own family (and its `alg`, when the JWK names one)
                // decides which of the accepted algorithms it may verify.
                if !found.algorithms.contains(&header.alg) {
                    return Err(invalid("the token algorithm does not fit its key").into());
                }
                let validation = self
                    .per_algorithm
                    .iter()
                    .find(|(a, _)| *a == header.alg)
                    .map(|(_, v)| v)
                    .ok_or_else(|| invalid("the token algorithm is not accepted"))?;
                (&found.key, validation)
            }
        };
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => Refusal::TokenExpired,
                ErrorKind::ImmatureSignature => invalid("the token is not valid yet (nbf)"),
                ErrorKind::InvalidSignature => invalid("the token signature is invalid"),
                ErrorKind::InvalidAlgorithm => invalid("the token algorithm is not accepted"),
                ErrorKind::MissingRequiredClaim(c) => {
                    invalid(format!("the token has no {c} claim"))
                }
                ErrorKind::InvalidClaimFormat(c) => {
                    invalid(format!("the token's {c} claim has the wrong type"))
                }
                ErrorKind::InvalidIssuer => invalid("the token issuer is not accepted"),
                ErrorKind::InvalidAudience => invalid("the token audience is not accepted"),
                _ => invalid("the token is malformed"),
            },
        )?;
        let identity = Arc::new(self.identity(&data.claims, now)?);
        self.cache.insert(token, identity.clone(), now);
        Ok(identity)
    }

    fn identity(&self, claims: &Map<String, Value>, now: u64) -> Result<Identity, Refusal> {
        let names = &self.settings.claims;
        let leeway = self.settings.leeway.as_secs();
        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| invalid("the token's exp claim has the wrong type"))?;
        match claims.get("iat") {
            None => {}
            Some(v) => match v.as_u64() {
                Some(iat) if iat <= now.saturating_add(leeway) => {}
                Some(_) => return Err(invalid("the token was issued in the future (iat)")),
                None => return Err(invalid("the token's iat claim has the wrong type")),
            },
        }
        let key = match claims.get(&names.key) {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s.clone(),
            Some(_) => {
                return Err(invalid(format!(
                    "the token's {} claim has the wrong type",
                    names.key
                )))
            }
            None => return Err(invalid(format!("the token has no {} claim", names.key))),
        };
        let rate_limit = match claims.get(&names.rate_limit) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                invalid(format!(
                    "the token's {} claim must be a whole number",
                    names.rate_limit
                ))
            })?),
        };
        let routes = match claims.get(&names.routes) {
            None => RouteMatcher::nothing(),
            Some(Value::Array(items)) => {
                let entries: Vec<&str> = items
                    .iter()
                    .map(|v| v.as_str())
                    .collect::<Option<_>>()
                    .ok_or_else(|| {
                        invalid(format!(
                            "the token's {} claim must be a list of strings",
                            names.routes
                        ))
                    })?;
                RouteMatcher::compile(&entries).map_err(|e| invalid(e.to_string()))?
            }
            Some(_) => {
                return Err(invalid(format!(
                    "the token's {} claim must be a list of strings",
                    names.routes
                )))
            }
        };
        let optional_string = |name: &str| match claims.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(invalid(format!(
                "the token's {name} claim must be a string"
            ))),
        };
        let tier = optional_string(&names.tier)?;
        let org = optional_string(&names.org)?;
        let mut forwarded = Vec::new();
        for claim in &self.forwarded_claims {
            let value = match claims.get(claim) {
                None | Some(Value::Null) => continue,
                Some(Value::String(s)) => s.clone(),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
                Some(_) => {
                    return Err(invalid(format!(
                        "the token's {claim} claim cannot be forwarded as a header"
                    )))
                }
            };
            if value.len() > 1024 || !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                return Err(invalid(format!(
                    "the token's {claim} claim has characters not allowed in a header"
                )));
            }
            forwarded.push((claim.clone(), value));
        }
        Ok(Identity {
            key,
            rate_limit,
            routes,
            tier,
            org,
            valid_until: exp.saturating_add(leeway),
            forwarded,
        })
    }

    pub fn require_stored(&self) -> bool {
        self.settings.require_stored
    }

    /// How long a confirmed stored token survives a store outage.
    pub fn store_cache(&self) -> std::time::Duration {
        self.settings.store_cache
    }

    pub fn cached_tokens(&self) -> usize {
        self.cache.len()
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer_token(header: Option<&[u8]>) -> Option<&str> {
    let value = std::str::from_utf8(header?).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests;
