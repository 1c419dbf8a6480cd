//! Leases: each instance takes budget from Redis in chunks and admits
//! locally while it holds some. Redis counts leased units as used, so the
//! fleet can never admit more than the limit; chunks are a share of what is
//! still available, so they shrink to single units near the limit and
//! instances do not sit on budget others need. A key that Redis refused is
//! refused locally, with no Redis call, until its retry time. The
//! accounting itself is `lease.rs`; this module keeps the per-key state and
//! runs the calls.
//!
//! Lease size: a key's rate on this instance times a horizon that depends on
//! its headroom. Far from the limit (more than half of it available) the
//! horizon grows to the rest of the window, so a steady key costs about one
//! Redis call per window; nearer the limit it falls to two seconds, and the
//! `available / DIVISOR` share rule in the script shrinks chunks to single
//! units at the end.
//!
//! Calls that admit no request — top-ups, hand-backs, syncs — run on a
//! connection of their own (the namespace's `background` client), so their
//! failures never back off the request path. A keeper task (started by the
//! first acquire, one per process) registers the instance (the fleet's size
//! divides what each instance may admit while Redis is unreachable),
//! forgets keys whose leases have all ended, syncs keys whose last call
//! failed or that admitted on their own (so lost grants are found and what
//! was admitted without Redis gets counted), and hands back the leases of
//! keys this instance has not seen for `IDLE`.
//!
//! Leases belong to the Redis and algorithm they were taken under: a
//! reload that changes either hands them back there and starts afresh.
//!
//! `sync: exact` is the same path with chunks of exactly the request's cost:
//! one script call per admitted request.

use super::algo::Outcome;
use super::lease::{self, Ghost, Lease};
use super::packed::{PackedWindow, Slots};
use super::remote::{self, Ask, Grant};
use crate::cache::{KeyHasher, KeyMap};
use crate::clock::Instant;
use crate::config::{Algorithm, SyncMode, Window};
use crate::metrics;
use crate::redis_client::{Redis, Unavailable};
use arc_swap::ArcSwapOption;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

const SHARDS: usize = 64;
/// A lease takes this share of the available units...
const DIVISOR: u64 = 32;
/// ...but never more than this many (the share rule is the real bound).
const MAX_CHUNK: u64 = 1 << 40;
/// How often the keeper runs.
const KEEP_EVERY: Duration = Duration::from_secs(1);
/// A key this instance has not seen for this long hands its lease back.
/// The trade: a key whose requests come further apart than this pays a
/// hand-back and a new lease per request (when its lease is worth returning,
/// below), and budget can sit idle on an instance this long. A hand-back
/// names its period, so it never lands in the next one.
pub const IDLE: Duration = Duration::from_secs(5);
/// Leases smaller than 1/RETURN_SHARE of the limit are not worth a Redis
/// call to hand back (they end with their window): far from a large limit
/// (the common many-keys case) nothing is handed back.
const RETURN_SHARE: u64 = 256;
/// Background calls (syncs, hand-backs) per keeper round; the rest wait
/// for the next round, and a round stops at the first failure.
const CALLS_PER_ROUND: usize = 2000;
/// The instance registers every other round; an instance not seen for
/// this long no longer counts in the fleet.
const FLEET_TTL_MS: u64 = 10_000;
/// Keys kept when no `limits.max_keys` was given.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;
/// Leases dropped by reloads or evictions remembered at most (see
/// [`Ghost`]); beyond it a lease made again presumes what a fresh one
/// does. As many as fill a table of 32,768 slots: about 2 MiB.
const MAX_GHOSTS: usize = 28_672;
/// Hand-backs that failed kept for the keeper at most (an outage that
/// evicts many keys leaves one each; about 400 bytes apiece): beyond it
/// the newest are dropped, and what their leases admitted on their own is
/// not counted in Redis.
const MAX_UNRETURNED: usize = 65_536;

/// Where a dropped lease was (its namespace, key and counter), hashed with
/// the instance's random seed.
type GhostKey = u64;

/// Everything one instance knows about one key (no allocation of its own
/// beyond the key's name and, for several windows, the lease slice).
struct KeyState {
    held: Slots<Lease>,
    /// Last request for the key (µs since the epoch) in the low 62 bits;
    /// bit 63: a Redis call for this key is under way (requests that need
    /// budget wait for its answer instead of making their own); bit 62: the
    /// key owes Redis a call (its last call failed, or it admitted units
    /// Redis does not count yet).
    stamp: u64,
}

const BUSY: u64 = 1 << 63;
const SYNC: u64 = 1 << 62;
const TIME: u64 = SYNC - 1;

impl KeyState {
    fn new(now: u64) -> KeyState {
        KeyState {
            held: Slots::default(),
            stamp: now & TIME,
        }
    }

    fn last_used(&self) -> u64 {
        self.stamp & TIME
    }

    fn used_at(&mut self, now: u64) {
        self.stamp = (self.stamp & !TIME) | (now & TIME);
    }

    fn busy(&self) -> bool {
        self.stamp & BUSY != 0
    }

    /// How long ago the key was used, for eviction: a key owing a sync
    /// (a call that failed or timed out may have been granted in Redis
    /// unseen; its sync finds that) counts as newer than any other, so
    /// it goes last.
    fn eviction_age(&self) -> u64 {
        self.stamp & (SYNC | TIME)
    }

    fn set_busy(&mut self, busy: bool) {
        self.flag(BUSY, busy);
    }

    fn owes_sync(&self) -> bool {
        self.stamp & SYNC != 0
    }

    fn set_sync(&mut self, sync: bool) {
        self.flag(SYNC, sync);
    }

    fn flag(&mut self, bit: u64, on: bool) {
        if on {
            self.stamp |= bit;
        } else {
            self.stamp &= !bit;
        }
    }

    /// The leases line up with `windows` (a reload may change them during a call).
    fn matches(&self, windows: &[Window]) -> bool {
        let held = self.held.slice();
        held.len() == windows.len() && held.iter().zip(windows).all(|(l, w)| l.window.is(w))
    }

    /// An answer to `asks` (made for `windows`) is this key's own: the
    /// same windows and the very leases it was asked for. A lease made
    /// since (a reload, an eviction, a change of namespace) has another
    /// incarnation and never takes an answer meant for its predecessor.
    fn answers(&self, windows: &[Window], asks: &[Ask]) -> bool {
        self.matches(windows)
            && self
                .held
                .slice()
                .iter()
                .zip(asks)
                .all(|(l, a)| l.incarnation == a.incarnation)
    }
}

struct Shard {
    map: Mutex<KeyMap<Box<str>, KeyState>>,
    /// Woken when a key of this shard stops being busy.
    done: tokio::sync::Notify,
}

/// Calls that give back what dropped leases held and state their floors
/// (a key forgotten, a window a reload removed, a namespace left): made at
/// once, and by the keeper again until they succeed or their periods end.
struct Return {
    ns: Arc<Namespace>,
    key: String,
    windows: Vec<Window>,
    asks: Vec<Ask>,
    /// When the last of the leases ends (instance µs): no call after that.
    until: u64,
}

type Returns = Arc<Unreturned>;

/// Whether a hand-back call was made.
enum Made {
    Yes,
    No,
    /// It may have been (not to be made again).
    Maybe,
}

/// Hand-backs not made yet: those on their way, and those that failed
/// (for the keeper to make again; it keeps running while any is left,
/// even when every key is gone — an eviction or a reload during an
/// outage may leave nothing but them).
#[derive(Default)]
struct Unreturned {
    failed: Mutex<Vec<Return>>,
    sending: AtomicUsize,
}

impl Unreturned {
    /// A hand-back that failed, for the keeper to make again (up to
    /// [`MAX_UNRETURNED`]).
    fn keep(&self, r: Return) {
        let mut failed = lock(&self.failed);
        if failed.len() < MAX_UNRETURNED {
            failed.push(r);
        }
    }

    fn done(&self) -> bool {
        self.sending.load(Ordering::Acquire) == 0 && lock(&self.failed).is_empty()
    }
}

