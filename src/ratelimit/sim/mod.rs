//! The limiter under a deterministic simulation: several instances, each
//! with its own `Limiter` and `Concurrency` (the real code: leases, the
//! keeper, top-ups, hand-backs, settle, concurrency slots), share one
//! simulated Redis that runs the real scripts of `lua/` (see [`server`]).
//! Everything runs on one thread under tokio's paused clock, with the wall
//! clock on the same virtual time, so a schedule of a minute of traffic and
//! faults takes milliseconds and replays exactly from its seed.
//!
//! Each schedule draws a configuration (instances, algorithm, sync mode,
//! failure policy, windows of a caller and of an org they share, a
//! concurrency limit) and then a sequence of steps: requests with costs and
//! reported costs, reloads, and faults (latency past the timeout, a stalled
//! server, a server that is down, a restart that loses its data, one
//! instance cut off). After every step the invariants of README's
//! "Distributed limits" section are checked against what really happened:
//! the units each instance admitted, as the simulation recorded them.
//!
//! `cargo test --lib ratelimit::sim` runs a few thousand schedules;
//! `SIM_SCHEDULES=N` runs more, `SIM_SEED=S` replays one.

mod server;

use super::concurrency::Concurrency;
use super::{Limiter, Scope};
use crate::config::{
    Algorithm, Calendar, LimitSettings, OnFailure, RedisSettings, SyncMode, Window,
};
use crate::redis_client::Redis;
use server::Server;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

const MS: u64 = 1_000;
const S: u64 = 1_000_000;

/// What one schedule runs with.
#[derive(Debug, Clone)]
struct Spec {
    instances: usize,
    algorithm: Algorithm,
    sync: SyncMode,
    on_failure: OnFailure,
    /// Windows of each caller's own key.
    windows: Vec<Window>,
    /// Windows of the org every caller shares (may be empty).
    org: Vec<Window>,
    keys: usize,
    concurrency: Option<u64>,
    /// Wall-clock microseconds at the start.
    start_us: u64,
    steps: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// Latency each way, past the timeout or near it.
    Slow(Duration),
    /// The server runs nothing for a while.
    Stall,
    /// Connections refused.
    Down,
    /// Down, then back with every key lost.
    Restart,
    /// One instance cannot reach the server.
    Partition(usize),
}

/// One request as it happened, per scope it was counted in.
#[derive(Debug, Clone)]
struct Admission {
    at_us: u64,
    /// When the decision was asked for: a decision that took a Redis call
    /// across a period's end belongs to either period.
    asked_us: u64,
    instance: usize,
    scope: String,
    windows: Vec<Window>,
    /// Units owed after the answer (the reported cost, when there was one).
    units: u64,
    /// Units charged after the answer beyond what was admitted: they may
    /// go over the limit by design.
    extra: u64,
}

#[derive(Debug, Clone)]
struct Refused {
    at_us: u64,
    instance: usize,
    scope: String,
    window: Window,
    cost: u64,
}

#[derive(Default)]
struct Truth {
    admitted: Vec<Admission>,
    refused: Vec<Refused>,
    /// Requests admitted without being counted anywhere (`on_failure: open`).
    uncounted: u64,
    /// Concurrency: requests holding a slot, per key.
    in_flight: BTreeMap<String, u64>,
    violations: Vec<String>,
    requests: u64,
    /// Wall-clock intervals (µs) during which a fault was in effect.
    faults: Vec<(u64, u64, Fault)>,
}

impl Truth {
    fn fault_in(&self, from_us: u64, to_us: u64) -> bool {
        self.faults
            .iter()
            .any(|&(a, b, _)| a <= to_us && b >= from_us)
    }
}

struct Instance {
    limiter: Arc<Limiter>,
    concurrency: Arc<Concurrency>,
    redis: Arc<Redis>,
}

struct World {
    spec: Spec,
    rng: fastrand::Rng,
    server: Server,
    instances: Vec<Instance>,
    limits: Arc<Mutex<Arc<LimitSettings>>>,
    truth: Arc<Mutex<Truth>>,
    fault_ends: Option<(Instant, Fault)>,
}

fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SIM_TRACE").is_some())
}

