//! Rate limits: which windows apply to a caller, and the decision for one
//! request across all of them (the token's own windows, then its org's).

pub mod algo;
pub mod concurrency;
pub mod hybrid;
pub mod local;
pub mod remote;
pub mod rules;

use crate::auth::Identity;
use crate::config::{format_duration, LimitSettings, OnFailure, Window};
use crate::error::Refusal;
use crate::redis_client::{Redis, Unavailable};
use algo::Outcome;
use hybrid::Leases;
use local::LocalStore;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The result for one request, reported through the RateLimit-* headers for
/// the window closest to exhaustion (or the one that refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    pub reset_secs: u64,
    pub retry_after_secs: u64,
    /// The window that refused, for the 429 message.
    pub refused: Option<Window>,
    pub source: &'static str,
}

impl Decision {
    pub fn message(&self) -> String {
        match self.refused {
            Some(w) => format!(
                "limit of {} requests per {} exceeded",
                w.requests,
                format_duration(w.window)
            ),
            None => String::new(),
        }
    }
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The windows of a caller's own key: its `rate_limit` claim (one window of
/// `claim_window`), else its tier's windows, else the default ones.
/// Borrowed from the config for tiers and the default, so the common case
/// costs no allocation per request.
pub fn key_windows<'a>(limits: &'a LimitSettings, identity: &Identity) -> Cow<'a, [Window]> {
    if let Some(requests) = identity.rate_limit {
        return Cow::Owned(vec![Window {
            requests,
            window: limits.claim_window,
        }]);
    }
    Cow::Borrowed(
        identity
            .tier
            .as_ref()
            .and_then(|t| limits.tiers.get(t))
            .unwrap_or(&limits.default),
    )
}

/// Redis-side and local keys are namespaced so an api key can never collide
/// with an org of the same name.
pub fn key_id(api_key: &str) -> String {
    format!("k:{api_key}")
}

pub fn org_id(org: &str) -> String {
    format!("o:{org}")
}

fn secs_ceil(us: u64) -> u64 {
    us.div_ceil(1_000_000)
}

/// Folds the outcomes of every window into one decision.
fn decide(windows: &[Window], outcomes: &[Outcome], source: &'static str) -> Decision {
    let refused = windows
        .iter()
        .zip(outcomes)
        .filter(|(_, o)| !o.allowed)
        .max_by_key(|(_, o)| o.retry_us);
    if let Some((w, o)) = refused {
        return Decision {
            allowed: false,
            limit: w.requests,
            remaining: o.remaining,
            reset_secs: secs_ceil(o.reset_us),
            retry_after_secs: secs_ceil(o.retry_us).max(1),
            refused: Some(*w),
            source,
        };
    }
    let closest = windows.iter().zip(outcomes).min_by(|(wa, a), (wb, b)| {
        // Closest to exhaustion: least remaining as a share of the limit.
        (a.remaining as u128 * wb.requests as u128)
            .cmp(&(b.remaining as u128 * wa.requests as u128))
            .then(b.reset_us.cmp(&a.reset_us))
    });
    match closest {
        Some((w, o)) => Decision {
            allowed: true,
            limit: w.requests,
            remaining: o.remaining,
            reset_secs: secs_ceil(o.reset_us),
            retry_after_secs: 0,
            refused: None,
            source,
        },
        None => Decision {
            allowed: true,
            limit: 0,
            remaining: 0,
            reset_secs: 0,
            retry_after_secs: 0,
            refused: None,
            source,
        },
    }
}

/// Process-wide limiter state; it outlives config reloads, so counts and
/// leases of windows that did not change carry over.
#[derive(Default)]
pub struct Limiter {
    local: LocalStore,
    leases: Leases,
}