/// Where leases were taken: the Redis (its URL, key prefix) and algorithm.
struct Namespace {
    /// Its place ([`Namespace::same_place`]) as a number: leases dropped
    /// here are remembered under it.
    place: u64,
    redis: Arc<Redis>,
    /// A connection of its own for calls that admit no request.
    background: Arc<Redis>,
    algo: Algorithm,
}

impl Namespace {
    fn place_of(redis: &Redis, algo: Algorithm) -> u64 {
        use std::hash::{Hash, Hasher};
        let s = &redis.settings;
        let mut h = std::hash::DefaultHasher::new();
        (&s.urls, s.cluster, &s.key_prefix, algo as u8).hash(&mut h);
        h.finish()
    }

    fn same_place(&self, redis: &Redis, algo: Algorithm) -> bool {
        let (a, b) = (&self.redis.settings, &redis.settings);
        self.algo == algo
            && a.urls == b.urls
            && a.cluster == b.cluster
            && a.key_prefix == b.key_prefix
    }
}

struct Inner {
    shards: Box<[Shard]>,
    hasher: KeyHasher,
    epoch: Instant,
    /// Units per second each key uses on this instance.
    usage: super::rate::UsageRate,
    /// This instance's name in the ledgers and the fleet.
    instance: String,
    namespace: ArcSwapOption<Namespace>,
    switching: Mutex<()>,
    /// Instances sharing the Redis (1 until the first registration).
    fleet: AtomicU64,
    keeper_running: AtomicBool,
    /// Connections to Redis lost so far (a restart may have lost counts).
    reconnects_seen: AtomicU64,
    /// Keys kept per shard; beyond it the least recently used go.
    per_shard: AtomicUsize,
    /// Returns that failed, for the keeper to make again.
    unreturned: Returns,
    /// Itself, for the background calls it starts.
    me: Weak<Inner>,
    /// What leases dropped in their period knew, until the period ends.
    ghosts: Mutex<std::collections::HashMap<GhostKey, Ghost>>,
    /// `ghosts`' length, read without the lock on the request path.
    ghost_count: AtomicUsize,
    /// When full `ghosts` last made room.
    ghosts_purged: AtomicU64,
}

pub struct Leases {
    inner: Arc<Inner>,
}

impl Default for Leases {
    fn default() -> Self {
        let mut id = [0u8; 8];
        let _ = getrandom::fill(&mut id);
        Leases::new(format!(
            "{}-{:x}",
            std::process::id(),
            u64::from_le_bytes(id)
        ))
    }
}

/// A decision and how it was made.
pub struct Acquired {
    pub allowed: bool,
    pub outcomes: Vec<Outcome>,
    pub asked_redis: bool,
    /// The lease (its incarnation) and period each window was charged in.
    pub periods: Vec<(u32, u64)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Clears a key's busy flag and wakes its waiters, also when the call that
/// set it is dropped half-way (a client that went away).
struct Busy<'a> {
    shard: &'a Shard,
    key: &'a str,
}

/// A request's call of some of a key's leases (`busy`: the key was marked
/// busy for it, as in [`Busy`]): over when dropped.
struct Asking<'a> {
    shard: &'a Shard,
    key: &'a str,
    busy: bool,
    incarnations: Vec<u32>,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        if let Some(k) = lock(&self.shard.map).get_mut(self.key) {
            lease::answered(k.held.slice_mut(), &self.incarnations);
            if self.busy {
                k.set_busy(false);
            }
        }
        if self.busy {
            self.shard.done.notify_waiters();
        }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Some(k) = lock(&self.shard.map).get_mut(self.key) {
            k.set_busy(false);
        }
        self.shard.done.notify_waiters();
    }
}

enum Step {
    Done(Acquired),
    Wait,
    Ask {
        asks: Vec<Ask>,
        reserved: Vec<u64>,
        max_chunk: u64,
    },
}

/// Outcomes from an answer that found no state to apply to (the key's
/// windows changed during the call): the grant is not kept here, and the
/// key's next call finds it in the ledger.
fn bare_outcomes(asks: &[Ask], grants: &[Grant]) -> (bool, Vec<Outcome>) {
    let admitted = grants.iter().zip(asks).all(|(g, a)| g.granted >= a.need);
    let outcomes = grants
        .iter()
        .zip(asks)
        .map(|(g, a)| {
            let ok = admitted || g.available >= a.need;
            Outcome {
                allowed: ok,
                remaining: g.available,
                reset_us: g.reset_us,
                retry_us: if ok { 0 } else { g.retry_us },
            }
        })
        .collect();
    (admitted, outcomes)
}

impl Inner {
    fn now(&self) -> u64 {
        us(self.epoch.elapsed())
    }

