//! The request path: the `ProxyHttp` implementation and its per-request CTX.
//!
//! `request_filter` reads like the README's request path: probes, path, route,
//! then forwarding. Each step either passes or returns a [`Refusal`] that
//! `respond::refuse` renders.

pub mod client_ip;
pub mod forward;
pub mod limit_headers;
pub mod request;
pub mod respond;

use crate::analytics::Analytics;
use crate::auth::store::{Status, TokenStore};
use crate::auth::{bearer_token, Identity, VerifyError};
use crate::config::RouteSettings;
use crate::credentials::Credentials;
use crate::edge::drain::Drain;
use crate::error::Refusal;
use crate::logging::{self, AccessRecord};
use crate::metrics;
use crate::path;
use crate::ratelimit::concurrency::{self, Concurrency, Slot};
use crate::ratelimit::{self, rules, Limiter};
use crate::state::{Health, SharedState, State};
use crate::trace::{RequestTrace, Timings, UpstreamTiming};
use crate::upstream::Upstream;
use async_trait::async_trait;
use opentelemetry::KeyValue;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{ErrorSource, ErrorType};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

pub struct Proxy {
    pub state: SharedState,
    /// While draining, every answer closes its connection.
    pub drain: Arc<Drain>,
    pub health: Arc<Health>,
    pub limiter: Arc<Limiter>,
    pub concurrency: Arc<Concurrency>,
    pub tokens: Arc<TokenStore>,
    pub analytics: Arc<Analytics>,
    pub credentials: Arc<Credentials>,
}

pub struct Ctx {
    pub state: Option<Arc<State>>,
    pub identity: Option<Arc<Identity>>,
    /// Bearer token for the upstream (`upstream_auth`).
    pub upstream_token: Option<String>,
    pub start: Instant,
    pub request_id: String,
    pub route: Option<usize>,
    /// Metric label when no route applies (`_health`, `_ready`, `_unmatched`, `_invalid`).
    pub label: &'static str,
    /// Normalised path and query, forwarded upstream.
    pub target: String,
    /// The path as a lenient backend reads it (`..;`, `\`, escapes
    /// resolved) — as sent and as forwarded — where that differs from
    /// `target`: permissions must allow these too.
    pub lenient_paths: Vec<String>,
    pub tried: Vec<SocketAddr>,
    pub status: u16,
    /// Why the request was not answered by the upstream: a refusal code or
    /// an upstream error kind (for the access log).
    pub error: Option<&'static str>,
    /// The `Authorization` value that was verified (`auth: jwt` routes).
    pub verified_authorization: Option<http::HeaderValue>,
    /// A WebSocket upgrade the route allows (tunnelled, counted as one request).
    pub websocket: bool,
    /// The concurrency slot this request holds; given back when the
    /// context is dropped (answer sent, client gone, tunnel closed).
    pub slot: Option<Slot>,
    /// Headers added to tollgate's own answers (rate-limit headers, ...).
    pub extra_headers: Vec<(&'static str, String)>,
    /// A refusal went to a gRPC client as HTTP 200: metrics and the access
    /// log record `status`, the HTTP status it stands for.
    pub grpc_refused: bool,
    /// Where each window charged the request, kept when the route settles
    /// the cost the upstream reports.
    pub charges: Vec<ratelimit::Charge>,
    /// The request's trace, when `telemetry.tracing` is on.
    pub trace: Option<RequestTrace>,
}

impl Ctx {
    /// The snapshot and the route this request matched, once it has one.
    pub fn route(&self) -> Option<(&State, &RouteSettings)> {
        let state = self.state.as_deref()?;
        Some((state, state.config.routes.get(self.route?)?))
    }

    /// The upstream of the matched route.
    pub fn upstream(&self) -> Option<&Upstream> {
        let (state, route) = self.route()?;
        state.upstreams.get(route.upstream).map(|u| u.as_ref())
    }

    fn route_name(&self) -> &str {
        self.route().map_or(self.label, |(_, r)| r.name.as_str())
    }

    fn upstream_name(&self) -> &str {
        self.upstream().map_or("-", |u| u.settings.name.as_str())
    }

