//! Rate limits: which windows apply to a request, and the decision for it
//! across all of them. A request is counted in *scopes* — the token's own
//! windows, its org's, then every `limits.rules` entry whose key the request
//! has — and admitted only if every scope that is not in shadow mode admits
//! it. A refused request is charged nowhere.

pub mod algo;
pub mod concurrency;
pub mod hybrid;
pub mod lease;
pub mod local;
pub mod packed;
pub mod rate;
pub mod remote;
pub mod rules;

use crate::config::{Algorithm, LimitSettings, OnFailure, Window};
use crate::error::Refusal;
use crate::redis_client::{Redis, Unavailable};
use algo::{Outcome, Period};
use hybrid::Leases;
use local::LocalStore;
pub use rules::Token;
use std::borrow::Cow;
use std::sync::Arc;

/// The windows of one limiter key that a request is counted in.
#[derive(Debug, Clone)]
pub struct Scope<'a> {
    /// The limiter key: `k:<api key>`, `o:<org>` or `r:<hash>` (a rule).
    pub id: Cow<'a, str>,
    /// What policies are named after: the tier, `default`, `key` (a
    /// `rate_limit` claim), `org` or the rule's name.
    pub name: &'a str,
    pub windows: Cow<'a, [Window]>,
    /// Counted and reported, never refused.
    pub shadow: bool,
}

/// One window that a request was counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// Index of its scope in the list given to `Limiter::check`.
    pub scope: usize,
    pub window: Window,
    pub outcome: Outcome,
    /// Where the request's units were charged in this window.
    pub store: Store,
}

/// Where a window charged a request: a refund or a cost reported after
/// the answer goes back to exactly that place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// The instance's lease (by its incarnation) of that period (counted in
    /// Redis, or to be counted there at the next call when admitted while
    /// Redis was away).
    Lease { incarnation: u32, period: u64 },
    /// The in-process store (no Redis configured).
    Local,
    /// Nothing was charged (a refusal, or a scope that did not count it).
    Nowhere,
}

/// One window's charge, kept for settling a cost the upstream reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub key: String,
    pub window: Window,
    pub store: Store,
}

/// The result for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Every window counted, in scope order (a refusal stops at its scope).
    pub windows: Vec<Counted>,
    /// Index into `windows` of the window closest to exhaustion among the
    /// enforced ones, or of the one that refused.
    pub closest: usize,
    /// A shadow scope would have refused the request.
    pub shadow_limited: bool,
    pub retry_after_secs: u64,
    /// The window that refused, for the 429 message.
    pub refused: Option<Window>,
    pub source: &'static str,
    /// A scope was decided on this instance's own: Redis could not be
    /// reached (`on_failure: local`).
    pub fallback: bool,
}

impl Decision {
    pub fn message(&self) -> String {
        match self.refused {
            Some(w) => format!(
                "limit of {} requests per {} exceeded",
                w.requests,
                w.label()
            ),
            None => String::new(),
        }
    }

    /// The reported window closest to exhaustion (legacy fields).
    pub fn closest(&self) -> Option<&Counted> {
        self.windows.get(self.closest)
    }

    /// What the request was charged, per window (for `Limiter::settle`).
    pub fn charges(&self, scopes: &[Scope<'_>]) -> Vec<Charge> {
        self.windows
            .iter()
            .filter(|c| c.store != Store::Nowhere)
            .filter_map(|c| {
                Some(Charge {
                    key: scopes.get(c.scope)?.id.to_string(),
                    window: c.window,
                    store: c.store,
                })
            })
            .collect()
    }

    /// The decision label of `tollgate_ratelimit_decisions_total`.
    pub fn label(&self) -> &'static str {
        match (self.allowed, self.shadow_limited) {
            (false, _) => "limited",
            (true, true) => "shadow_limited",
            (true, false) => "allowed",
        }
    }
}

pub use crate::clock::now_us;