impl Limiter {
    /// Decides one request of `cost` for `identity`: `Ok(None)` when no
    /// window applies (or Redis is down with `on_failure: open`). Every
    /// window must admit the request; when one refuses, nothing is charged.
    pub async fn check(
        &self,
        limits: &LimitSettings,
        redis: Option<&Arc<Redis>>,
        identity: &Identity,
        cost: u64,
    ) -> Result<Option<Decision>, Refusal> {
        let own = key_windows(limits, identity);
        let org = identity.org.as_deref().filter(|_| !limits.org.is_empty());
        if own.is_empty() && org.is_none() {
            return Ok(None);
        }
        if let Some(redis) = redis {
            match self
                .check_redis(limits, redis, identity, &own, org, cost)
                .await
            {
                Ok(d) => return Ok(Some(d)),
                Err(_) => match redis.settings.on_failure {
                    OnFailure::Local => {}
                    OnFailure::Open => return Ok(None),
                    OnFailure::Closed => return Err(Refusal::LimiterUnavailable),
                },
            }
        }
        Ok(Some(self.check_local(limits, identity, &own, org, cost)))
    }

    /// Settles a request whose real cost is known only after the answer:
    /// `charged` units were taken at admission, `actual` are owed.
    pub async fn settle(
        &self,
        limits: &LimitSettings,
        redis: Option<&Arc<Redis>>,
        identity: &Identity,
        charged: u64,
        actual: u64,
    ) {
        let own = key_windows(limits, identity);
        // What one answer may charge is capped at the largest window's limit:
        // a reported cost of 2^64-1 fills the windows, it does not wrap them.
        let cap = own
            .iter()
            .chain(limits.org.iter().filter(|_| identity.org.is_some()))
            .map(|w| w.requests)
            .max()
            .unwrap_or(charged);
        let actual = actual.min(cap.max(charged));
        if actual == charged {
            return;
        }
        let mut scopes: Vec<(String, &[Window])> = vec![(key_id(&identity.key), &own)];
        if let Some(org) = identity.org.as_deref().filter(|_| !limits.org.is_empty()) {
            scopes.push((org_id(org), &limits.org));
        }
        let now = now_us();
        for (id, windows) in scopes {
            match redis {
                Some(redis) if actual > charged => {
                    let extra = actual - charged;
                    let uncovered = self.leases.consume(&id, windows, extra).await;
                    let units = i64::try_from(uncovered).unwrap_or(i64::MAX);
                    if uncovered > 0
                        && remote::charge(redis, limits.algorithm, &id, windows, units)
                            .await
                            .is_err()
                    {
                        self.local
                            .charge(limits.algorithm, &id, windows, uncovered, now);
                    }
                }
                Some(_) => self.leases.refund(&id, windows, charged - actual).await,
                None if actual > charged => {
                    self.local
                        .charge(limits.algorithm, &id, windows, actual - charged, now)
                }
                None => self
                    .local
                    .refund(limits.algorithm, &id, windows, charged - actual, now),
            }
        }
    }

    /// Hands leased, unused units back to Redis (graceful stop), so other
    /// instances can admit them.
    pub async fn return_leases(&self, limits: &LimitSettings, redis: &Redis) -> usize {
        let unused = self.leases.drain().await;
        let mut returned = 0;
        for (key, window, units) in unused {
            let units = i64::try_from(units).unwrap_or(i64::MAX);
            if remote::charge(redis, limits.algorithm, &key, &[window], -units)
                .await
                .is_ok()
            {
                returned += 1;
            }
        }
        returned
    }