    /// Where a sampled request records its stages; `None` otherwise.
    pub fn timings(&mut self) -> Option<&mut Timings> {
        self.trace.as_mut()?.timings.as_deref_mut()
    }

    fn sampled(&self) -> bool {
        self.trace.as_ref().is_some_and(|t| t.timings.is_some())
    }
}

/// What limit rules may key on: this request and its caller. The client
/// address is worked out only when some rule may need it.
fn caller<'a>(
    session: &'a Session,
    identity: Option<&'a Identity>,
    state: &State,
    route: &'a RouteSettings,
) -> rules::Caller<'a> {
    let req = session.req_header();
    let client_ip = if state.config.limits.rules.is_empty() {
        None
    } else {
        session.client_addr().and_then(|a| a.as_inet()).map(|a| {
            let server = &state.config.server;
            forward::client_address(
                a.ip(),
                req,
                &server.trusted_proxies,
                server.client_ip_header,
            )
        })
    };
    rules::Caller {
        client_ip,
        token: identity.map(token_view),
        route: &route.name,
        request: Some(req),
    }
}

/// What the limiter sees of a verified token.
fn token_view(identity: &Identity) -> ratelimit::Token<'_> {
    ratelimit::Token {
        key: &identity.key,
        rate_limit: identity.rate_limit,
        tier: identity.tier.as_deref(),
        org: identity.org.as_deref(),
        claims: &identity.forwarded,
    }
}

/// `tollgate_ratelimit_rule_decisions_total` for every rule the request
/// was counted by, and `tollgate_ratelimit_refusals_total` for every window
/// that refused it (or would have, in shadow mode).
fn count_by_rule_and_policy(d: &ratelimit::Decision, scopes: &[ratelimit::Scope<'_>]) {
    for (i, scope) in scopes.iter().enumerate() {
        let mut counted = d.windows.iter().filter(|c| c.scope == i).peekable();
        if counted.peek().is_none() {
            continue;
        }
        let refused: Vec<_> = counted.filter(|c| !c.outcome.allowed).collect();
        let decision = match (refused.is_empty(), scope.shadow) {
            (true, _) => "allowed",
            (false, true) => "shadow_limited",
            (false, false) => "limited",
        };
        if scope.id.starts_with("r:") {
            metrics::RULE_DECISIONS
                .with_label_values(&[scope.name, decision])
                .inc();
        }
        for c in refused {
            let mut policy = String::with_capacity(scope.name.len() + 8);
            policy.push_str(scope.name);
            policy.push('-');
            c.window.write_label(&mut policy);
            metrics::REFUSALS_BY_POLICY
                .with_label_values(&[&policy, decision])
                .inc();
        }
    }
}

/// A client-sent request id is kept when it is short and printable.
fn client_request_id(req: &RequestHeader) -> Option<String> {
    let v = req.headers.get(respond::REQUEST_ID)?.to_str().ok()?;
    let ok = !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| v.to_string())
}

/// 32 random hex digits, encoded by hand: `format!` took about 1,100
/// instructions a request (callgrind), this about 100.
pub fn new_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = fastrand::u128(..);
    let mut id = [0u8; 32];
    for b in id.iter_mut().rev() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    // Always ASCII hex: the fallback is never taken.
    std::str::from_utf8(&id).unwrap_or_default().to_owned()
}

enum Step {
    Continue,
    Answered,
}

impl Proxy {
    async fn probes(&self, session: &mut Session, ctx: &mut Ctx, state: &State) -> Result<Step> {
        let path = session.req_header().uri.path();
        let server = &state.config.server;
        if path == server.health_path {
            ctx.label = "_health";
            respond::text(session, ctx, 200, "OK").await?;
            return Ok(Step::Answered);
        }
        if path == server.ready_path {
            ctx.label = "_ready";
            let redis_ok =
                state.config.redis.is_none() || self.health.redis_reachable.load(Ordering::Relaxed);
            if redis_ok {
                respond::text(session, ctx, 200, "ready").await?;
            } else {
                respond::text(session, ctx, 503, "not ready: redis unreachable").await?;
            }
            return Ok(Step::Answered);
        }
        Ok(Step::Continue)
    }