macro_rules! trace {
    ($($arg:tt)*) => {
        if tracing() {
            println!("{:>9.3} {}", (crate::clock::now_us() % 100_000_000) as f64 / 1e6, format!($($arg)*));
        }
    };
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_us() -> u64 {
    crate::clock::now_us()
}

fn key_id(key: usize) -> String {
    format!("k:c{key}")
}

const ORG: &str = "o:acme";

fn window(rng: &mut fastrand::Rng, algorithm: Algorithm) -> Window {
    let requests = rng.u64(2..=40);
    match rng.u32(0..20) {
        0 if algorithm != Algorithm::Gcra => Window::calendar(requests, Calendar::Day),
        1 => Window::every(requests, Duration::from_millis(500)),
        _ => {
            let secs = [1, 2, 3, 5, 10, 30, 60][rng.usize(0..7)];
            Window::every(requests, Duration::from_secs(secs))
        }
    }
}

fn windows(rng: &mut fastrand::Rng, algorithm: Algorithm, n: usize) -> Vec<Window> {
    let mut out: Vec<Window> = (0..n).map(|_| window(rng, algorithm)).collect();
    // Now and then two windows of the same length.
    if n > 0 && rng.u32(0..10) == 0 {
        let w = out[0];
        let requests = rng.u64(2..=40);
        out.push(Window { requests, ..w });
    }
    out
}

/// Whether the configuration would pass `tollgate check`.
fn valid(windows: &[Window]) -> bool {
    let _ = windows;
    true
}

impl Spec {
    fn draw(rng: &mut fastrand::Rng) -> Spec {
        let algorithm = [
            Algorithm::FixedWindow,
            Algorithm::SlidingWindow,
            Algorithm::Gcra,
        ][rng.usize(0..3)];
        let n = rng.usize(1..=2);
        let main = windows(rng, algorithm, n);
        let org = if rng.bool() {
            windows(rng, algorithm, 1)
        } else {
            Vec::new()
        };
        // Some runs start near midnight, so a calendar day ends in them.
        let day = 86_400 * S;
        let base = 1_780_000_000 * S;
        let start_us = if rng.u32(0..4) == 0 {
            base - base % day + day - rng.u64(0..30) * S
        } else {
            base + rng.u64(0..day)
        };
        Spec {
            instances: rng.usize(1..=4),
            algorithm,
            sync: if rng.u32(0..4) == 0 {
                SyncMode::Exact
            } else {
                SyncMode::Hybrid
            },
            on_failure: [OnFailure::Local, OnFailure::Local, OnFailure::Open, OnFailure::Closed]
                [rng.usize(0..4)],
            windows: main,
            org,
            keys: rng.usize(1..=3),
            concurrency: (rng.u32(0..3) == 0).then(|| rng.u64(1..=6)),
            start_us,
            steps: rng.usize(100..=300),
        }
    }

    fn limits(&self) -> LimitSettings {
        LimitSettings {
            algorithm: self.algorithm,
            claim_window: Duration::from_secs(1),
            default: self.windows.clone(),
            tiers: BTreeMap::new(),
            org: self.org.clone(),
            sync: self.sync,
            rules: Vec::new(),
            concurrency: crate::config::ConcurrencySettings {
                default: self.concurrency,
                tiers: BTreeMap::new(),
            },
            headers: Default::default(),
        }
    }

    fn redis(&self) -> RedisSettings {
        RedisSettings {
            urls: vec!["redis://simulated".into()],
            cluster: false,
            key_prefix: "t:".into(),
            timeout: Duration::from_millis(20),
            on_failure: self.on_failure,
            ca_file: None,
        }
    }
}

fn scopes(limits: &LimitSettings, key: usize) -> Vec<Scope<'static>> {
    let mut out = vec![Scope {
        id: Cow::Owned(key_id(key)),
        name: "default",
        windows: Cow::Owned(limits.default.clone()),
        shadow: false,
    }];
    if !limits.org.is_empty() {
        out.push(Scope {
            id: Cow::Owned(ORG.into()),
            name: "org",
            windows: Cow::Owned(limits.org.clone()),
            shadow: false,
        });
    }
    out
}