    async fn check_redis(
        &self,
        limits: &LimitSettings,
        redis: &Arc<Redis>,
        identity: &Identity,
        own: &[Window],
        org: Option<&str>,
        cost: u64,
    ) -> Result<Decision, Unavailable> {
        let key = identity.limit_key.as_str();
        let (algo, sync) = (limits.algorithm, limits.sync);
        let first = self
            .leases
            .acquire(redis, algo, sync, key, own, cost)
            .await?;
        let mut asked = first.asked_redis;
        let mut windows: Cow<[Window]> = Cow::Borrowed(own);
        let mut outcomes = first.outcomes;
        if let (Some(org), true) = (org, outcomes.iter().all(|o| o.allowed)) {
            let org_key = org_id(org);
            let second = match self
                .leases
                .acquire(redis, algo, sync, &org_key, &limits.org, cost)
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    self.leases.refund(key, own, cost).await;
                    return Err(e);
                }
            };
            if !second.outcomes.iter().all(|o| o.allowed) {
                self.leases.refund(key, own, cost).await;
            }
            asked |= second.asked_redis;
            windows.to_mut().extend_from_slice(&limits.org);
            outcomes.extend(second.outcomes);
        }
        let source = if asked { "redis" } else { "local" };
        Ok(decide(&windows, &outcomes, source))
    }

    fn check_local(
        &self,
        limits: &LimitSettings,
        identity: &Identity,
        own: &[Window],
        org: Option<&str>,
        cost: u64,
    ) -> Decision {
        let now = now_us();
        let key = key_id(&identity.key);
        let mut windows: Cow<[Window]> = Cow::Borrowed(own);
        let mut outcomes = self.local.acquire(limits.algorithm, &key, own, cost, now);
        let own_ok = outcomes.iter().all(|o| o.allowed);
        if let (Some(org), true) = (org, own_ok) {
            let org_key = org_id(org);
            let org_outcomes =
                self.local
                    .acquire(limits.algorithm, &org_key, &limits.org, cost, now);
            if !org_outcomes.iter().all(|o| o.allowed) {
                self.local.refund(limits.algorithm, &key, own, cost, now);
            }
            windows.to_mut().extend_from_slice(&limits.org);
            outcomes.extend(org_outcomes);
        }
        decide(&windows, &outcomes, "local")
    }

    /// Every window that applies to a key with what is left of it, from
    /// Redis when configured (a zero-unit lease: nothing is charged).
    pub async fn quota_now(
        &self,
        limits: &LimitSettings,
        redis: Option<&Arc<Redis>>,
        identity: &Identity,
    ) -> Result<Vec<(&'static str, Window, Outcome)>, Unavailable> {
        let own = key_windows(limits, identity);
        let org = identity.org.as_deref().filter(|_| !limits.org.is_empty());
        let Some(redis) = redis else {
            let local = self.quota(limits, identity);
            return Ok(local
                .into_iter()
                .enumerate()
                .map(|(i, (w, o))| (if i < own.len() { "key" } else { "org" }, w, o))
                .collect());
        };
        let mut out = Vec::new();
        let mut scopes: Vec<(&'static str, String, &[Window])> =
            vec![("key", key_id(&identity.key), &own)];
        if let Some(org) = org {
            scopes.push(("org", org_id(org), &limits.org));
        }
        for (scope, id, windows) in scopes {
            let need = vec![0; windows.len()];
            let grants = remote::acquire(
                redis,
                limits.algorithm,
                &id,
                windows,
                &need,
                u64::MAX / 2,
                0,
            )
            .await?;
            for (w, g) in windows.iter().zip(grants) {
                let outcome = Outcome {
                    allowed: g.available > 0,
                    remaining: g.available,
                    reset_us: g.reset_us,
                    retry_us: g.retry_us,
                };
                out.push((scope, *w, outcome));
            }
        }
        Ok(out)
    }

    /// Every window that applies to a key, without charging anything.
    pub fn quota(&self, limits: &LimitSettings, identity: &Identity) -> Vec<(Window, Outcome)> {
        let now = now_us();
        let own = key_windows(limits, identity);
        let mut out: Vec<(Window, Outcome)> = own
            .iter()
            .copied()
            .zip(
                self.local
                    .peek(limits.algorithm, &key_id(&identity.key), &own, now),
            )
            .collect();
        if let Some(org) = identity.org.as_deref().filter(|_| !limits.org.is_empty()) {
            out.extend(
                limits.org.iter().copied().zip(self.local.peek(
                    limits.algorithm,
                    &org_id(org),
                    &limits.org,
                    now,
                )),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::permissions::RouteMatcher;
    use crate::config::{Algorithm, SyncMode};
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn w(requests: u64, secs: u64) -> Window {
        Window {
            requests,
            window: Duration::from_secs(secs),
        }
    }

    fn limits() -> LimitSettings {
        let mut tiers = BTreeMap::new();
        tiers.insert("free".to_string(), vec![w(5, 5), w(100, 60)]);
        LimitSettings {
            algorithm: Algorithm::FixedWindow,
            claim_window: Duration::from_secs(1),
            default: vec![w(100, 60)],
            tiers,
            org: vec![w(3, 60)],
            sync: SyncMode::Hybrid,
            rules: Vec::new(),
            concurrency: Default::default(),
            headers: Default::default(),
        }
    }

    fn id(key: &str, rate_limit: Option<u64>, tier: Option<&str>, org: Option<&str>) -> Identity {
        Identity {
            key: key.into(),
            limit_key: key_id(key),
            rate_limit,
            routes: RouteMatcher::compile(&["/*"]).unwrap(),
            tier: tier.map(Into::into),
            org: org.map(Into::into),
            valid_until: u64::MAX,
            forwarded: vec![],
        }
    }

    impl Limiter {
        fn check_now(&self, l: &LimitSettings, id: &Identity, cost: u64) -> Option<Decision> {
            let own = key_windows(l, id);
            let org = id.org.as_deref().filter(|_| !l.org.is_empty());
            Some(self.check_local(l, id, &own, org, cost))
        }
    }

    #[test]
    fn windows_follow_claim_then_tier_then_default() {
        let l = limits();
        assert_eq!(
            key_windows(&l, &id("a", Some(7), Some("free"), None)),
            vec![w(7, 1)]
        );
        assert_eq!(
            key_windows(&l, &id("a", None, Some("free"), None)),
            vec![w(5, 5), w(100, 60)]
        );
        assert_eq!(
            key_windows(&l, &id("a", None, Some("gold"), None)),
            vec![w(100, 60)]
        );
        assert_eq!(
            key_windows(&l, &id("a", None, None, None)),
            vec![w(100, 60)]
        );
    }

    #[test]
    fn remaining_counts_down_and_the_refusal_names_its_window() {
        let limiter = Limiter::default();
        let l = limits();
        let free = id("free-user", None, Some("free"), None);
        let remaining: Vec<u64> = (0..5)
            .map(|_| limiter.check_now(&l, &free, 1).unwrap().remaining)
            .collect();
        assert_eq!(remaining, vec![4, 3, 2, 1, 0]);
        let d = limiter.check_now(&l, &free, 1).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.message(), "limit of 5 requests per 5s exceeded");
        assert_eq!(d.limit, 5);
        assert!(d.retry_after_secs >= 1 && d.retry_after_secs <= 5);
    }

    #[test]
    fn org_windows_are_shared_and_refusals_charge_nothing() {
        let limiter = Limiter::default();
        let l = limits();
        let a = id("a", Some(10), None, Some("acme"));
        let b = id("b", Some(10), None, Some("acme"));
        assert!(limiter.check_now(&l, &a, 1).unwrap().allowed);
        assert!(limiter.check_now(&l, &b, 1).unwrap().allowed);
        assert!(limiter.check_now(&l, &a, 1).unwrap().allowed);
        let d = limiter.check_now(&l, &b, 1).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.message(), "limit of 3 requests per 1m exceeded");
        // b's own window was refunded: 1 used of 10.
        let quota = limiter.quota(&l, &b);
        assert_eq!(quota[0].1.remaining, 9);
        assert_eq!(quota[1].1.remaining, 0);
    }

    #[test]
    fn cost_is_charged_in_units() {
        let limiter = Limiter::default();
        let l = limits();
        let a = id("costly", Some(10), None, None);
        assert_eq!(limiter.check_now(&l, &a, 4).unwrap().remaining, 6);
        assert_eq!(limiter.check_now(&l, &a, 6).unwrap().remaining, 0);
        assert!(!limiter.check_now(&l, &a, 1).unwrap().allowed);
    }
}