/// The windows of a caller's own key: its `rate_limit` claim (one window of
/// `claim_window`), else its tier's windows, else the default ones, with the
/// name its policies carry. Borrowed from the config for tiers and the
/// default, so the common case costs no allocation per request.
pub fn key_windows<'a>(
    limits: &'a LimitSettings,
    token: &Token<'_>,
) -> (&'a str, Cow<'a, [Window]>) {
    if let Some(requests) = token.rate_limit {
        return (
            "key",
            Cow::Owned(vec![Window::every(requests, limits.claim_window)]),
        );
    }
    match token.tier.and_then(|t| limits.tiers.get_key_value(t)) {
        Some((tier, windows)) => (tier.as_str(), Cow::Borrowed(windows)),
        None => ("default", Cow::Borrowed(&limits.default)),
    }
}

/// Redis-side and local keys are namespaced so an api key can never collide
/// with an org of the same name (or a rule's hashed key).
pub fn key_id(api_key: &str) -> String {
    prefixed("k:", api_key)
}

pub fn org_id(org: &str) -> String {
    prefixed("o:", org)
}

/// `prefix` + `name` in one allocation (`format!` costs five times as much,
/// once per request).
fn prefixed(prefix: &str, name: &str) -> String {
    let mut id = String::with_capacity(prefix.len() + name.len());
    id.push_str(prefix);
    id.push_str(name);
    id
}

/// Every scope a request is counted in: the token's own windows and its
/// org's (when there is a token), then each rule that covers `route` and
/// whose key the request has.
pub fn scopes<'a>(
    limits: &'a LimitSettings,
    route: usize,
    caller: &rules::Caller<'a>,
) -> Vec<Scope<'a>> {
    let mut out = Vec::with_capacity(2 + limits.rules.len());
    if let Some(token) = &caller.token {
        let (name, windows) = key_windows(limits, token);
        out.push(Scope {
            id: Cow::Owned(key_id(token.key)),
            name,
            windows,
            shadow: false,
        });
        if let Some(org) = token.org.filter(|_| !limits.org.is_empty()) {
            out.push(Scope {
                id: Cow::Owned(org_id(org)),
                name: "org",
                windows: Cow::Borrowed(&limits.org),
                shadow: false,
            });
        }
    }
    for rule in &limits.rules {
        if rule.routes.as_ref().is_some_and(|r| !r.contains(&route)) {
            continue;
        }
        if let Some(id) = rules::key_of(&rule.name, &rule.key, caller, limits.client_ipv6_prefix) {
            out.push(Scope {
                id: Cow::Owned(id),
                name: &rule.name,
                windows: Cow::Borrowed(&rule.windows),
                shadow: rule.shadow,
            });
        }
    }
    out
}

fn secs_ceil(us: u64) -> u64 {
    us.div_ceil(1_000_000)
}

/// The seconds a window reports as its length: a calendar window's current
/// period (28 to 31 days for a month).
pub fn window_secs(w: &Window, now_us: u64) -> u64 {
    let (start, end) = Period::of(w).bounds(now_us);
    secs_ceil(end - start)
}

/// Folds the outcomes of every counted window into one decision.
fn decide(
    scopes: &[Scope<'_>],
    windows: Vec<Counted>,
    refused: Option<usize>,
    source: &'static str,
) -> Decision {
    let shadow = |c: &Counted| scopes.get(c.scope).is_some_and(|s| s.shadow);
    let shadow_limited = windows.iter().any(|c| shadow(c) && !c.outcome.allowed);
    if let Some(i) = refused {
        let c = windows[i];
        return Decision {
            allowed: false,
            closest: i,
            shadow_limited,
            retry_after_secs: secs_ceil(c.outcome.retry_us).max(1),
            refused: Some(c.window),
            windows,
            source,
            fallback: false,
        };
    }
    // Closest to exhaustion: least remaining as a share of the limit, among
    // the enforced windows when there are any.
    let enforced = windows.iter().any(|c| !shadow(c));
    let closest = windows
        .iter()
        .enumerate()
        .filter(|(_, c)| !enforced || !shadow(c))
        .min_by(|(_, a), (_, b)| {
            (a.outcome.remaining as u128 * b.window.requests as u128)
                .cmp(&(b.outcome.remaining as u128 * a.window.requests as u128))
                .then(b.outcome.reset_us.cmp(&a.outcome.reset_us))
        })
        .map_or(0, |(i, _)| i);
    Decision {
        allowed: true,
        closest,
        shadow_limited,
        retry_after_secs: 0,
        refused: None,
        windows,
        source,
        fallback: false,
    }
}

/// Why `count` gave no decision.
enum NoDecision {
    /// Redis is unreachable and `on_failure: open`.
    Open,
    /// Redis is unreachable and `on_failure: closed`.
    Closed,
}

/// What the quota view says of one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaWindow {
    pub scope: usize,
    pub window: Window,
    /// Units admitted (requests charged), when known: fixed and sliding
    /// windows, as each instance last reported them and this one now.
    pub used: Option<u64>,
    /// Units instances hold and have not admitted yet.
    pub leased: Option<u64>,
    pub remaining: u64,
    pub reset_us: u64,
}