    /// Step 2: the normalised path, the route it names, and that route's
    /// `path_policy`. The policy of the route the path lands on is applied
    /// to the whole raw path, and a path that a lenient backend would read
    /// as another route is refused whatever the policy: choosing a
    /// permissive route never lets a path out of it.
    fn route(&self, session: &Session, ctx: &mut Ctx, state: &State) -> Result<usize, Refusal> {
        let req = session.req_header();
        let raw = req.uri.path();
        let invalid = |ctx: &mut Ctx, r: Refusal| {
            ctx.label = "_invalid";
            r
        };
        let refused = path::strict_violation(raw);
        let normalised = match path::normalize(raw) {
            Ok(n) => n,
            // Always a `..`: a dot form, refused under either policy.
            Err(path::PathError::AboveRoot) => {
                return Err(invalid(
                    ctx,
                    Refusal::BadPath(path::BadPath::DotSegment.message()),
                ))
            }
            Err(e) => return Err(invalid(ctx, Refusal::BadRequest(e.to_string().into()))),
        };
        let host = request::host(req).inspect_err(|_| ctx.label = "_invalid")?;
        let found = state.routes.find(host, &req.method, &normalised);
        let strict = found.is_none_or(|i| {
            state.config.routes[i].path_policy == crate::config::PathPolicy::Strict
        });
        if let (Some(why), true) = (refused, strict) {
            return Err(invalid(ctx, Refusal::BadPath(why.message())));
        }
        let route = found.ok_or_else(|| {
            ctx.label = "_unmatched";
            Refusal::NoRoute
        })?;
        // Read leniently both as the client wrote it and as it is forwarded
        // (normalising can pop a `..;` with a later `..`): each reading
        // must stay on this route.
        if path::may_read_differently(raw) {
            for text in [raw, normalised.as_str()] {
                let other = path::lenient_reading(text)
                    .ok()
                    .filter(|o| {
                        *o == normalised || state.routes.find(host, &req.method, o) == Some(route)
                    })
                    .ok_or_else(|| {
                        invalid(
                            ctx,
                            Refusal::BadPath(path::BadPath::ReadsAsAnotherRoute.message()),
                        )
                    })?;
                if other != normalised && !ctx.lenient_paths.contains(&other) {
                    ctx.lenient_paths.push(other);
                }
            }
        }
        ctx.target = match req.uri.query() {
            Some(q) => format!("{normalised}?{q}"),
            None => normalised,
        };
        Ok(route)
    }

    /// Steps 3 and 4, with their span when the request is sampled.
    async fn authenticate(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        state: &State,
        route: usize,
    ) -> Result<Option<Arc<Identity>>, Refusal> {
        if !state.config.routes[route].auth_jwt {
            return Ok(None);
        }
        if !ctx.sampled() {
            return self.verify_caller(session, ctx, state, None).await;
        }
        let start = Instant::now();
        let mut cached = None;
        let result = self
            .verify_caller(session, ctx, state, Some(&mut cached))
            .await;
        if let Some(t) = ctx.timings() {
            let mut attributes = Vec::with_capacity(2);
            if let Some(hit) = cached {
                attributes.push(KeyValue::new("tollgate.auth.cache_hit", hit));
            }
            if let Ok(Some(identity)) = &result {
                attributes.push(KeyValue::new("tollgate.key_hash", key_hash(&identity.key)));
            }
            t.stage("auth", start, attributes);
            if let (Err(r), Some(stage)) = (&result, t.stages.last_mut()) {
                stage.error = Some(r.code());
            }
        }
        result
    }