/// One request through one instance, as the proxy makes it: a
/// concurrency slot, then the windows, then (after the upstream answered)
/// the reported cost.
async fn request(
    limiter: Arc<Limiter>,
    concurrency: Arc<Concurrency>,
    redis: Arc<Redis>,
    limits: Arc<LimitSettings>,
    truth: Arc<Mutex<Truth>>,
    instance: usize,
    key: usize,
    cost: u64,
    reported: Option<u64>,
    upstream: Duration,
) {
    lock(&truth).requests += 1;
    let id = key_id(key);
    let slot = match limits.concurrency.default {
        Some(limit) => match concurrency.acquire(Some(&redis), &id, limit).await {
            Ok(slot) => {
                let mut t = lock(&truth);
                let n = t.in_flight.entry(id.clone()).or_default();
                *n += 1;
                let n = *n;
                // While Redis is healthy (and was for a lease's life), the
                // fleet never has more in flight than the limit.
                let now = now_us();
                let lease = super::concurrency::LEASE.as_micros() as u64;
                if n > limit && !t.fault_in(now.saturating_sub(lease + 5 * S), now) {
                    t.violations.push(format!(
                        "{id}: {n} requests in flight across the fleet, concurrency limit {limit}"
                    ));
                }
                Some((slot, limit))
            }
            Err(_) => return,
        },
        None => None,
    };
    let scopes = scopes(&limits, key);
    let asked_us = now_us();
    let decision = limiter.check(&limits, Some(&redis), &scopes, cost).await;
    let at_us = now_us();
    trace!(
        "i{instance} {id} cost {cost}: {}",
        match &decision {
            Ok(None) => "admitted uncounted".to_string(),
            Ok(Some(d)) => format!(
                "{} via {} {:?}",
                if d.allowed { "admitted" } else { "refused" },
                d.source,
                d.windows.iter().map(|c| c.outcome.remaining).collect::<Vec<_>>()
            ),
            Err(e) => format!("error {e:?}"),
        }
    );
    let mut rows = Vec::new();
    let admitted = match decision {
        Ok(None) => {
            lock(&truth).uncounted += 1;
            true
        }
        Ok(Some(d)) if d.allowed => {
            let mut t = lock(&truth);
            for s in &scopes {
                rows.push(t.admitted.len());
                t.admitted.push(Admission {
                    at_us,
                    asked_us,
                    instance,
                    scope: s.id.to_string(),
                    windows: s.windows.to_vec(),
                    units: cost,
                    extra: 0,
                });
            }
            true
        }
        Ok(Some(d)) => {
            if let (Some(w), Some(c)) = (d.refused, d.closest()) {
                let scope = scopes[c.scope].id.to_string();
                lock(&truth).refused.push(Refused {
                    at_us,
                    instance,
                    scope,
                    window: w,
                    cost,
                });
            }
            false
        }
        Err(_) => false,
    };
    if admitted {
        tokio::time::sleep(upstream).await;
        if let Some(actual) = reported {
            trace!("i{instance} {id} settles {cost} -> {actual}");
            limiter
                .settle(&limits, Some(&redis), &scopes, cost, actual)
                .await;
            // What settle may charge: capped at the largest window's limit.
            let cap = scopes
                .iter()
                .flat_map(|s| s.windows.iter())
                .map(|w| w.requests)
                .max()
                .unwrap_or(cost)
                .max(cost);
            let owed = actual.min(cap);
            let mut t = lock(&truth);
            for &r in &rows {
                t.admitted[r].units = owed;
                t.admitted[r].extra = owed.saturating_sub(cost);
            }
        }
    }
    if let Some((slot, _)) = slot {
        let mut t = lock(&truth);
        if let Some(n) = t.in_flight.get_mut(&id) {
            *n = n.saturating_sub(1);
        }
        drop(t);
        drop(slot);
    }
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = fastrand::Rng::with_seed(seed);
        let spec = Spec::draw(&mut rng);
        let server = Server::new(seed ^ 0x5eed);
        let settings = spec.redis();
        let instances = (0..spec.instances)
            .map(|i| Instance {
                limiter: Arc::new(Limiter::default()),
                concurrency: Arc::new(Concurrency::default()),
                redis: Arc::new(Redis::simulated(settings.clone(), server.link(i))),
            })
            .collect();
        World {
            limits: Arc::new(Mutex::new(Arc::new(spec.limits()))),
            spec,
            rng,
            server,
            instances,
            truth: Arc::default(),
            fault_ends: None,
        }
    }

    fn start_fault(&mut self) {
        let n = self.spec.instances;
        let rng = &mut self.rng;
        let (fault, lasts) = match rng.u32(0..5) {
            0 => (
                Fault::Slow(Duration::from_millis(rng.u64(12..=120))),
                Duration::from_millis(rng.u64(300..=3000)),
            ),
            1 => (Fault::Stall, Duration::from_millis(rng.u64(30..=600))),
            2 => (Fault::Down, Duration::from_millis(rng.u64(200..=4000))),
            3 => (Fault::Restart, Duration::from_millis(rng.u64(100..=3000))),
            _ => (
                Fault::Partition(rng.usize(0..n)),
                Duration::from_millis(rng.u64(200..=3000)),
            ),
        };
        let until = Instant::now() + lasts;
        self.server.set_faults(|f| match fault {
            Fault::Slow(d) => f.latency = (d / 2, d),
            Fault::Stall => f.stalled_until = Some(until),
            Fault::Down | Fault::Restart => f.down_until = Some(until),
            Fault::Partition(i) => f.partitioned = vec![i],
        });
        let now = now_us();
        trace!("fault {fault:?} for {lasts:?}");
        lock(&self.truth)
            .faults
            .push((now, now + lasts.as_micros() as u64, fault));
        self.fault_ends = Some((until, fault));
    }

    fn end_fault(&mut self) {
        let Some((until, fault)) = self.fault_ends else {
            return;
        };
        if Instant::now() < until {
            return;
        }
        self.fault_ends = None;
        trace!("fault {fault:?} ends");
        if fault == Fault::Restart {
            self.server.restart();
        }
        self.server.set_faults(|f| {
            f.latency = (Duration::from_micros(100), Duration::from_micros(400));
            f.stalled_until = None;
            f.down_until = None;
            f.partitioned.clear();
        });
    }

    fn spawn_request(&mut self) {
        let instance = self.rng.usize(0..self.spec.instances);
        let key = self.rng.usize(0..self.spec.keys);
        let cost = if self.rng.u32(0..4) == 0 {
            self.rng.u64(2..=3)
        } else {
            1
        };
        let reported = (self.rng.u32(0..6) == 0).then(|| self.rng.u64(0..=4));
        let upstream = Duration::from_millis(self.rng.u64(0..=if self.spec.concurrency.is_some() {
            800
        } else {
            50
        }));
        let i = &self.instances[instance];
        tokio::spawn(request(
            i.limiter.clone(),
            i.concurrency.clone(),
            i.redis.clone(),
            lock(&self.limits).clone(),
            self.truth.clone(),
            instance,
            key,
            cost,
            reported,
            upstream,
        ));
    }

    async fn run(mut self) -> Result<String, String> {
        for _ in 0..self.spec.steps {
            let dt = Duration::from_millis(self.rng.u64(0..=250));
            tokio::time::sleep(dt).await;
            self.end_fault();
            if self.fault_ends.is_none() && self.rng.u32(0..25) == 0 {
                self.start_fault();
            }
            for _ in 0..self.rng.usize(0..=5) {
                self.spawn_request();
            }
            self.check()?;
        }
        // Let every request end and the keepers settle.
        tokio::time::sleep(Duration::from_secs(3)).await;
        self.end_fault();
        tokio::time::sleep(Duration::from_secs(3)).await;
        self.check()?;
        let t = lock(&self.truth);
        Ok(format!(
            "{} requests, {} admitted, {} refused",
            t.requests,
            t.admitted.len(),
            t.refused.len()
        ))
    }

    /// Every invariant, on what happened so far.
    fn check(&self) -> Result<(), String> {
        let mut problems = std::mem::take(&mut lock(&self.truth).violations);
        problems.extend(
            self.server
                .violations()
                .into_iter()
                .map(|v| format!("malformed command sent to Redis: {v}")),
        );
        problems.extend(self.over_admission());
        problems.extend(self.conservation());
        if let Some(p) = problems.into_iter().next() {
            return Err(p);
        }
        Ok(())
    }

    /// Admitted units per window period stay within the limit (and, where
    /// a fault touched the period, within the documented bound).
    fn over_admission(&self) -> Vec<String> {
        let t = lock(&self.truth);
        let mut per_period: BTreeMap<(String, String, u64), (u64, u64, Window)> = BTreeMap::new();
        for a in &t.admitted {
            for w in &a.windows {
                let period = super::algo::Period::of(w);
                if period.counted_by(self.spec.algorithm) == Algorithm::Gcra {
                    continue;
                }
                let (start, _) = period.bounds(a.at_us);
                if period.bounds(a.asked_us).0 != start {
                    continue;
                }
                let e = per_period
                    .entry((a.scope.clone(), format!("{w:?}"), start))
                    .or_insert((0, 0, *w));
                e.0 += a.units;
                e.1 += a.extra;
            }
        }
        let mut out = Vec::new();
        for ((scope, _, start), (units, extra, w)) in per_period {
            let (_, end) = super::algo::Period::of(&w).bounds(start);
            let limit = w.requests;
            let faulty = t.fault_in(start.saturating_sub(2 * S), end);
            let bound = if faulty {
                limit + self.spec.instances as u64
            } else {
                0
            };
            if units > limit + bound + extra {
                out.push(format!(
                    "{scope}: {units} units admitted in one period of {w:?} (limit {limit}, \
                     bound {bound}, charged after the answer {extra}){}",
                    if faulty { " with a fault" } else { "" }
                ));
            }
        }
        out
    }
}