/// Process-wide limiter state; it outlives config reloads, so counts and
/// leases of windows that did not change carry over.
#[derive(Default)]
pub struct Limiter {
    local: LocalStore,
    leases: Leases,
    /// `limits.max_keys` as last applied (a reload may change it).
    max_keys: std::sync::atomic::AtomicUsize,
}

impl Limiter {
    /// A limiter whose instance has this name in the ledgers (tests).
    #[cfg(test)]
    pub fn named(instance: &str) -> Limiter {
        Limiter {
            local: LocalStore::default(),
            leases: Leases::new(instance.to_string()),
            max_keys: Default::default(),
        }
    }

    /// `limits.max_keys`: keys each store keeps before it forgets the least
    /// recently used.
    pub fn set_max_keys(&self, max_keys: usize) {
        self.leases.set_max_keys(max_keys);
        self.local.set_max_keys(max_keys);
    }

    /// Decides one request of `cost` counted in `scopes`: `Ok(None)` when no
    /// window applies (or Redis is down with `on_failure: open`). Every
    /// enforced scope must admit the request; when one refuses, nothing is
    /// charged anywhere.
    pub async fn check(
        &self,
        limits: &LimitSettings,
        redis: Option<&Arc<Redis>>,
        scopes: &[Scope<'_>],
        cost: u64,
    ) -> Result<Option<Decision>, Refusal> {
        if scopes.iter().all(|s| s.windows.is_empty()) {
            return Ok(None);
        }
        if self.max_keys.load(std::sync::atomic::Ordering::Relaxed) != limits.max_keys {
            self.max_keys
                .store(limits.max_keys, std::sync::atomic::Ordering::Relaxed);
            self.set_max_keys(limits.max_keys);
        }
        match self.count(limits, redis, scopes, cost).await {
            Ok(d) => Ok(Some(d)),
            Err(NoDecision::Open) => Ok(None),
            Err(NoDecision::Closed) => Err(Refusal::LimiterUnavailable),
        }
    }

    /// Counts the request in each scope in turn, through Redis leases when
    /// `redis` is given (on this instance's own when Redis cannot be reached
    /// and `on_failure: local`), else in this process.
    async fn count(
        &self,
        limits: &LimitSettings,
        redis: Option<&Arc<Redis>>,
        scopes: &[Scope<'_>],
        cost: u64,
    ) -> Result<Decision, NoDecision> {
        let now = now_us();
        let mut windows: Vec<Counted> =
            Vec::with_capacity(scopes.iter().map(|s| s.windows.len()).sum());
        let mut asked = false;
        let mut fell_back = false;
        let mut refused = None;
        for (i, scope) in scopes.iter().enumerate() {
            if scope.windows.is_empty() {
                continue;
            }
            let (allowed, outcomes, stores): (bool, Vec<Outcome>, Vec<Store>) = match redis {
                Some(redis) => {
                    let acquired = match self
                        .leases
                        .acquire(
                            redis,
                            limits.algorithm,
                            limits.sync,
                            &scope.id,
                            &scope.windows,
                            cost,
                        )
                        .await
                    {
                        Ok(a) => {
                            asked |= a.asked_redis;
                            a
                        }
                        Err(_) => match redis.settings.on_failure {
                            OnFailure::Local => {
                                fell_back = true;
                                self.leases.fallback(
                                    limits.algorithm,
                                    &scope.id,
                                    &scope.windows,
                                    cost,
                                )
                            }
                            failure => {
                                self.refund(limits, scopes, &mut windows, cost, now);
                                return Err(match failure {
                                    OnFailure::Open => NoDecision::Open,
                                    _ => NoDecision::Closed,
                                });
                            }
                        },
                    };
                    let stores = acquired
                        .periods
                        .iter()
                        .map(|&(incarnation, period)| Store::Lease {
                            incarnation,
                            period,
                        })
                        .collect();
                    (acquired.allowed, acquired.outcomes, stores)
                }
                None => {
                    let mut outcomes =
                        self.local
                            .acquire(limits.algorithm, &scope.id, &scope.windows, cost, now);
                    let allowed = outcomes.iter().all(|o| o.allowed);
                    if !allowed {
                        // A window that would have admitted reports what
                        // is left without this request, which nothing charged.
                        for o in outcomes.iter_mut().filter(|o| o.allowed) {
                            o.remaining = o.remaining.saturating_add(cost);
                        }
                    }
                    (allowed, outcomes, vec![Store::Local; scope.windows.len()])
                }
            };
            let first = windows.len();
            windows.extend(
                scope
                    .windows
                    .iter()
                    .zip(&outcomes)
                    .enumerate()
                    .map(|(j, (w, o))| Counted {
                        scope: i,
                        window: *w,
                        outcome: *o,
                        store: if allowed {
                            stores.get(j).copied().unwrap_or(Store::Nowhere)
                        } else {
                            Store::Nowhere
                        },
                    }),
            );
            if allowed || scope.shadow {
                continue;
            }
            self.refund(limits, scopes, &mut windows, cost, now);
            refused = outcomes
                .iter()
                .enumerate()
                .filter(|(_, o)| !o.allowed)
                .max_by_key(|(_, o)| o.retry_us)
                .map(|(j, _)| first + j);
            break;
        }
        let source = if asked { "redis" } else { "local" };
        let mut decision = decide(scopes, windows, refused, source);
        decision.fallback = fell_back;
        Ok(decision)
    }

    /// Gives back what `count` charged so far (a later scope refused, or
    /// Redis failed under `open` / `closed`): each window to where it was
    /// charged, and the answer reports what is left after the refund.
    fn refund(
        &self,
        limits: &LimitSettings,
        scopes: &[Scope<'_>],
        windows: &mut [Counted],
        cost: u64,
        now: u64,
    ) {
        for c in windows.iter_mut() {
            let Some(scope) = scopes.get(c.scope) else {
                continue;
            };
            match c.store {
                Store::Lease {
                    incarnation,
                    period,
                } => self
                    .leases
                    .refund(&scope.id, &c.window, cost, incarnation, period),
                Store::Local => self.local.refund(
                    limits.algorithm,
                    &scope.id,
                    std::slice::from_ref(&c.window),
                    cost,
                    now,
                ),
                Store::Nowhere => continue,
            }
            c.store = Store::Nowhere;
            c.outcome.remaining = c.outcome.remaining.saturating_add(cost);
        }
    }

    /// Settles a request whose real cost is known only after the answer:
    /// `charged` units were taken at admission in every window of
    /// `charges`, `actual` are owed. Each window is settled where it was
    /// charged: a lease of the same period (a refund never reaches the next
    /// period), the in-process store, or nowhere (`on_failure: open`). A
    /// cost found higher is charged in the windows the key's leases hold at
    /// the answer (not in one a reload removed meanwhile, nor after a
    /// reload moved the key prefix and this instance's leases with it).
    pub fn settle(&self, limits: &LimitSettings, charges: &[Charge], charged: u64, actual: u64) {
        // What one answer may charge is capped at the largest window's limit:
        // a reported cost of 2^64-1 fills the windows, it does not wrap them.
        let cap = charges
            .iter()
            .map(|c| c.window.requests)
            .max()
            .unwrap_or(charged);
        let actual = actual.min(cap.max(charged));
        if actual == charged {
            return;
        }
        let now = now_us();
        for c in charges {
            let w = std::slice::from_ref(&c.window);
            match (c.store, actual > charged) {
                (Store::Lease { .. }, true) => {
                    self.leases.extra(&c.key, &c.window, actual - charged)
                }
                (
                    Store::Lease {
                        incarnation,
                        period,
                    },
                    false,
                ) => self
                    .leases
                    .refund(&c.key, &c.window, charged - actual, incarnation, period),
                (Store::Local, true) => {
                    self.local
                        .charge(limits.algorithm, &c.key, w, actual - charged, now)
                }
                (Store::Local, false) => {
                    self.local
                        .refund(limits.algorithm, &c.key, w, charged - actual, now)
                }
                (Store::Nowhere, _) => {}
            }
        }
    }

    /// Drops in-process counts whose windows have ended (the whole limiter
    /// without Redis).
    pub async fn sweep_local(&self, limits: &LimitSettings) -> usize {
        self.local.sweep(limits.algorithm, now_us()).await
    }

    /// At a stop: hands leased, unused units back to Redis (so other
    /// instances can admit them) and counts there what this instance
    /// admitted on its own.
    pub async fn return_leases(&self) -> usize {
        self.leases.return_all().await
    }

    /// Every window of `scopes` with what is used and left of it, from
    /// Redis when configured (nothing is charged), else from this process.
    pub async fn quota(
        &self,
        limits: &LimitSettings,
        redis: Option<&Arc<Redis>>,
        scopes: &[Scope<'_>],
    ) -> Result<Vec<QuotaWindow>, Unavailable> {
        let now = now_us();
        let mut out = Vec::new();
        for (i, scope) in scopes.iter().enumerate() {
            let Some(redis) = redis else {
                let outcomes = self
                    .local
                    .peek(limits.algorithm, &scope.id, &scope.windows, now);
                out.extend(
                    scope
                        .windows
                        .iter()
                        .zip(outcomes)
                        .map(|(w, o)| QuotaWindow {
                            scope: i,
                            window: *w,
                            used: Some(w.requests.saturating_sub(o.remaining)),
                            leased: Some(0),
                            remaining: o.remaining,
                            reset_us: o.reset_us,
                        }),
                );
                continue;
            };
            if limits.algorithm == Algorithm::Gcra {
                let asks = vec![remote::Ask::default(); scope.windows.len()];
                let grants = remote::lease(
                    redis,
                    limits.algorithm,
                    "quota",
                    &scope.id,
                    &scope.windows,
                    &asks,
                    u64::MAX / 2,
                    0,
                )
                .await?;
                out.extend(scope.windows.iter().zip(grants).map(|(w, g)| QuotaWindow {
                    scope: i,
                    window: *w,
                    used: None,
                    leased: None,
                    remaining: g.available,
                    reset_us: g.reset_us,
                }));
                continue;
            }
            let counts =
                remote::counts(redis, self.leases.instance(), &scope.id, &scope.windows).await?;
            out.extend(scope.windows.iter().zip(counts).map(|(w, c)| {
                let used = c
                    .admitted_elsewhere
                    .saturating_add(self.leases.consumed(&scope.id, w))
                    .min(c.counted);
                QuotaWindow {
                    scope: i,
                    window: *w,
                    used: Some(used),
                    leased: Some(c.counted - used),
                    remaining: w.requests.saturating_sub(c.counted),
                    reset_us: c.reset_us,
                }
            }));
        }
        Ok(out)
    }

    /// Instances sharing the Redis, as this one last counted them.
    pub fn fleet(&self) -> u64 {
        self.leases.fleet()
    }

    /// Evicts every key not in use now, as `limits.max_keys` would
    /// (tests).
    #[cfg(test)]
    pub fn evict_idle(&self) -> Vec<(String, String, lease::Lease, bool)> {
        self.leases.evict_idle()
    }

    /// The lease of a window of a key (tests).
    #[cfg(test)]
    pub fn lease_of(&self, key_id: &str, window: &Window) -> Option<lease::Lease> {
        self.leases.lease_of(key_id, window)
    }

    /// Unused units this instance holds for a window of a key (tests).
    #[cfg(test)]
    pub fn held(&self, prefix: &str, key_id: &str, window: &Window, period: u64) -> u64 {
        self.leases.held(prefix, key_id, window, period)
    }

    /// The key prefix the leases are taken under (tests).
    #[cfg(test)]
    pub fn namespace_prefix(&self) -> Option<String> {
        self.leases.namespace_prefix()
    }

    /// Admitted units of a window of a key Redis does not count yet (tests).
    #[cfg(test)]
    pub fn owed(&self, prefix: &str, key_id: &str, window: &Window, period: u64) -> u64 {
        self.leases.owed(prefix, key_id, window, period)
    }
}

/// For tests: how many turns another task on the same thread got while
/// `work` ran (zero if `work` never let go of the thread).
#[cfg(test)]
pub(crate) async fn turns_beside<T>(work: impl std::future::Future<Output = T>) -> (T, usize) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let turns = std::sync::Arc::new(AtomicUsize::new(0));
    let other = tokio::spawn({
        let turns = turns.clone();
        async move {
            loop {
                turns.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }
    });
    // The other task's first turn, so it is running when `work` starts.
    while turns.load(Ordering::Relaxed) == 0 {
        tokio::task::yield_now().await;
    }
    let before = turns.load(Ordering::Relaxed);
    let out = work.await;
    let during = turns.load(Ordering::Relaxed) - before;
    other.abort();
    (out, during)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Algorithm, KeyExpr, RuleSettings, SyncMode};
    use pingora::http::RequestHeader;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn w(requests: u64, secs: u64) -> Window {
        Window::every(requests, Duration::from_secs(secs))
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
            max_keys: 1_000_000,
            client_ipv6_prefix: 64,
        }
    }

    fn id<'a>(
        key: &'a str,
        rate_limit: Option<u64>,
        tier: Option<&'a str>,
        org: Option<&'a str>,
    ) -> Token<'a> {
        Token {
            key,
            rate_limit,
            tier,
            org,
            claims: &[],
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn request() -> RequestHeader {
        RequestHeader::build("GET", b"/x", None).unwrap()
    }

    fn caller<'a>(token: Option<&Token<'a>>, req: &'a RequestHeader) -> rules::Caller<'a> {
        rules::Caller {
            client_ip: Some("192.0.2.7".parse().unwrap()),
            token: token.copied(),
            route: "r",
            request: Some(req),
        }
    }

    impl Limiter {
        fn check_now(&self, l: &LimitSettings, id: &Token<'_>, cost: u64) -> Option<Decision> {
            let req = request();
            let scopes = scopes(l, 0, &caller(Some(id), &req));
            let d = block_on(self.check(l, None, &scopes, cost));
            d.ok().flatten()
        }

        fn remaining(&self, l: &LimitSettings, id: &Token<'_>) -> Vec<u64> {
            let req = request();
            let scopes = scopes(l, 0, &caller(Some(id), &req));
            block_on(self.quota(l, None, &scopes))
                .unwrap()
                .iter()
                .map(|c| c.remaining)
                .collect()
        }
    }

    impl Decision {
        fn remaining(&self) -> u64 {
            self.closest().unwrap().outcome.remaining
        }
    }

    #[test]
    fn windows_follow_claim_then_tier_then_default() {
        let l = limits();
        let claim = id("a", Some(7), Some("free"), None);
        assert_eq!(key_windows(&l, &claim), ("key", Cow::Owned(vec![w(7, 1)])));
        let free = id("a", None, Some("free"), None);
        assert_eq!(key_windows(&l, &free).1.to_vec(), vec![w(5, 5), w(100, 60)]);
        assert_eq!(key_windows(&l, &free).0, "free");
        let gold = id("a", None, Some("gold"), None);
        assert_eq!(
            key_windows(&l, &gold),
            ("default", Cow::Borrowed(&l.default[..]))
        );
    }

    #[test]
    fn remaining_counts_down_and_the_refusal_names_its_window() {
        let limiter = Limiter::default();
        let l = limits();
        let free = id("free-user", None, Some("free"), None);
        let remaining: Vec<u64> = (0..5)
            .map(|_| limiter.check_now(&l, &free, 1).unwrap().remaining())
            .collect();
        assert_eq!(remaining, vec![4, 3, 2, 1, 0]);
        let d = limiter.check_now(&l, &free, 1).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.message(), "limit of 5 requests per 5s exceeded");
        assert_eq!(d.closest().unwrap().window, w(5, 5));
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
        assert_eq!(limiter.remaining(&l, &b), vec![9, 0]);
    }

    #[test]
    fn cost_is_charged_in_units() {
        let limiter = Limiter::default();
        let l = limits();
        let a = id("costly", Some(10), None, None);
        assert_eq!(limiter.check_now(&l, &a, 4).unwrap().remaining(), 6);
        assert_eq!(limiter.check_now(&l, &a, 6).unwrap().remaining(), 0);
        assert!(!limiter.check_now(&l, &a, 1).unwrap().allowed);
    }

    fn rule(name: &str, key: &str, windows: Vec<Window>, shadow: bool) -> RuleSettings {
        RuleSettings {
            name: name.into(),
            key: KeyExpr::parse(key).unwrap(),
            routes: None,
            windows,
            shadow,
        }
    }

    #[test]
    fn rules_count_after_the_token_and_refund_it_when_they_refuse() {
        let limiter = Limiter::default();
        let mut l = limits();
        l.rules = vec![rule("per-ip", "client_ip", vec![w(2, 60)], false)];
        let a = id("a", Some(10), None, None);
        let d = limiter.check_now(&l, &a, 1).unwrap();
        assert!(d.allowed);
        assert_eq!(d.windows.len(), 2);
        assert_eq!(d.windows[1].scope, 1);
        assert!(limiter.check_now(&l, &a, 1).unwrap().allowed);
        let d = limiter.check_now(&l, &a, 1).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.refused, Some(w(2, 60)));
        assert_eq!(d.label(), "limited");
        // The token's own window got its unit back: 2 used of 10.
        assert_eq!(limiter.remaining(&l, &a)[0], 8);
    }