    /// Who is calling, and may they call this path. `cached` (sampled
    /// requests only) learns whether the token was verified before.
    async fn verify_caller(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        state: &State,
        cached: Option<&mut Option<bool>>,
    ) -> Result<Option<Arc<Identity>>, Refusal> {
        let verifier = state.verifier.as_ref().ok_or(Refusal::AuthUnavailable)?;
        let header = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION);
        let token = bearer_token(header.map(|v| v.as_bytes())).ok_or(Refusal::MissingToken)?;
        ctx.verified_authorization = header.cloned();
        if let Some(cached) = cached {
            *cached = Some(verifier.knows(token));
        }
        let identity = match verifier.try_verify(token) {
            Ok(id) => id,
            // A key id the JWKS lacks, or no key set yet: let the background
            // service fetch (single-flight, rate-limited) and try once more.
            Err(VerifyError::UnknownKey | VerifyError::NoKeys) => {
                if let Some(jwks) = verifier.jwks() {
                    let start = Instant::now();
                    jwks.refetch_and_wait().await;
                    if let Some(t) = ctx.timings() {
                        t.stage("jwks fetch", start, Vec::new());
                    }
                }
                verifier.verify(token)?
            }
            Err(VerifyError::Refused(r)) => return Err(r),
        };
        let start = ctx.sampled().then(Instant::now);
        let stored = self.check_stored(state, &identity).await;
        let noted = stored.is_err() || stored_checked(state);
        if let (Some(t), Some(start), true) = (ctx.timings(), start, noted) {
            let outcome = match &stored {
                Ok(()) => "active",
                Err(r) => r.code(),
            };
            t.stage(
                "token store",
                start,
                vec![
                    KeyValue::new("db.system.name", "redis"),
                    KeyValue::new("tollgate.token_store.outcome", outcome),
                ],
            );
        }
        stored?;
        let path = ctx.target.split('?').next().unwrap_or_default();
        let lenient = &ctx.lenient_paths;
        if !identity.routes.allows(path) || lenient.iter().any(|p| !identity.routes.allows(p)) {
            return Err(Refusal::RouteForbidden);
        }
        Ok(Some(identity))
    }

    /// `require_stored`: the key must be stored in Redis and not blocked.
    /// Fails closed whatever `redis.on_failure` says: when the store cannot
    /// answer, only a token it confirmed within `store_cache` passes.
    async fn check_stored(&self, state: &State, identity: &Identity) -> Result<(), Refusal> {
        let Some(verifier) = state.verifier.as_ref().filter(|v| v.require_stored()) else {
            return Ok(());
        };
        let Some(redis) = state.redis.as_ref() else {
            return Ok(());
        };
        let status = self
            .tokens
            .status(redis, &identity.key, verifier.store_cache())
            .await;
        match status {
            Ok(Status::Active) => Ok(()),
            Ok(Status::Blocked) => Err(Refusal::KeyBlocked),
            Ok(Status::Missing) => Err(Refusal::TokenNotStored),
            Err(_) => Err(Refusal::TokenStoreUnavailable),
        }
    }

    /// `cost_from_response_header`: charge what the upstream says the request
    /// cost (a missing or malformed header leaves the route's cost charged).
    fn settle_reported_cost(&self, resp: &ResponseHeader, ctx: &Ctx) {
        let (Some(state), Some(route)) = (&ctx.state, ctx.route) else {
            return;
        };
        let settings = &state.config.routes[route];
        let Some(header) = &settings.cost_from_response_header else {
            return;
        };
        let reported = resp
            .headers
            .get(header)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let Some(actual) = reported {
            self.limiter
                .settle(&state.config.limits, &ctx.charges, settings.cost, actual);
        }
    }

    /// Rate limits: the caller's windows, its org's, then the rules'.
    async fn limit(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        state: &State,
        route: usize,
    ) -> Result<(), Refusal> {
        let limits = &state.config.limits;
        if ctx.identity.is_none() && limits.rules.is_empty() {
            // A route without a token and no rules: nothing to count.
            return Ok(());
        }
        let identity = ctx.identity.clone();
        let settings = &state.config.routes[route];
        let caller = caller(session, identity.as_deref(), state, settings);
        let scopes = ratelimit::scopes(limits, route, &caller);
        if scopes.is_empty() {
            return Ok(());
        }
        let start = ctx.sampled().then(Instant::now);
        let decision = self
            .limiter
            .check(limits, state.redis.as_ref(), &scopes, settings.cost)
            .await;
        if let (Some(t), Some(start)) = (ctx.timings(), start) {
            let mut attributes = vec![KeyValue::new(
                "tollgate.ratelimit.scopes",
                scopes.len() as i64,
            )];
            match &decision {
                Ok(Some(d)) => {
                    attributes.push(KeyValue::new("tollgate.ratelimit.decision", d.label()));
                    attributes.push(KeyValue::new("tollgate.ratelimit.source", d.source));
                    if let Some(policy) = d
                        .windows
                        .iter()
                        .find(|c| !c.outcome.allowed)
                        .and_then(|c| scopes.get(c.scope))
                    {
                        attributes.push(KeyValue::new(
                            "tollgate.ratelimit.policy",
                            policy.name.to_string(),
                        ));
                    }
                }
                Ok(None) => {}
                Err(r) => attributes.push(KeyValue::new("tollgate.error.code", r.code())),
            }
            t.stage("rate limit", start, attributes);
        }
        let Some(d) = decision? else {
            return Ok(());
        };
        metrics::count_ratelimit_decision(d.label(), d.source);
        if !limits.rules.is_empty() || !d.allowed || d.shadow_limited {
            count_by_rule_and_policy(&d, &scopes);
        }
        if d.allowed && settings.cost_from_response_header.is_some() {
            ctx.charges = d.charges(&scopes);
        }
        let reported = limit_headers::reported(&d, &scopes, ratelimit::now_us());
        ctx.extra_headers
            .extend(limit_headers::fields(limits.headers, &reported, d.closest));
        if d.allowed {
            Ok(())
        } else {
            Err(Refusal::RateLimited {
                message: d.message(),
                retry_after_secs: d.retry_after_secs,
            })
        }
    }

    /// `limits.concurrency`: a slot among the key's requests in flight.
    async fn in_flight(&self, ctx: &mut Ctx, state: &State) -> Result<(), Refusal> {
        let Some(identity) = &ctx.identity else {
            return Ok(());
        };
        let Some(limit) = concurrency::limit_of(&state.config.limits, identity.tier.as_deref())
        else {
            return Ok(());
        };
        let key = crate::ratelimit::key_id(&identity.key);
        let start = ctx.sampled().then(Instant::now);
        let slot = self
            .concurrency
            .acquire(state.redis.as_ref(), &key, limit, self.limiter.fleet())
            .await;
        if let (Some(t), Some(start)) = (ctx.timings(), start) {
            let mut attributes = vec![KeyValue::new("tollgate.concurrency.limit", limit as i64)];
            if let Err(r) = &slot {
                attributes.push(KeyValue::new("tollgate.error.code", r.code()));
            }
            t.stage("concurrency", start, attributes);
        }
        ctx.slot = Some(slot?);
        Ok(())
    }

    async fn refuse(&self, session: &mut Session, ctx: &mut Ctx, r: Refusal) -> Result<bool> {
        if matches!(r.status(), 401 | 403)
            || matches!(r, Refusal::AuthUnavailable | Refusal::TokenStoreUnavailable)
        {
            metrics::AUTH_FAILURES.with_label_values(&[r.code()]).inc();
        }
        respond::refuse(session, ctx, &r).await?;
        Ok(true)
    }
}