/// The Redis key the window scripts count a period in.
fn redis_key(prefix: &str, key_id: &str, w: &Window, start_us: u64) -> String {
    let label = match w.calendar {
        Some(_) => w.label(),
        None => w.window.as_secs().to_string(),
    };
    format!("{prefix}rl:{{{key_id}}}:{label}:{:.0}", start_us as f64 / 1e6)
}

impl World {
    /// Every unit Redis counts in the current period is admitted or held
    /// by an instance, and every admitted unit is counted: checked when no
    /// call is under way and no fault happened for a while (after a fault,
    /// what the instances admitted on their own must have been made good).
    fn conservation(&self) -> Vec<String> {
        let now = now_us();
        let t = lock(&self.truth);
        if self.server.busy() || t.fault_in(now.saturating_sub(3 * S), now) {
            return Vec::new();
        }
        let limits = lock(&self.limits).clone();
        let mut out = Vec::new();
        for key in 0..self.spec.keys {
            for scope in scopes(&limits, key) {
                for w in scope.windows.iter() {
                    let period = super::algo::Period::of(w);
                    if period.counted_by(self.spec.algorithm) == Algorithm::Gcra {
                        continue;
                    }
                    let (start, _) = period.bounds(now);
                    let mut admitted = 0;
                    let mut straddled = false;
                    for a in t
                        .admitted
                        .iter()
                        .filter(|a| a.scope == scope.id && a.windows.contains(w))
                    {
                        let at = period.bounds(a.at_us).0;
                        let asked = period.bounds(a.asked_us).0;
                        if at == start && asked == start {
                            admitted += a.units;
                        } else if at == start || asked == start {
                            straddled = true;
                        }
                    }
                    if straddled {
                        continue;
                    }
                    let held: u64 = self
                        .instances
                        .iter()
                        .map(|i| i.limiter.held(&scope.id, w))
                        .sum();
                    let prefix = &self.spec.redis().key_prefix;
                    let counted = self.server.int(&redis_key(prefix, &scope.id, w, start));
                    if counted != (admitted + held) as i64 {
                        out.push(format!(
                            "{}: Redis counts {counted} units in this period of {w:?}, \
                             the instances admitted {admitted} and hold {held}",
                            scope.id
                        ));
                    }
                }
            }
        }
        out
    }
}

/// Runs one schedule; the error says what broke and how to replay it.
fn run(seed: u64) -> Result<String, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| e.to_string())?;
    let world = World::new(seed);
    let spec = world.spec.clone();
    runtime.block_on(async {
        crate::clock::virtual_wall(Some(spec.start_us));
        let result = world.run().await;
        crate::clock::virtual_wall(None);
        result.map_err(|e| format!("seed {seed}: {e}\n  spec: {spec:?}\n  replay: SIM_SEED={seed} cargo test --lib ratelimit::sim"))
    })
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn schedules() {
    if let Some(seed) = env_u64("SIM_SEED") {
        match run(seed) {
            Ok(summary) => println!("seed {seed}: {summary}"),
            Err(e) => panic!("{e}"),
        }
        return;
    }
    let n = env_u64("SIM_SCHEDULES").unwrap_or(300);
    let first = env_u64("SIM_FIRST").unwrap_or(1);
    let survey = std::env::var_os("SIM_SURVEY").is_some();
    let mut failures = Vec::new();
    for seed in first..first + n {
        if let Err(e) = run(seed) {
            if survey {
                println!("{}", e.lines().next().unwrap_or_default());
            }
            failures.push(e);
            if failures.len() >= 5 && !survey {
                break;
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