    fn shard(&self, key_id: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(key_id) as usize) % SHARDS]
    }

    fn keys(&self) -> usize {
        self.shards.iter().map(|s| lock(&s.map).len()).sum()
    }

    /// The lease cap for the next call: the key's rate on this instance
    /// times the horizon of its tightest window.
    fn chunk_cap(&self, key_id: &str, leases: &[Lease], now: u64) -> u64 {
        let per_second = self.usage.rate(key_id, now);
        let horizon = leases
            .iter()
            .map(|l| lease::horizon_secs(l, now))
            .fold(f64::INFINITY, f64::min);
        let cap = per_second * horizon;
        let floor = lease::far_floor(leases);
        if cap.is_finite() {
            (cap as u64).clamp(floor, MAX_CHUNK)
        } else {
            floor
        }
    }

    /// Room for one more key in a full shard: the least recently used
    /// eighth goes (their unused leases are handed back).
    fn make_room(&self, map: &mut KeyMap<Box<str>, KeyState>) {
        let cap = self.per_shard.load(Ordering::Relaxed).max(1);
        if map.len() < cap {
            return;
        }
        let mut ages: Vec<u64> = map
            .values()
            .filter(|k| !k.busy())
            .map(KeyState::eviction_age)
            .collect();
        let go = (cap / 8).max(1).min(ages.len());
        if go == 0 {
            return;
        }
        let (_, cut, _) = ages.select_nth_unstable(go - 1);
        self.evict(map, *cut, |_, _, _| {});
    }

    /// Forgets the keys of `map` not in use since `cut`: their unused
    /// units go back, and what their live leases knew is remembered (a
    /// ghost each, as for a reload), so a key evicted while Redis cannot
    /// be reached does not come back to a fresh share of the limit.
    /// `seen` is shown each live lease of an evicted key, and whether it
    /// is handed back (else its units are left to end with their period:
    /// too few to be worth a call).
    fn evict(
        &self,
        map: &mut KeyMap<Box<str>, KeyState>,
        cut: u64,
        mut seen: impl FnMut(&str, &Lease, bool),
    ) {
        let before = map.len();
        let Some(ns) = self.namespace.load_full() else {
            map.retain(|_, k| k.busy() || k.eviction_age() > cut);
            metrics::RATELIMIT_KEYS_EVICTED.inc_by((before - map.len()) as u64);
            return;
        };
        let now = self.now();
        let mut returns = Vec::new();
        map.retain(|key, k| {
            if k.busy() || k.eviction_age() > cut {
                return true;
            }
            self.remember(ns.place, key, k.held.slice(), now);
            // Only leases worth a call (as idle ones, or owing units).
            let worth = |l: &Lease| l.budget().saturating_mul(RETURN_SHARE) >= l.window.requests;
            let live = |l: &&Lease| l.live(now);
            match returnable(&ns, key, k, now, worth) {
                Some(r) => {
                    k.held
                        .slice()
                        .iter()
                        .filter(live)
                        .for_each(|l| seen(key, l, true));
                    returns.push(r)
                }
                None => k
                    .held
                    .slice()
                    .iter()
                    .filter(live)
                    .for_each(|l| seen(key, l, false)),
            }
            false
        });
        metrics::RATELIMIT_KEYS_EVICTED.inc_by((before - map.len()) as u64);
        self.send_returns(returns);
    }

    /// Makes `returns` in the background; what fails waits in
    /// `unreturned` for the keeper.
    fn send_returns(&self, returns: Vec<Return>) {
        if returns.is_empty() {
            return;
        }
        let (Ok(runtime), Some(inner)) = (tokio::runtime::Handle::try_current(), self.me.upgrade())
        else {
            returns.into_iter().for_each(|r| self.unreturned.keep(r));
            return;
        };
        self.unreturned.sending.fetch_add(1, Ordering::AcqRel);
        runtime.spawn(async move {
            inner.make_returns(returns).await;
            inner.unreturned.sending.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// Makes `returns` in turn until one fails; what is left (and the one
    /// that failed, if it may be made again) waits for the keeper.
    async fn make_returns(&self, returns: Vec<Return>) {
        let mut failed = false;
        for r in returns {
            if !failed {
                match self.make_return(&r).await {
                    Made::Yes => continue,
                    Made::Maybe => {
                        failed = true;
                        continue;
                    }
                    Made::No => failed = true,
                }
            }
            self.unreturned.keep(r);
        }
    }

    /// Makes one hand-back. A call that failed is made again later when it
    /// never reached Redis or making it twice does no harm; a bare
    /// hand-back to a ledger that may have reached it (a timeout, a
    /// connection lost on the way) is not — made twice it would take its
    /// units off the ledger twice. Its units then stay counted for nobody
    /// (callers are refused them early; never admitted more).
    async fn make_return(&self, r: &Return) -> Made {
        match self.hand_back(r).await {
            Ok(grants) => {
                self.told(r, &grants);
                Made::Yes
            }
            Err(Unavailable::BackingOff) => Made::No,
            Err(_) if r.asks.iter().all(Ask::repeatable) => Made::No,
            Err(_) => Made::Maybe,
        }
    }

    async fn hand_back(&self, r: &Return) -> Result<Vec<Grant>, Unavailable> {
        let ns = &r.ns;
        remote::lease(
            &ns.background,
            ns.algo,
            &self.instance,
            &r.key,
            &r.windows,
            &r.asks,
            DIVISOR,
            0,
        )
        .await
    }

    /// What a hand-back's answer said was left in each window's period is
    /// kept for this instance's lease of the same counter in that period:
    /// the one it holds, or one made later (as a ghost). An instance that
    /// has to decide on its own in that period then presumes no more than
    /// Redis last told it, even when the answer came for a lease that is
    /// gone (a reload or an eviction near a period's end: the answer
    /// speaks of the next period). GCRA has no periods to speak of.
    fn told(&self, r: &Return, grants: &[Grant]) {
        if r.ns.algo == Algorithm::Gcra {
            return;
        }
        let now = self.now();
        let here = self
            .namespace
            .load()
            .as_ref()
            .is_some_and(|ns| ns.place == r.ns.place);
        for (w, g) in r.windows.iter().zip(grants) {
            if g.reset_us == 0 {
                continue;
            }
            if here {
                let mut map = lock(&self.shard(&r.key).map);
                if let Some(l) = map.get_mut(r.key.as_str()).and_then(|k| {
                    k.held
                        .slice_mut()
                        .iter_mut()
                        .find(|l| l.window.same_counter(w) && l.period == g.period && l.live(now))
                }) {
                    l.available = l.available.min(g.available);
                    continue;
                }
            }
            let told = Ghost {
                period: g.period,
                expires: now.saturating_add(g.reset_us),
                limit: w.requests,
                available: g.available,
                own: 0,
                over_until: 0,
                refused_cost: 0,
            };
            let at = self.ghost_key(r.ns.place, &r.key, PackedWindow::of(w).counter());
            let mut ghosts = lock(&self.ghosts);
            match ghosts.get_mut(&at) {
                Some(known) if known.period == g.period && known.limit == w.requests => {
                    known.available = known.available.min(g.available);
                }
                Some(known) if known.period < g.period => *known = told,
                Some(_) => {}
                None => {
                    if ghosts.len() < MAX_GHOSTS {
                        ghosts.insert(at, told);
                    }
                }
            }
            self.ghost_count.store(ghosts.len(), Ordering::Relaxed);
        }
    }

    /// Hands `units` back to the ledgers of leases this instance may no
    /// longer hold (each ask names its lease and period; see
    /// [`lease::give_back`]), in the background; what fails is made again
    /// by the keeper until the longest window's period could have ended.
    fn give_back(&self, ns: &Arc<Namespace>, key: &str, backs: Vec<(Window, Ask)>) {
        if backs.is_empty() {
            return;
        }
        let longest = backs
            .iter()
            .map(|(w, _)| super::algo::Period::of(w).length())
            .max()
            .unwrap_or(0);
        let (windows, asks) = backs.into_iter().unzip();
        let r = Return {
            ns: ns.clone(),
            key: key.to_string(),
            windows,
            asks,
            until: self.now().saturating_add(longest),
        };
        self.send_returns(vec![r]);
    }

    /// An answer to a call of `key` during which its leases changed: each
    /// window's part goes to the lease it was asked for if this instance
    /// still holds it, else back to that lease's ledger in Redis.
    #[allow(clippy::too_many_arguments)]
    fn late_answer(
        &self,
        ns: &Arc<Namespace>,
        k: Option<&mut KeyState>,
        key: &str,
        windows: &[Window],
        asks: &[Ask],
        reserved: &[u64],
        grants: &[Grant],
        admitted: bool,
    ) {
        let mut held = k.map(|k| k.held.slice_mut());
        let mut backs = Vec::new();
        for (i, (a, g)) in asks.iter().zip(grants).enumerate() {
            let r = reserved.get(i).copied().unwrap_or(0);
            let asked = windows.get(i);
            let mut units = lease::orphaned(a, r, g, admitted);
            if let Some(l) = held
                .as_deref_mut()
                .and_then(|h| h.iter_mut().find(|l| l.incarnation == a.incarnation))
            {
                if asked.is_some_and(|w| l.window.is(w)) {
                    if lease::apply_one(l, ns.algo, a, r, g, admitted) {
                        continue;
                    }
                } else if lease::admitted_late(l, a, r, g, admitted) {
                    // The lease's limit changed during the call: it keeps
                    // what the request admitted, the grant's surplus (taken
                    // under the old limit) goes back.
                    units = g.granted.saturating_sub(if admitted { a.need } else { 0 });
                }
            }
            if let (true, Some(w)) = (units > 0, windows.get(i)) {
                backs.push((*w, lease::give_back(g.period, units, a.incarnation)));
            }
        }
        self.give_back(ns, key, backs);
    }

    /// A call of `key` failed after its leases changed: the units it
    /// reserved go back to the leases they came from, or to their ledgers
    /// in Redis when the lease is gone (they were stated as admitted when
    /// it was handed back).
    fn late_failure(
        &self,
        ns: &Arc<Namespace>,
        k: Option<&mut KeyState>,
        key: &str,
        windows: &[Window],
        asks: &[Ask],
        reserved: &[u64],
    ) {
        let mut held = k.map(|k| k.held.slice_mut());
        let mut backs = Vec::new();
        for (i, a) in asks.iter().enumerate() {
            let r = reserved.get(i).copied().unwrap_or(0);
            if let Some(l) = held
                .as_deref_mut()
                .and_then(|h| h.iter_mut().find(|l| l.incarnation == a.incarnation))
            {
                if Some(l.period) == a.period {
                    l.consumed = l.consumed.saturating_sub(r);
                }
                l.unsure = true;
                continue;
            }
            if let (true, Some(w), Some(p)) = (r > 0, windows.get(i), a.period) {
                backs.push((*w, lease::give_back(p, r, a.incarnation)));
            }
        }
        self.give_back(ns, key, backs);
    }

    fn ghost_key(&self, place: u64, key: &str, counter: u64) -> GhostKey {
        self.hasher.hash_one((place, key, counter))
    }

    /// Remembers what live leases being dropped knew (a reload removed
    /// their window or left their namespace), for a lease of the same
    /// counter made again in their period.
    fn remember(&self, place: u64, key: &str, dropped: &[Lease], now: u64) {
        if !dropped.iter().any(|l| l.live(now)) {
            return;
        }
        let mut ghosts = lock(&self.ghosts);
        for l in dropped.iter().filter(|l| l.live(now)) {
            if ghosts.len() >= MAX_GHOSTS {
                // Ended ones make room (at most once a second: a reload
                // that drops a million keys' leases stays linear).
                let last = self.ghosts_purged.load(Ordering::Relaxed);
                if now.saturating_sub(last) >= us(KEEP_EVERY) {
                    self.ghosts_purged.store(now, Ordering::Relaxed);
                    ghosts.retain(|_, g| g.expires > now);
                }
                if ghosts.len() >= MAX_GHOSTS {
                    break;
                }
            }
            ghosts.insert(self.ghost_key(place, key, l.window.counter()), Ghost::of(l));
        }
        self.ghost_count.store(ghosts.len(), Ordering::Relaxed);
    }

    /// For a fresh lease of `key` in the namespace `place`: starts it from
    /// the ghost of its counter, if one was left in its period (and
    /// forgets the ghost: the lease carries on from it).
    fn recall(&self, place: u64, key: &str, l: &mut Lease, algo: Algorithm, now: u64) -> bool {
        if self.ghost_count.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let mut ghosts = lock(&self.ghosts);
        let Some(g) = ghosts.remove(&self.ghost_key(place, key, l.window.counter())) else {
            return false;
        };
        self.ghost_count.store(ghosts.len(), Ordering::Relaxed);
        drop(ghosts);
        g.haunt(l, algo, self.fleet.load(Ordering::Relaxed), now)
    }

    /// Forgets ghosts whose periods have ended.
    fn forget_ghosts(&self, now: u64) {
        if self.ghost_count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut ghosts = lock(&self.ghosts);
        ghosts.retain(|_, g| g.expires > now);
        if ghosts.capacity() > 4 * ghosts.len() + 64 {
            ghosts.shrink_to_fit();
        }
        self.ghost_count.store(ghosts.len(), Ordering::Relaxed);
    }

    /// Hands back the unused units of leases a realignment dropped (a
    /// reload removed their window), so Redis does not count them for an
    /// instance that no longer holds them.
    fn return_dropped(&self, ns: &Arc<Namespace>, key: &str, dropped: Vec<Lease>) {
        self.remember(ns.place, key, &dropped, self.now());
        let mut k = KeyState::new(0);
        k.held = Slots::from_vec(dropped);
        // Every live one: what it admitted must stay counted (its floor
        // is stated again, in case Redis lost it), what it holds goes back.
        if let Some(r) = returnable(ns, key, &mut k, self.now(), |l| {
            l.consumed > 0 || l.budget() > 0
        }) {
            self.send_returns(vec![r]);
        }
    }

    /// The keeper's round of returns that failed before.
    async fn retry_returns(&self) {
        let now = self.now();
        let pending: Vec<Return> = std::mem::take(&mut *lock(&self.unreturned.failed))
            .into_iter()
            .filter(|r| r.until > now)
            .collect();
        self.make_returns(pending).await;
    }

    /// A connection to Redis was lost (it may have restarted and lost its
    /// counts): every key states its floor again at its next call or sync,
    /// and what Redis refused before is asked again rather than refused
    /// from memory.
    fn sync_all(&self) {
        for shard in self.shards.iter() {
            for k in lock(&shard.map).values_mut() {
                if k.held
                    .slice()
                    .iter()
                    .any(|l| l.ledger > 0 || l.consumed > 0)
                {
                    k.set_sync(true);
                }
                for l in k.held.slice_mut() {
                    l.over_until = 0;
                }
            }
        }
    }

    /// Forgets keys that nobody is using and whose leases have all ended,
    /// and gives the memory back. One shard at a time, letting other tasks
    /// run in between: fixed windows all end at once, and freeing every key
    /// of a large instance in one go held its worker thread (bench/memory.py:
    /// 135,000 keys in 7 ms; now at most 0.15 ms per shard), delaying every
    /// request and lease answer on it.
    async fn sweep(&self) {
        self.forget_ghosts(self.now());
        for shard in self.shards.iter() {
            self.sweep_shard(shard);
            tokio::task::yield_now().await;
        }
    }

    fn sweep_shard(&self, shard: &Shard) {
        let now = self.now();
        let mut map = lock(&shard.map);
        let before = map.len();
        // A key that owes a sync stays even when its leases ended: a call
        // that timed out may still land in the next period, and the sync
        // finds it under the lease's name.
        map.retain(|_, k| {
            k.busy() || k.owes_sync() || k.held.slice().iter().any(|l| l.live(now) || l.over(now))
        });
        // Shrunk only well below capacity, so a map that empties and
        // fills again with each window does not reallocate every time.
        if map.len() < before && map.capacity() > 4 * map.len() + 64 {
            map.shrink_to_fit();
        }
    }

    /// One keeper round of calls that admit no request: keys that owe a
    /// sync, and idle keys whose leases are worth handing back. Each key is
    /// busy while its call runs, so it never races a request's call.
    async fn background_calls(&self, ns: &Arc<Namespace>, idle: Duration, stopping: bool) -> usize {
        let now = self.now();
        let idle = us(idle);
        let mut calls = Vec::new();
        for shard in self.shards.iter() {
            let mut map = lock(&shard.map);
            for (key, k) in map.iter_mut() {
                if calls.len() >= CALLS_PER_ROUND {
                    break;
                }
                if k.busy() {
                    continue;
                }
                let idle_key = stopping || now.saturating_sub(k.last_used()) >= idle;
                let worth = |l: &Lease| {
                    l.live(now)
                        && (stopping
                            || l.budget().saturating_mul(RETURN_SHARE) >= l.window.requests)
                };
                let hand_back =
                    idle_key && k.held.slice().iter().any(|l| l.budget() > 0 && worth(l));
                if !hand_back && !k.owes_sync() {
                    continue;
                }
                let windows: Vec<Window> =
                    k.held.slice().iter().map(|l| l.window.window()).collect();
                let asks: Vec<Ask> = k
                    .held
                    .slice_mut()
                    .iter_mut()
                    .map(|l| {
                        if stopping && l.unsure {
                            lease::hand_back_last(l, ns.algo)
                        } else if hand_back && l.budget() > 0 && worth(l) {
                            lease::hand_back(l, ns.algo)
                        } else {
                            l.sync_once(ns.algo)
                        }
                    })
                    .collect();
                k.set_busy(true);
                calls.push((key.to_string(), windows, asks));
            }
        }
        let mut made = 0;
        let mut failed = false;
        for (key, windows, asks) in calls {
            let shard = self.shard(&key);
            let _busy = Busy { shard, key: &key };
            let answer = if failed {
                Err(Unavailable::BackingOff)
            } else {
                let sent = self.now();
                remote::lease(
                    &ns.background,
                    ns.algo,
                    &self.instance,
                    &key,
                    &windows,
                    &asks,
                    DIVISOR,
                    0,
                )
                .await
                .map(|g| (g, sent))
            };
            let mut map = lock(&shard.map);
            let Some(k) = map.get_mut(key.as_str()) else {
                continue;
            };
            match answer {
                Ok((grants, sent)) if k.answers(&windows, &asks) => {
                    let zeros = vec![0; asks.len()];
                    lease::apply(
                        k.held.slice_mut(),
                        ns.algo,
                        &asks,
                        &zeros,
                        &grants,
                        sent,
                        self.now(),
                        true,
                    );
                    let owes = owes(k);
                    k.set_sync(owes);
                    made += 1;
                }
                Ok((grants, _)) => {
                    // A call that admits no request: what it granted to a
                    // lease that changed meanwhile goes back.
                    let none = vec![0; asks.len()];
                    self.late_answer(ns, Some(k), &key, &windows, &asks, &none, &grants, true);
                }
                Err(_) => {
                    failed = true;
                    k.set_sync(true);
                }
            }
        }
        made
    }
}

/// The windows and hand-back calls of a key about to be forgotten (evicted
/// or at a stop): its unused units go back, its floor is stated.
fn returnable(
    ns: &Arc<Namespace>,
    key: &str,
    k: &mut KeyState,
    now: u64,
    worth: impl Fn(&Lease) -> bool,
) -> Option<Return> {
    let owes = k
        .held
        .slice()
        .iter()
        .any(|l| l.live(now) && (worth(l) || l.pending() > 0 || l.unsure));
    if !owes {
        return None;
    }
    let windows = k.held.slice().iter().map(|l| l.window.window()).collect();
    let until = k
        .held
        .slice()
        .iter()
        .map(|l| l.expires)
        .max()
        .unwrap_or(now);
    let asks = k
        .held
        .slice_mut()
        .iter_mut()
        .map(|l| lease::hand_back_last(l, ns.algo))
        .collect();
    Some(Return {
        ns: ns.clone(),
        key: key.to_string(),
        windows,
        asks,
        until,
    })
}

impl Leases {
    pub fn new(instance: String) -> Leases {
        Leases {
            inner: Arc::new_cyclic(|me| Inner {
                me: me.clone(),
                shards: (0..SHARDS)
                    .map(|_| Shard {
                        map: Mutex::new(KeyMap::default()),
                        done: tokio::sync::Notify::new(),
                    })
                    .collect(),
                hasher: KeyHasher::default(),
                epoch: Instant::now(),
                usage: Default::default(),
                instance,
                namespace: ArcSwapOption::empty(),
                switching: Mutex::new(()),
                fleet: AtomicU64::new(1),
                keeper_running: AtomicBool::new(false),
                reconnects_seen: AtomicU64::new(0),
                per_shard: AtomicUsize::new(DEFAULT_MAX_KEYS.div_ceil(SHARDS)),
                unreturned: Arc::default(),
                ghosts: Mutex::default(),
                ghost_count: AtomicUsize::new(0),
                ghosts_purged: AtomicU64::new(0),
            }),
        }
    }

    /// `limits.max_keys`: keys kept by this instance.
    pub fn set_max_keys(&self, max_keys: usize) {
        self.inner
            .per_shard
            .store(max_keys.div_ceil(SHARDS).max(1), Ordering::Relaxed);
    }

    /// This instance's name in the ledgers and the fleet.
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    /// Instances sharing the Redis, as the last registration counted.
    pub fn fleet(&self) -> u64 {
        self.inner.fleet.load(Ordering::Relaxed).max(1)
    }

    /// The namespace of this call; a changed one hands every lease back to
    /// the old one and starts afresh.
    fn namespace(&self, redis: &Arc<Redis>, algo: Algorithm) -> Arc<Namespace> {
        let inner = &*self.inner;
        if let Some(ns) = &*inner.namespace.load() {
            if Arc::ptr_eq(&ns.redis, redis) && ns.algo == algo {
                return ns.clone();
            }
        }
        let _switching = lock(&inner.switching);
        let current = inner.namespace.load_full();
        if let Some(ns) = &current {
            if Arc::ptr_eq(&ns.redis, redis) && ns.algo == algo {
                return ns.clone();
            }
            // A request still running on the config before a reload: it is
            // counted where the leases are now, never moves them back.
            if redis.generation() < ns.redis.generation() {
                return ns.clone();
            }
        }
        let background = match &current {
            Some(ns) if ns.redis.same_as(redis) => ns.background.clone(),
            _ => Arc::new(redis.detached()),
        };
        let fresh = Arc::new(Namespace {
            place: Namespace::place_of(redis, algo),
            redis: redis.clone(),
            background,
            algo,
        });
        if let Some(old) = current.filter(|ns| !ns.same_place(redis, algo)) {
            self.leave(old);
        }
        inner.namespace.store(Some(fresh.clone()));
        fresh
    }

    /// Hands every lease back to the namespace it was taken in and forgets
    /// every key.
    fn leave(&self, old: Arc<Namespace>) {
        let inner = &*self.inner;
        let now = inner.now();
        let mut returns = Vec::new();
        for shard in inner.shards.iter() {
            let mut map = lock(&shard.map);
            for (key, k) in map.iter_mut() {
                inner.remember(old.place, key, k.held.slice(), now);
                if let Some(r) = returnable(&old, key, k, now, |l| l.budget() > 0) {
                    returns.push(r);
                }
            }
            map.clear();
        }
        inner.send_returns(returns);
    }

    pub async fn acquire(
        &self,
        redis: &Arc<Redis>,
        algo: Algorithm,
        sync: SyncMode,
        key_id: &str,
        windows: &[Window],
        cost: u64,
    ) -> Result<Acquired, Unavailable> {
        let inner = &*self.inner;
        inner.usage.observe(key_id, cost, inner.now());
        let shard = inner.shard(key_id);
        let hybrid = sync == SyncMode::Hybrid;
        // Waits are capped so a lost wake-up can only cost time, never hang.
        let wait_cap = redis.settings.timeout + Duration::from_millis(50);
        let (ns, asks, reserved, max_chunk) = loop {
            // Again after every wait: a reload may have moved the leases.
            let ns = self.namespace(redis, algo);
            let done = shard.done.notified();
            tokio::pin!(done);
            let step = self.try_local(
                shard, &ns, ns.algo, hybrid, key_id, windows, cost, &mut done,
            );
            // After the key is in the map, so a keeper that is stopping sees it.
            self.keep();
            match step {
                Step::Done(a) => return Ok(a),
                Step::Wait => {
                    let _ = tokio::time::timeout(wait_cap, done).await;
                }
                Step::Ask {
                    asks,
                    reserved,
                    max_chunk,
                } => break (ns, asks, reserved, max_chunk),
            }
        };
        // The namespace's Redis and algorithm (a request of an older config
        // is counted under the current one).
        let (redis, algo) = (&ns.redis, ns.algo);
        let _asking = Asking {
            shard,
            key: key_id,
            busy: hybrid,
            incarnations: asks.iter().map(|a| a.incarnation).collect(),
        };
        let divisor = if hybrid { DIVISOR } else { u64::MAX / 2 };
        let sent = inner.now();
        let answer = remote::lease(
            redis,
            algo,
            &inner.instance,
            key_id,
            windows,
            &asks,
            divisor,
            max_chunk,
        )
        .await;
        let mut map = lock(&shard.map);
        let now = inner.now();
        let state = map.get_mut(key_id).filter(|k| k.answers(windows, &asks));
        match (answer, state) {
            (Ok(grants), Some(k)) => {
                let (allowed, outcomes) = lease::apply(
                    k.held.slice_mut(),
                    algo,
                    &asks,
                    &reserved,
                    &grants,
                    sent,
                    now,
                    false,
                );
                // A cost reported while the call was on its way is counted
                // right after it.
                let owes = owes(k);
                k.set_sync(owes);
                if owes {
                    spawn_top_up(
                        self.inner.clone(),
                        ns.clone(),
                        key_id.to_string(),
                        windows.to_vec(),
                        0,
                        false,
                    );
                }
                Ok(Acquired {
                    allowed,
                    outcomes,
                    asked_redis: true,
                    periods: k
                        .held
                        .slice()
                        .iter()
                        .map(|l| (l.incarnation, l.period))
                        .collect(),
                })
            }
            (Ok(grants), None) => {
                // The key's leases changed during the call (a reload, an
                // eviction, a change of namespace): the answer goes to the
                // leases it was asked for, or back to their ledgers.
                let (allowed, outcomes) = bare_outcomes(&asks, &grants);
                inner.late_answer(
                    &ns,
                    map.get_mut(key_id),
                    key_id,
                    windows,
                    &asks,
                    &reserved,
                    &grants,
                    allowed,
                );
                if let Some(k) = map.get_mut(key_id) {
                    k.set_sync(true);
                }
                Ok(Acquired {
                    allowed,
                    outcomes,
                    asked_redis: true,
                    // A refund finds the lease, or its ledger in Redis.
                    periods: asks
                        .iter()
                        .zip(&grants)
                        .map(|(a, g)| (a.incarnation, g.period))
                        .collect(),
                })
            }
            (Err(e), state) => {
                // What the call did is unknown: the reserved units go back,
                // and the key syncs once Redis answers again.
                match state {
                    Some(k) => lease::undo(k.held.slice_mut(), &reserved),
                    None => inner.late_failure(
                        &ns,
                        map.get_mut(key_id),
                        key_id,
                        windows,
                        &asks,
                        &reserved,
                    ),
                }
                if let Some(k) = map.get_mut(key_id) {
                    k.set_sync(true);
                }
                Err(e)
            }
        }
    }

    /// The part of `acquire` under the shard lock: a local decision, a wait
    /// for the key's call under way, or what to ask Redis for.
    #[allow(clippy::too_many_arguments)]
    fn try_local(
        &self,
        shard: &Shard,
        ns: &Arc<Namespace>,
        algo: Algorithm,
        hybrid: bool,
        key_id: &str,
        windows: &[Window],
        cost: u64,
        done: &mut std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
    ) -> Step {
        let inner = &*self.inner;
        let mut map = lock(&shard.map);
        let now = inner.now();
        if !map.contains_key(key_id) {
            inner.make_room(&mut map);
            map.insert(key_id.into(), KeyState::new(now));
        }
        let Some(state) = map.get_mut(key_id) else {
            return Step::Wait;
        };
        state.used_at(now);
        let dropped = lease::align(
            &mut state.held,
            windows,
            algo,
            now,
            crate::clock::now_us(),
            |l| inner.recall(ns.place, key_id, l, algo, now),
        );
        if !dropped.is_empty() {
            inner.return_dropped(ns, key_id, dropped);
        }
        if state.held.slice().iter().any(|l| l.returning) {
            // A budget to hand back: the keeper makes the call if no
            // request does.
            state.set_sync(true);
        }
        let busy = state.busy();
        if let Some((allowed, outcomes)) = lease::local(state.held.slice_mut(), cost, now) {
            if allowed && hybrid && !busy && lease::needs_top_up(state.held.slice()) {
                state.set_busy(true);
                let cap = inner.chunk_cap(key_id, state.held.slice(), now);
                spawn_top_up(
                    self.inner.clone(),
                    ns.clone(),
                    key_id.to_string(),
                    windows.to_vec(),
                    cap,
                    true,
                );
            }
            return Step::Done(Acquired {
                allowed,
                periods: state
                    .held
                    .slice()
                    .iter()
                    .map(|l| (l.incarnation, l.period))
                    .collect(),
                outcomes,
                asked_redis: false,
            });
        }
        if hybrid && busy {
            // Registered before the lock is let go: the wake-up cannot be missed.
            done.as_mut().enable();
            return Step::Wait;
        }
        let (asks, reserved) = lease::ask(state.held.slice_mut(), algo, cost);
        let max_chunk = if hybrid {
            state.set_busy(true);
            inner.chunk_cap(key_id, state.held.slice(), now)
        } else {
            0
        };
        Step::Ask {
            asks,
            reserved,
            max_chunk,
        }
    }

    /// Redis could not be reached (`on_failure: local`): this instance's
    /// own decision from what it holds and its share of what was left.
    pub fn fallback(
        &self,
        algo: Algorithm,
        key_id: &str,
        windows: &[Window],
        cost: u64,
    ) -> Acquired {
        let inner = &*self.inner;
        let shard = inner.shard(key_id);
        let mut map = lock(&shard.map);
        let now = inner.now();
        if !map.contains_key(key_id) {
            inner.make_room(&mut map);
            map.insert(key_id.into(), KeyState::new(now));
        }
        let fleet = self.fleet();
        let Some(k) = map.get_mut(key_id) else {
            return Acquired {
                allowed: false,
                outcomes: Vec::new(),
                asked_redis: false,
                periods: Vec::new(),
            };
        };
        k.used_at(now);
        let ns = inner.namespace.load_full();
        let place = ns.as_ref().map(|ns| ns.place);
        let dropped = lease::align(
            &mut k.held,
            windows,
            algo,
            now,
            crate::clock::now_us(),
            |l| place.is_some_and(|p| inner.recall(p, key_id, l, algo, now)),
        );
        if let (false, Some(ns)) = (dropped.is_empty(), ns) {
            inner.return_dropped(&ns, key_id, dropped);
        }
        if k.held.slice().iter().any(|l| l.returning) {
            k.set_sync(true);
        }
        let (allowed, outcomes) = lease::fallback(k.held.slice_mut(), cost, fleet, now);
        if allowed {
            k.set_sync(true);
        }
        metrics::RATELIMIT_FALLBACK
            .with_label_values(&[if allowed { "allowed" } else { "limited" }])
            .inc();
        Acquired {
            allowed,
            outcomes,
            asked_redis: false,
            periods: k
                .held
                .slice()
                .iter()
                .map(|l| (l.incarnation, l.period))
                .collect(),
        }
    }

    /// Gives back `units` charged to `window` of `key_id` in `period`, by
    /// the lease `incarnation` (a lease made since, in another namespace
    /// or after the window was dropped, never gets them).
    /// A lease that is gone (a reload replaced it, its key was forgotten)
    /// gets them back in its ledger in Redis: its hand-back stated them as
    /// admitted.
    pub fn refund(&self, key_id: &str, window: &Window, units: u64, incarnation: u32, period: u64) {
        let inner = &*self.inner;
        let mut map = lock(&inner.shard(key_id).map);
        let now = inner.now();
        if let Some(l) = map.get_mut(key_id).and_then(|k| {
            k.held
                .slice_mut()
                .iter_mut()
                .find(|l| l.incarnation == incarnation)
        }) {
            lease::refund(l, units, period, now);
            return;
        }
        drop(map);
        // In the namespace the leases are in now: a lease of another one
        // has no ledger there, and Redis never takes more than a ledger
        // counts.
        // GCRA keeps no ledger to bound a hand-back: a refund for a lease
        // that is gone is dropped (a bucket of a new key prefix would take it).
        if let (Some(ns), true) = (inner.namespace.load_full(), units > 0) {
            if ns.algo == crate::config::Algorithm::Gcra {
                return;
            }
            let back = lease::give_back(period, units, incarnation);
            inner.give_back(&ns, key_id, vec![(*window, back)]);
        }
    }

    /// Charges units reported after the answer, in the window's current
    /// period (a later one than the request's, if that ended meanwhile);
    /// what the budget does not cover is counted in Redis right away (in
    /// the background).
    pub fn extra(&self, key_id: &str, window: &Window, units: u64) {
        let inner = &*self.inner;
        // Where the key's leases are: after a reload that moved the key
        // prefix, the old namespace until this instance's next request
        // moves them (then nothing is left to charge).
        let Some(ns) = inner.namespace.load_full() else {
            return;
        };
        let shard = inner.shard(key_id);
        let mut map = lock(&shard.map);
        let now = inner.now();
        // Charged only where the key still holds the window: a key that
        // holds other windows now was realigned by a reload that removed or
        // changed this one, and a key forgotten meanwhile (evicted) has no
        // count left to add to (realigning or recreating it would also void
        // the answer of a call the key may have under way).
        let Some(k) = map.get_mut(key_id) else {
            return;
        };
        if !k.held.slice().iter().any(|l| l.window.same_counter(window)) {
            return;
        }
        // A lease whose period ended is followed as a request's would be
        // (same windows: a call under way keeps its answer).
        if k.held.slice().iter().any(|l| !l.live(now)) {
            let windows: Vec<Window> = k.held.slice().iter().map(|l| l.window.window()).collect();
            let dropped = lease::align(
                &mut k.held,
                &windows,
                ns.algo,
                now,
                crate::clock::now_us(),
                |_| false,
            );
            inner.return_dropped(&ns, key_id, dropped);
        }
        let Some(l) = k
            .held
            .slice_mut()
            .iter_mut()
            .find(|l| l.window.same_counter(window))
        else {
            return;
        };
        if !lease::extra(l, units, now) {
            return;
        }
        k.set_sync(true);
        let windows = k.held.slice().iter().map(|l| l.window.window()).collect();
        spawn_top_up(
            self.inner.clone(),
            ns,
            key_id.to_string(),
            windows,
            0,
            false,
        );
    }

    /// Remembers that a keeper is needed and starts it.
    fn keep(&self) {
        let inner = &*self.inner;
        if !inner.keeper_running.load(Ordering::Acquire)
            && !inner.keeper_running.swap(true, Ordering::AcqRel)
        {
            spawn_keeper(Arc::downgrade(&self.inner));
        }
    }

    /// At a stop: hands every unused unit back and counts what this
    /// instance admitted on its own, so the fleet can use the rest.
    /// Returns the number of calls made.
    pub async fn return_all(&self) -> usize {
        let Some(ns) = self.inner.namespace.load_full() else {
            return 0;
        };
        let mut made = 0;
        // Rounds until every key is done (each round takes at most
        // CALLS_PER_ROUND keys and stops at the first failure).
        loop {
            let n = self.inner.background_calls(&ns, Duration::ZERO, true).await;
            made += n;
            if n < CALLS_PER_ROUND {
                return made;
            }
        }
    }

    pub fn keys(&self) -> usize {
        self.inner.keys()
    }

    /// This instance's admitted units in `window`'s current period (the
    /// quota view adds them to what the others reported).
    pub fn consumed(&self, key_id: &str, window: &Window) -> u64 {
        let inner = &*self.inner;
        let now = inner.now();
        let map = lock(&inner.shard(key_id).map);
        map.get(key_id)
            .and_then(|k| {
                k.held
                    .slice()
                    .iter()
                    .find(|l| l.window.same_counter(window) && l.live(now))
            })
            .map_or(0, |l| l.consumed)
    }

    /// Evicts every key not in use now, as a full shard would; returns
    /// the live leases of the keys evicted, with their key prefix and key,
    /// and whether each was handed back (tests).
    #[cfg(test)]
    pub fn evict_idle(&self) -> Vec<(String, String, Lease, bool)> {
        let prefix = self.namespace_prefix().unwrap_or_default();
        let mut out = Vec::new();
        for shard in self.inner.shards.iter() {
            self.inner
                .evict(&mut lock(&shard.map), u64::MAX, |key, l, back| {
                    out.push((prefix.clone(), key.to_string(), *l, back))
                });
        }
        out
    }

    /// The lease of `window` of `key_id`, as this instance keeps it (tests).
    #[cfg(test)]
    pub fn lease_of(&self, key_id: &str, window: &Window) -> Option<Lease> {
        let map = lock(&self.inner.shard(key_id).map);
        map.get(key_id).and_then(|k| {
            k.held
                .slice()
                .iter()
                .find(|l| l.window.same_counter(window))
                .copied()
        })
    }

    /// The key prefix of the namespace the leases are in (tests).
    #[cfg(test)]
    pub fn namespace_prefix(&self) -> Option<String> {
        self.inner
            .namespace
            .load()
            .as_ref()
            .map(|ns| ns.redis.prefix().to_string())
    }

    /// Unused units this instance holds for `window` of `key_id` in the
    /// period that starts at `period` (tests; a lease may end a little
    /// before its period: it holds the units, unused, until the period ends).
    #[cfg(test)]
    pub fn held(&self, prefix: &str, key_id: &str, window: &Window, period: u64) -> u64 {
        let inner = &*self.inner;
        if inner
            .namespace
            .load()
            .as_ref()
            .is_none_or(|ns| ns.redis.prefix() != prefix)
        {
            return 0;
        }
        let map = lock(&inner.shard(key_id).map);
        map.get(key_id)
            .and_then(|k| {
                k.held
                    .slice()
                    .iter()
                    .find(|l| l.window.same_counter(window) && l.period == period)
            })
            .map_or(0, |l| l.held())
    }

    /// Units this instance admitted in that period that Redis does not
    /// count yet (charged after the answer; a call is owed) (tests).
    #[cfg(test)]
    pub fn owed(&self, prefix: &str, key_id: &str, window: &Window, period: u64) -> u64 {
        let inner = &*self.inner;
        if inner
            .namespace
            .load()
            .as_ref()
            .is_none_or(|ns| ns.redis.prefix() != prefix)
        {
            return 0;
        }
        let map = lock(&inner.shard(key_id).map);
        map.get(key_id)
            .and_then(|k| {
                k.held
                    .slice()
                    .iter()
                    .find(|l| l.window.same_counter(window) && l.period == period)
            })
            .map_or(0, |l| l.pending())
    }
}

/// Runs every KEEP_EVERY while this instance holds any key: registers the
/// instance, starts a resync of every key after a lost connection, sweeps
/// ended keys and makes the background calls. It stops when no key is left
/// (the next acquire starts it again) or when the leases are dropped.
fn spawn_keeper(inner: Weak<Inner>) {
    tokio::spawn(async move {
        let mut round: u64 = 0;
        loop {
            // The first round at once: the instance registers in the fleet
            // before it may have to decide on its own.
            if round > 0 {
                tokio::time::sleep(KEEP_EVERY).await;
            }
            let Some(inner) = inner.upgrade() else {
                return;
            };
            round += 1;
            if let Some(ns) = inner.namespace.load_full() {
                if round % 2 == 1 {
                    if let Ok(n) =
                        remote::register(&ns.background, &inner.instance, FLEET_TTL_MS).await
                    {
                        inner.fleet.store(n, Ordering::Relaxed);
                    }
                }
                let reconnects = ns.redis.reconnects() + ns.background.reconnects();
                #[cfg(test)]
                if std::env::var_os("SIM_TRACE").is_some() {
                    println!(
                        "{:>9.3} {} keeper round, reconnects {reconnects}",
                        (crate::clock::now_us() % 100_000_000) as f64 / 1e6,
                        inner.instance
                    );
                }
                if inner.reconnects_seen.swap(reconnects, Ordering::Relaxed) != reconnects {
                    #[cfg(test)]
                    if std::env::var_os("SIM_TRACE").is_some() {
                        println!(
                            "{:>9.3} {} resyncs every key",
                            (crate::clock::now_us() % 100_000_000) as f64 / 1e6,
                            inner.instance
                        );
                    }
                    inner.sync_all();
                }
                inner.sweep().await;
                inner.retry_returns().await;
                inner.background_calls(&ns, IDLE, false).await;
            } else {
                inner.sweep().await;
            }
            if inner.keys() == 0 && inner.unreturned.done() {
                inner.keeper_running.store(false, Ordering::Release);
                // A key that arrived meanwhile saw the keeper running.
                if inner.keys() == 0 || inner.keeper_running.swap(true, Ordering::AcqRel) {
                    return;
                }
            }
        }
    });
}

/// Fetches the next lease before the current one runs out (so requests far
/// from their limit rarely wait on Redis), or, with `max_chunk` 0, only
/// states the key's floor (units admitted that Redis does not count yet).
/// `taken`: the caller already marked the key busy for this call; else the
/// call is made only if no other call for the key is under way (that one
/// states the floor too, or leaves the key owing a sync).
fn spawn_top_up(
    inner: Arc<Inner>,
    ns: Arc<Namespace>,
    key_id: String,
    windows: Vec<Window>,
    max_chunk: u64,
    taken: bool,
) {
    tokio::spawn(async move {
        let shard = inner.shard(&key_id);
        let asks: Vec<Ask> = {
            let mut map = lock(&shard.map);
            let Some(k) = map.get_mut(key_id.as_str()).filter(|k| k.matches(&windows)) else {
                drop(map);
                if taken {
                    drop(Busy {
                        shard,
                        key: &key_id,
                    });
                }
                return;
            };
            if !taken {
                if k.busy() {
                    return;
                }
                k.set_busy(true);
            }
            k.held
                .slice_mut()
                .iter_mut()
                .map(|l| l.sync_once(ns.algo))
                .collect()
        };
        let _busy = Busy {
            shard,
            key: &key_id,
        };
        let sent = inner.now();
        let answer = remote::lease(
            &ns.background,
            ns.algo,
            &inner.instance,
            &key_id,
            &windows,
            &asks,
            DIVISOR,
            max_chunk,
        )
        .await;
        let mut map = lock(&shard.map);
        let Some(k) = map.get_mut(key_id.as_str()) else {
            return;
        };
        match answer {
            Ok(grants) if !k.answers(&windows, &asks) => {
                // The key's leases changed during the call: what it
                // granted goes to the leases it was asked for, or back.
                let none = vec![0; asks.len()];
                inner.late_answer(&ns, Some(k), &key_id, &windows, &asks, &none, &grants, true);
            }
            Ok(grants) => {
                let zeros = vec![0; asks.len()];
                lease::apply(
                    k.held.slice_mut(),
                    ns.algo,
                    &asks,
                    &zeros,
                    &grants,
                    sent,
                    inner.now(),
                    true,
                );
                let owes = owes(k);
                k.set_sync(owes);
                if owes {
                    // Reported while this call was on its way: counted next.
                    drop(map);
                    drop(_busy);
                    spawn_top_up(inner.clone(), ns, key_id.clone(), windows, 0, false);
                }
            }
            Err(_) => k.set_sync(true),
        }
    });
}

/// Units admitted that Redis does not count yet (reported after an answer
/// that was already on its way, or admitted while Redis was away).
fn owes(k: &KeyState) -> bool {
    k.held
        .slice()
        .iter()
        .any(|l| l.pending() > 0 || l.returning)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_state_is_88_bytes() {
        // Memory per key (README, bench/memory.py): one state per key, its
        // one lease inline.
        assert_eq!(std::mem::size_of::<Lease>(), 80);
        assert_eq!(std::mem::size_of::<Slots<Lease>>(), 80);
        assert_eq!(std::mem::size_of::<KeyState>(), 88);
        let mut k = KeyState::new(12_345);
        k.set_busy(true);
        k.set_sync(true);
        k.used_at(99_999);
        assert!(k.busy() && k.owes_sync());
        assert_eq!(k.last_used(), 99_999);
        k.set_busy(false);
        assert!(!k.busy() && k.owes_sync());
        assert_eq!(k.last_used(), 99_999);
    }

    fn lease(requests: u64, available: u64, left_secs: u64, now: u64) -> Lease {
        Lease {
            available,
            expires: now + left_secs * 1_000_000,
            ..Lease::fresh(
                &Window::every(requests, Duration::from_secs(60)),
                Algorithm::FixedWindow,
                now,
                1_780_000_000_000_000,
            )
        }
    }

    #[test]
    fn far_from_the_limit_a_first_lease_is_a_small_share_of_the_limit() {
        let now = 1_000_000_000;
        // Limit 10^6, all available: 976 units before any rate is known.
        assert_eq!(
            lease::far_floor(&[lease(1_000_000, 1_000_000, 40, now)]),
            976
        );
        // Capped, and never under MIN_CHUNK.
        assert_eq!(
            lease::far_floor(&[lease(u64::MAX / 4, u64::MAX / 4, 40, now)]),
            4096
        );
        assert_eq!(
            lease::far_floor(&[lease(300, 300, 40, now)]),
            lease::MIN_CHUNK
        );
        // Half or less available: no floor beyond MIN_CHUNK; the tightest
        // window decides.
        assert_eq!(
            lease::far_floor(&[lease(1_000_000, 400_000, 40, now)]),
            lease::MIN_CHUNK
        );
        assert_eq!(
            lease::far_floor(&[
                lease(1_000_000, 1_000_000, 40, now),
                lease(100_000, 100_000, 40, now)
            ]),
            97
        );
    }

    #[test]
    fn horizon_grows_with_headroom() {
        let now = 5_000_000;
        // All of the limit available: the rest of the window, with margin.
        assert_eq!(lease::horizon_secs(&lease(1000, 1000, 40, now), now), 60.0);
        // Three quarters: half of that.
        assert_eq!(lease::horizon_secs(&lease(1000, 750, 40, now), now), 30.0);
        // Half or less: two seconds, as before.
        assert_eq!(lease::horizon_secs(&lease(1000, 500, 40, now), now), 2.0);
        assert_eq!(lease::horizon_secs(&lease(1000, 0, 40, now), now), 2.0);
        // A lease that has ended: a whole window ahead.
        assert_eq!(lease::horizon_secs(&lease(1000, 1000, 0, now), now), 90.0);
    }

    #[test]
    fn cap_is_the_floor_before_the_rate_is_known() {
        let leases = Leases::default();
        let now = leases.inner.now();
        let l = [lease(1_000_000, 1_000_000, 50, now)];
        assert_eq!(leases.inner.chunk_cap("k:new", &l, now), 976);
        let near = [lease(1_000, 100, 50, now)];
        assert_eq!(
            leases.inner.chunk_cap("k:new", &near, now),
            lease::MIN_CHUNK
        );
    }

    fn insert(leases: &Leases, key: &str, l: Lease, stamp: u64) {
        let shard = leases.inner.shard(key);
        lock(&shard.map).insert(
            key.into(),
            KeyState {
                held: Slots::One(l),
                stamp,
            },
        );
    }

    #[tokio::test]
    async fn keys_whose_leases_ended_are_swept() {
        let leases = Leases::default();
        let now = leases.inner.now();
        for i in 0..5000 {
            let ended = i % 2 == 0;
            insert(
                &leases,
                &format!("k:{i}"),
                lease(100, 100, if ended { 0 } else { 60 }, now),
                now,
            );
        }
        assert_eq!(leases.keys(), 5000);
        leases.inner.sweep().await;
        assert_eq!(leases.keys(), 2500);
    }

    #[tokio::test]
    async fn a_sweep_lets_requests_run_between_shards() {
        let leases = Leases::default();
        let now = leases.inner.now();
        for i in 0..SHARDS * 50 {
            insert(&leases, &format!("k:{i}"), lease(100, 100, 0, now), now);
        }
        let ((), turns) = super::super::turns_beside(leases.inner.sweep()).await;
        assert_eq!(leases.keys(), 0);
        assert!(turns >= SHARDS - 1, "{turns} turns in {SHARDS} shards");
    }

    /// Remembered leases stop at `MAX_GHOSTS`: past it a lease made again
    /// presumes what a fresh one does; once the remembered ones have
    /// ended, a full table makes room for new ones.
    #[test]
    fn ghosts_stop_at_their_cap_and_ended_ones_make_room() {
        let leases = Leases::default();
        let inner = &*leases.inner;
        let algo = Algorithm::FixedWindow;
        let now = 10_000_000_000;
        let ends_soon = lease(100, 10, 1, now);
        for i in 0..MAX_GHOSTS + 10 {
            inner.remember(1, &format!("k{i}"), &[ends_soon], now);
        }
        assert_eq!(inner.ghost_count.load(Ordering::Relaxed), MAX_GHOSTS);
        let mut first = lease(100, 100, 60, now);
        assert!(inner.recall(1, "k0", &mut first, algo, now));
        assert_eq!(first.available, 10, "what Redis last said was left");
        let mut past_cap = lease(100, 100, 60, now);
        let key = format!("k{}", MAX_GHOSTS + 5);
        assert!(!inner.recall(1, &key, &mut past_cap, algo, now));
        assert_eq!(past_cap.available, 100, "presumed as a fresh lease");
        inner.remember(1, "fills", &[ends_soon], now);
        assert_eq!(inner.ghost_count.load(Ordering::Relaxed), MAX_GHOSTS);

        let later = now + 2_000_000;
        inner.remember(1, "late", &[lease(100, 20, 60, later)], later);
        assert_eq!(
            inner.ghost_count.load(Ordering::Relaxed),
            1,
            "ended ones went"
        );
        let mut late = lease(100, 100, 60, later);
        assert!(inner.recall(1, "late", &mut late, algo, later));
        assert_eq!(late.available, 20);
        assert!(!inner.recall(1, "k1", &mut lease(100, 100, 60, later), algo, later));
    }

    #[test]
    fn a_full_shard_forgets_its_least_recently_used_keys() {
        let leases = Leases::default();
        leases.set_max_keys(SHARDS * 16);
        let now = leases.inner.now();
        let shard = &leases.inner.shards[0];
        let mut map = lock(&shard.map);
        for i in 0..16u64 {
            map.insert(
                format!("k:{i}").into(),
                KeyState {
                    held: Slots::One(lease(100, 100, 60, now)),
                    stamp: 1000 + i,
                },
            );
        }
        leases.inner.make_room(&mut map);
        // An eighth of 16: the two oldest went.
        assert_eq!(map.len(), 14);
        assert!(!map.contains_key("k:0") && !map.contains_key("k:1"));
        assert!(map.contains_key("k:2"));
    }
}