fn classify(e: &Error) -> Option<(Refusal, &'static str)> {
    use ErrorType::*;
    // The client's side failing (it went away mid-request) is no upstream
    // error, whatever its type.
    if e.esource() == &ErrorSource::Downstream {
        return None;
    }
    let kind = match e.etype() {
        ConnectTimedout => "connect_timeout",
        ReadTimedout | WriteTimedout => "read_timeout",
        ConnectRefused => "connect_refused",
        ConnectNoRoute | ConnectError | SocketError | BindError => "connect_error",
        ConnectionClosed => "reset",
        _ if e.esource() == &ErrorSource::Upstream => "protocol",
        _ => return None,
    };
    let refusal = match kind {
        "connect_timeout" | "read_timeout" => Refusal::UpstreamTimeout,
        _ => Refusal::UpstreamUnavailable,
    };
    Some((refusal, kind))
}

/// The status logged and counted for a request whose client went away
/// before its answer was written (nothing is sent).
const CLIENT_CLOSED: u16 = 499;

fn count_upstream_error(ctx: &Ctx, e: &Error) {
    if let Some((_, kind)) = classify(e) {
        metrics::UPSTREAM_ERRORS
            .with_label_values(&[ctx.upstream_name(), kind])
            .inc();
    }
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    /// No downstream modules: tollgate does not compress answers, and
    /// Pingora's default (a disabled compression module) still costs a
    /// per-request context and four filter calls.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> Ctx {
        Ctx {
            state: None,
            identity: None,
            upstream_token: None,
            start: Instant::now(),
            request_id: String::new(),
            route: None,
            label: "_unmatched",
            target: String::new(),
            lenient_paths: Vec::new(),
            tried: Vec::new(),
            status: 0,
            error: None,
            verified_authorization: None,
            websocket: false,
            slot: None,
            extra_headers: Vec::new(),
            grpc_refused: false,
            charges: Vec::new(),
            trace: None,
        }
    }

    async fn early_request_filter(&self, session: &mut Session, _ctx: &mut Ctx) -> Result<()> {
        // From here on, what is written is tollgate's answer (see `edge::head`).
        if let Some(stream) = session.as_downstream().stream() {
            crate::edge::head::HeadGuard::claim(stream);
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let state = self.state.load_full();
        ctx.state = Some(state.clone());
        ctx.start = Instant::now();
        if self.drain.draining() {
            session.set_keepalive(None);
        }
        ctx.request_id = client_request_id(session.req_header()).unwrap_or_else(new_request_id);

        if let Step::Answered = self.probes(session, ctx, &state).await? {
            return Ok(true);
        }
        if let Some(tracer) = &state.tracer {
            let peer = session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip());
            let proxies = &state.config.server.trusted_proxies;
            ctx.trace = Some(tracer.start(&session.req_header().headers, || {
                peer.is_some_and(|ip| forward::trusted(ip, proxies))
            }));
        }
        let route = match self.route(session, ctx, &state) {
            Ok(route) => route,
            Err(r) => return self.refuse(session, ctx, r).await,
        };
        ctx.route = Some(route);
        match request::upgrade(session.req_header()) {
            request::Upgrade::None => {}
            request::Upgrade::WebSocket if state.config.routes[route].websocket => {
                ctx.websocket = true;
            }
            request::Upgrade::WebSocket => {
                let r = Refusal::BadRequest("this route does not allow WebSocket".into());
                return self.refuse(session, ctx, r).await;
            }
            request::Upgrade::Other => {
                let r = Refusal::BadRequest(
                    "protocol upgrades other than WebSocket are not allowed".into(),
                );
                return self.refuse(session, ctx, r).await;
            }
        }
        match self.authenticate(session, ctx, &state, route).await {
            Ok(identity) => ctx.identity = identity,
            Err(r) => return self.refuse(session, ctx, r).await,
        }
        // Counted before any answer leaves, so a client that has its answer
        // knows the request is already in the next analytics batch.
        if let (Some(identity), Some(_)) = (&ctx.identity, &state.redis) {
            self.analytics.record(&identity.key);
        }
        // A slot first: a request refused for concurrency is never charged
        // to a window (and one refused by a window gives its slot back).
        if let Err(r) = self.in_flight(ctx, &state).await {
            return self.refuse(session, ctx, r).await;
        }
        if let Err(r) = self.limit(session, ctx, &state, route).await {
            return self.refuse(session, ctx, r).await;
        }
        if let Some(auth) = &state.config.routes[route].upstream_auth {
            match self.credentials.token_for(auth).await {
                Some(token) => ctx.upstream_token = Some(format!("Bearer {token}")),
                None => {
                    return self
                        .refuse(session, ctx, Refusal::UpstreamUnavailable)
                        .await
                }
            }
        }
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let Some(upstream) = ctx.upstream() else {
            return Error::e_explain(ErrorType::InternalError, "no route chosen");
        };
        let Some(peer) = upstream.select(&ctx.tried) else {
            return Error::e_explain(ErrorType::ConnectNoRoute, "no peer to try");
        };
        if let Some(addr) = pingora::upstreams::peer::Peer::address(&peer).as_inet() {
            ctx.tried.push(*addr);
        }
        if let Some(t) = ctx.timings() {
            t.upstream.get_or_insert_with(|| UpstreamTiming {
                start: Instant::now(),
                connected: None,
                reused: None,
                first_byte: None,
            });
        }
        Ok(Box::new(peer))
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(up) = ctx.timings().and_then(|t| t.upstream.as_mut()) {
            up.connected = Some(Instant::now());
            up.reused = Some(reused);
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        _upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(up) = ctx.timings().and_then(|t| t.upstream.as_mut()) {
            up.first_byte.get_or_insert_with(Instant::now);
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        count_upstream_error(ctx, &e);
        // One more attempt, on another peer, when there is one.
        let peers = ctx.upstream().map_or(0, |u| u.peer_count());
        if ctx.tried.len() < 2 && peers > ctx.tried.len() {
            e.set_retry(true);
        } else {
            e.set_retry(false);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        count_upstream_error(ctx, &e);
        // Pingora's own policy: retry only idempotent requests, and only when
        // the failure was on a reused (possibly stale) connection.
        let mut e = e.more_context(format!("Peer: {peer}"));
        if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        forward::upstream_request(req, ctx, peer, tls)
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.settle_reported_cost(resp, ctx);
        resp.insert_header(respond::REQUEST_ID, ctx.request_id.as_str())?;
        for (name, value) in ctx.extra_headers.drain(..) {
            resp.insert_header(name, value)?;
        }
        ctx.status = resp.status.as_u16();
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let refusal = match classify(e) {
            Some((refusal, kind)) => {
                ctx.error = Some(kind);
                Some(refusal)
            }
            None => match e.etype() {
                ErrorType::HTTPStatus(code) if (400..500).contains(code) => {
                    Some(Refusal::BadRequest("the request is malformed".into()))
                }
                _ if e.esource() == &ErrorSource::Downstream => {
                    match e.etype() {
                        // The client is gone: nobody to answer.
                        // (An HTTP/2 stream the client reset is an
                        // H2Error; a write timed out is `send_timeout`.)
                        ErrorType::ReadError
                        | ErrorType::WriteError
                        | ErrorType::ConnectionClosed
                        | ErrorType::H2Error
                        | ErrorType::ReadTimedout
                        | ErrorType::WriteTimedout => None,
                        _ => Some(Refusal::BadRequest("the request is malformed".into())),
                    }
                }
                _ => Some(Refusal::UpstreamUnavailable),
            },
        };
        let mut code = 0;
        if refusal.is_none() {
            // nginx's "client closed request": nobody to answer, no
            // upstream to blame.
            ctx.error = Some("client_closed");
            if e.etype() == &ErrorType::WriteTimedout {
                // An HTTP/2 stream whose client granted no window for
                // `server.send_timeout` (HTTP/1 is counted by `linger`).
                ctx.error = Some("send_timeout");
                metrics::SEND_TIMEOUTS.inc();
            }
            code = CLIENT_CLOSED;
        }
        if let Some(r) = refusal {
            code = r.status();
            if session.response_written().is_none() {
                if ctx.request_id.is_empty() {
                    ctx.request_id = new_request_id();
                }
                if let Err(err) = respond::refuse(session, ctx, &r).await {
                    log::debug!("cannot send error answer: {err}");
                }
            }
        }
        ctx.status = code;
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        // A gRPC refusal is HTTP 200 on the wire; alerts on 401/429/5xx
        // must still see it, so it counts as the status it stands for.
        let status = match session.response_written() {
            Some(r) if !ctx.grpc_refused => r.status.as_u16(),
            _ => ctx.status,
        };
        let timings = ctx.trace.as_mut().and_then(|t| t.timings.take());
        let route = ctx.route_name();
        let elapsed = ctx.start.elapsed();
        // Indexes of `metrics::PROTOCOLS`.
        let protocol = if ctx.websocket {
            3
        } else if respond::is_grpc(session) {
            2
        } else if session.as_downstream().is_http2() {
            1
        } else {
            0
        };
        let handles = ctx
            .state
            .as_deref()
            .zip(ctx.route)
            .and_then(|(state, i)| state.route_metrics.get(i));
        match handles {
            Some(m) => m.answered(status, protocol, elapsed.as_secs_f64()),
            None => metrics::answered_unrouted(route, status, protocol, elapsed.as_secs_f64()),
        }
        if let Some(timings) = timings {
            if let (Some(tracer), Some(trace)) = (
                ctx.state.as_ref().and_then(|s| s.tracer.as_ref()),
                &ctx.trace,
            ) {
                let server = server_span(session, ctx, status, route);
                tracer.submit(crate::trace::spans::build(trace, &timings, server));
            }
        }
        if !logging::access_enabled() {
            return;
        }
        let trace_id = ctx.trace.as_ref().map(|t| t.trace_id_hex());
        let req = session.req_header();
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_canonical().to_string())
            .unwrap_or_default();
        let upstream = ctx
            .tried
            .last()
            .map_or_else(|| "-".to_string(), |a| a.to_string());
        logging::access(&AccessRecord {
            request_id: &ctx.request_id,
            client: &client,
            method: req.method.as_str(),
            path: req.uri.path(),
            route,
            status,
            upstream: &upstream,
            duration_ms: elapsed.as_secs_f64() * 1000.0,
            bytes: session.body_bytes_sent(),
            error: ctx.error.unwrap_or("-"),
            trace_id: trace_id.as_deref().unwrap_or("-"),
        });
    }
}

/// A hashed api key: the same caller reads the same in every span, and the
/// key itself is in none.
fn key_hash(key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    crate::trace::context::trace_id_hex(&{
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        first
    })
}

/// Whether this config asks the token store on every request.
fn stored_checked(state: &State) -> bool {
    state.redis.is_some() && state.verifier.as_ref().is_some_and(|v| v.require_stored())
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn clipped(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// The server span's name and attributes (OpenTelemetry's HTTP server
/// conventions), from what the request ended with.
fn server_span(
    session: &Session,
    ctx: &Ctx,
    status: u16,
    route: &str,
) -> crate::trace::spans::Server {
    let req = session.req_header();
    let method = req.method.as_str();
    let mut a = Vec::with_capacity(14);
    a.push(KeyValue::new("http.request.method", method.to_string()));
    a.push(KeyValue::new("http.route", route.to_string()));
    if let Some(path) = ctx.target.split('?').next().filter(|p| !p.is_empty()) {
        a.push(KeyValue::new("url.path", clipped(path, 1024)));
    }
    let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    a.push(KeyValue::new(
        "url.scheme",
        if tls { "https" } else { "http" },
    ));
    a.push(KeyValue::new(
        "http.response.status_code",
        i64::from(status),
    ));
    let version = match req.version {
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        _ => "1.1",
    };
    a.push(KeyValue::new("network.protocol.version", version));
    if let Ok(Some(host)) = request::host(req) {
        a.push(KeyValue::new("server.address", clipped(host, 255)));
    }
    if let Some(peer) = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
    {
        let server = ctx.state.as_ref().map(|s| &s.config.server);
        let client = server.map_or(peer, |s| {
            forward::client_address(peer, req, &s.trusted_proxies, s.client_ip_header)
        });
        a.push(KeyValue::new("client.address", client.to_string()));
        a.push(KeyValue::new("network.peer.address", peer.to_string()));
    }
    if let Some(ua) = req
        .headers
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
    {
        a.push(KeyValue::new("user_agent.original", clipped(ua, 256)));
    }
    a.push(KeyValue::new("tollgate.request_id", ctx.request_id.clone()));
    if ctx.websocket {
        a.push(KeyValue::new("tollgate.websocket", true));
    }
    let mut upstream = Vec::new();
    if let Some(u) = ctx.upstream() {
        upstream.push(KeyValue::new("tollgate.upstream", u.settings.name.clone()));
    }
    if let Some(peer) = ctx.tried.last() {
        upstream.push(KeyValue::new("server.address", peer.ip().to_string()));
        upstream.push(KeyValue::new("server.port", i64::from(peer.port())));
        upstream.push(KeyValue::new(
            "tollgate.upstream.attempts",
            ctx.tried.len() as i64,
        ));
    }
    crate::trace::spans::Server {
        name: format!("{method} {route}"),
        attributes: a,
        status,
        error: ctx.error,
        upstream,
        upstream_failed: ctx.error.is_some() && status >= 500,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_32_hex_digits_and_differ() {
        let a = new_request_id();
        let b = new_request_id();
        assert_eq!(a.len(), 32);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
    }
}