    #[test]
    fn shadow_rules_report_but_never_refuse() {
        let limiter = Limiter::default();
        let mut l = limits();
        l.rules = vec![rule("trial", "api_key", vec![w(1, 60)], true)];
        let a = id("a", Some(10), None, None);
        let first = limiter.check_now(&l, &a, 1).unwrap();
        assert_eq!(first.label(), "allowed");
        for _ in 0..3 {
            let d = limiter.check_now(&l, &a, 1).unwrap();
            assert!(d.allowed);
            assert!(d.shadow_limited);
            assert_eq!(d.label(), "shadow_limited");
            // The legacy fields follow the enforced window, not the shadow one.
            assert_eq!(d.closest().unwrap().scope, 0);
            assert_eq!(d.windows.len(), 2);
        }
        assert_eq!(limiter.remaining(&l, &a), vec![6, 0]);
    }

    #[test]
    fn a_rule_without_its_key_is_skipped() {
        let mut l = limits();
        l.rules = vec![
            rule("tenant", "header:X-Tenant", vec![w(1, 60)], false),
            rule("per-key", "api_key", vec![w(1, 60)], false),
        ];
        let req = request();
        // No token and no header: neither rule applies, so nothing is limited.
        assert!(scopes(&l, 0, &caller(None, &req)).is_empty());
        let mut routed = l.clone();
        routed.rules[1].routes = Some(vec![3]);
        let a = id("a", None, None, None);
        let names: Vec<&str> = scopes(&routed, 0, &caller(Some(&a), &req))
            .iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["default"]);
    }
}

#[cfg(test)]
mod sim;
