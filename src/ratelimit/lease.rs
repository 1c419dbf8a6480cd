//! Lease accounting as plain data and functions of time: what one instance
//! knows of one key's windows, and how each event changes it — a request
//! admitted from the budget it holds, an answer from Redis, a call that
//! failed, a request admitted on its own while Redis is unreachable, a
//! refund, a cost reported after the answer, a hand-back. No I/O and no
//! clock: `now` is the instance's monotonic microseconds, `wall` its wall
//! clock; the tasks that talk to Redis are in `hybrid.rs`.
//!
//! Each lease keeps a small ledger of its period: `ledger`, the units Redis
//! counts for this instance (as its last answer said), and `consumed`, the
//! units this instance admitted. The budget is their difference. Every call
//! tells Redis what the instance has counted for itself in the period (its
//! floor), so Redis counts again what it lost in a restart and what the
//! instance admitted while it could not reach it; every answer says what
//! Redis counts for the instance, so a grant whose answer was lost (the
//! call timed out after Redis ran it) is found again at the next call.
//! GCRA keeps no periods: its floor is the units admitted on the
//! instance's own, charged as they are (see `lua/gcra.lua`).

use super::algo::{Outcome, Period};
use super::packed::{PackedWindow, Slots};
use super::remote::{Ask, Grant};
use crate::config::{Algorithm, Window};

/// Smallest lease cap, so a key starts with chunks before its rate is known.
pub const MIN_CHUNK: u64 = 64;
/// Far from its limit (more than half available) a key's lease is at least
/// this share of what is available, up to FAR_FLOOR_MAX units: a burst pays
/// a few calls before the rate estimate catches up, and even a large fleet
/// holds only a small part of the limit this way.
const FAR_FLOOR_SHARE: u64 = 1024;
const FAR_FLOOR_MAX: u64 = 4096;
/// Horizon of a lease near the limit, in seconds of the key's rate.
const NEAR_HORIZON_SECS: f64 = 2.0;
/// Far from the limit a lease covers the rest of the window times this, so
/// a steady key's lease does not fall under the top-up mark (a quarter of
/// the grant) before its window ends.
const FAR_HORIZON_FACTOR: f64 = 1.5;
/// Below this grant size the key is near its limit: no background top-ups,
/// so no instance sits on budget another one needs.
const PREFETCH_MIN_GRANT: u64 = 8;

/// One window's lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub window: PackedWindow,
    /// Start of the period the lease counts in (µs on Redis' clock; first
    /// guessed from this instance's wall clock). GCRA: 0.
    pub period: u64,
    /// When the lease ends (the period's end, or a GCRA grant's life).
    pub expires: u64,
    /// Units Redis counts for this instance in the period.
    pub ledger: u64,
    /// Units this instance admitted in the period.
    pub consumed: u64,
    /// Units nobody held at the last answer.
    pub available: u64,
    /// Refused by Redis: refuse locally until then (0: not refused) when
    /// the cost exceeds `budget + available`.
    pub over_until: u64,
    /// Size of the last grant (saturated): the budget is topped up in the
    /// background when it falls under a quarter of it.
    pub last_grant: u32,
    /// The cost Redis refused (saturated): until `over_until`, requests at
    /// least this costly are refused locally; a smaller one may fit sooner
    /// (a sliding window frees units as it slides) and asks Redis.
    pub refused_cost: u32,
    /// This lease's name in the period's ledger (with the instance's): a
    /// lease dropped and made again in one period (a window a reload
    /// removed and put back, a key forgotten and seen again) has a ledger
    /// of its own, so what the old one held is never read as the new
    /// one's budget.
    pub incarnation: u32,
    /// A call of this lease failed after it may have reached Redis, and no
    /// answer since told the ledger: Redis may count a grant this instance
    /// never saw. A lease dropped or forgotten in that state still makes
    /// its hand-back call, which tells Redis what it really admitted.
    pub unsure: bool,
    /// The budget was taken under a limit a reload has replaced: it is no
    /// longer in `ledger` (never spent under the new limit), `last_grant`
    /// holds it, and the lease's next call hands it back (in the same call,
    /// so no answer is read against a count the hand-back has not reached).
    pub returning: bool,
    /// Calls of requests for this lease under way (`sync: exact` makes one
    /// per request, all at once). A lease dropped or forgotten meanwhile
    /// hands back only what it holds: their grants are not lost, their
    /// answers admit requests. Stays at its maximum once it reaches it.
    pub asking: u16,
}

/// What a lease this instance dropped in a period knew when it went (a
/// reload removed its window or moved the key prefix, and may put it
/// back): a lease made again for the same counter in the same period
/// starts from it, so a window removed and put back while Redis cannot be
/// reached does not presume the whole limit available again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ghost {
    /// The period it counted in (GCRA: 0).
    pub period: u64,
    /// When it would have ended (instance µs).
    pub expires: u64,
    /// Its limit, and what Redis last said was left under it.
    pub limit: u64,
    pub available: u64,
    /// Units it admitted on its own that Redis did not count yet (its
    /// hand-back states them, under its own name).
    pub own: u64,
    pub over_until: u64,
    pub refused_cost: u32,
}

impl Ghost {
    pub fn of(l: &Lease) -> Ghost {
        Ghost {
            period: l.period,
            expires: l.expires,
            limit: l.window.requests,
            available: l.available,
            own: l.pending(),
            over_until: l.over_until,
            refused_cost: l.refused_cost,
        }
    }

    /// A fresh lease of the same counter starts from what the ghost knew:
    /// what the fleet had used stays used, and what the ghost admitted on
    /// its own comes off this instance's fallback share (`fleet`: the
    /// instances sharing what is left), as it would have on the ghost.
    /// A ghost of another period, or one that has ended, tells nothing.
    pub fn haunt(&self, l: &mut Lease, algo: Algorithm, fleet: u64, now: u64) -> bool {
        if self.expires <= now || (!gcra(&l.window, algo) && self.period != l.period) {
            return false;
        }
        let used = self.limit.saturating_sub(self.available);
        l.available = l
            .window
            .requests
            .saturating_sub(used)
            .saturating_sub(self.own.saturating_mul(fleet.max(1)));
        if self.over_until > now {
            l.over_until = self.over_until;
            l.refused_cost = self.refused_cost;
        }
        true
    }
}

/// A new lease's incarnation.
fn next_incarnation() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn saturated(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn gcra(w: &PackedWindow, algo: Algorithm) -> bool {
    w.period().counted_by(algo) == Algorithm::Gcra
}

impl Lease {
    /// A lease nobody asked Redis for yet: its period as this instance's
    /// clock sees it, all of the limit presumed available.
    pub fn fresh(w: &Window, algo: Algorithm, now: u64, wall: u64) -> Lease {
        let window = PackedWindow::of(w);
        let period = Period::of(w);
        let (start, expires) = if gcra(&window, algo) {
            (0, now.saturating_add(period.length()))
        } else {
            let (start, end) = period.bounds(wall);
            (start, now.saturating_add(end.saturating_sub(wall)))
        };
        Lease {
            window,
            period: start,
            expires,
            ledger: 0,
            consumed: 0,
            available: w.requests,
            over_until: 0,
            last_grant: 0,
            refused_cost: 0,
            incarnation: next_incarnation(),
            unsure: false,
            returning: false,
            asking: 0,
        }
    }

    /// Units held and not yet admitted.
    pub fn budget(&self) -> u64 {
        self.ledger.saturating_sub(self.consumed)
    }

    /// Units Redis counts for this lease beyond what it admitted: its
    /// budget and what is on its way back.
    pub fn held(&self) -> u64 {
        self.budget().saturating_add(self.surplus())
    }

    /// Units on their way back (see [`Lease::returning`]).
    fn surplus(&self) -> u64 {
        if self.returning {
            u64::from(self.last_grant)
        } else {
            0
        }
    }

    /// Units admitted that Redis does not count yet.
    pub fn pending(&self) -> u64 {
        self.consumed.saturating_sub(self.ledger)
    }

    pub fn live(&self, now: u64) -> bool {
        self.expires > now
    }

    pub fn over(&self, now: u64) -> bool {
        self.over_until > now
    }

    /// What this instance tells Redis it has counted for itself.
    fn floor(&self, algo: Algorithm) -> u64 {
        if gcra(&self.window, algo) {
            self.pending()
        } else {
            self.ledger.max(self.consumed)
        }
    }

    /// A call that only states the floor (and reports what was admitted):
    /// it finds lost grants, counts what Redis lacks, and learns the ledger.
    pub fn sync(&self, algo: Algorithm) -> Ask {
        Ask {
            need: 0,
            period: Some(self.period),
            floor: self.floor(algo),
            back: self.surplus(),
            consumed: Some(self.consumed),
            incarnation: self.incarnation,
        }
    }

    /// [`Lease::sync`] for a call about to be made: the units on their way
    /// back go in this call only (calls made meanwhile must not hand them
    /// back again).
    pub fn sync_once(&mut self, algo: Algorithm) -> Ask {
        let ask = self.sync(algo);
        if self.returning {
            self.returning = false;
            self.last_grant = 0;
        }
        ask
    }

    fn outcome(&self, now: u64, allowed: bool, retry_us: u64) -> Outcome {
        Outcome {
            allowed,
            remaining: self.available.saturating_add(self.budget()),
            reset_us: self.expires.saturating_sub(now),
            retry_us,
        }
    }
}

/// Lines a key's leases up with the windows that apply now (in place when
/// they already are: the common case costs no allocation); a lease whose
/// period ended starts afresh.
/// Returns the leases of windows no longer named (their unused units
/// should go back to Redis).
/// `prior` tells, for a window without a lease, what a lease of its
/// counter dropped earlier in the period knew ([`Ghost`]; consulted only
/// when no lease of the counter is held).
pub fn align(
    held: &mut Slots<Lease>,
    windows: &[Window],
    algo: Algorithm,
    now: u64,
    wall: u64,
    prior: impl Fn(&mut Lease) -> bool,
) -> Vec<Lease> {
    // A lease of a window whose limit a reload changed is dropped (what it
    // held goes back) and a new one counts on in the same counter: units
    // leased under the old limit are never spent under the new one.
    let keep = |l: &Lease, w: &Window| l.window.is(w) && l.live(now);
    let current = held.slice();
    let same =
        current.len() == windows.len() && current.iter().zip(windows).all(|(l, w)| keep(l, w));
    // A lease whose period ended is followed by one under the same name in
    // the ledger: a grant made for it after the period turned (its call
    // was slow) is found by the next one.
    let ended: Vec<Lease> = if same {
        Vec::new()
    } else {
        current.iter().filter(|l| !l.live(now)).copied().collect()
    };
    // Live leases a changed limit replaces.
    let replaced: Vec<Lease> = if same {
        Vec::new()
    } else {
        current.iter().filter(|l| l.live(now)).copied().collect()
    };
    let mut dropped = held.align(windows, keep, |w| {
        let mut l = Lease::fresh(w, algo, now, wall);
        let mut known = false;
        if let Some(r) = replaced
            .iter()
            .find(|r| r.window.same_counter(w) && r.period == l.period)
        {
            // Same counter, same period, a new limit: what the fleet used
            // by the last answer is not available under the new limit
            // either, and what this instance admitted stays admitted — it
            // counts against the instance's fallback share (a reload during
            // an outage does not hand every instance a fresh share). The
            // lease keeps its name in the ledger, so what it states there
            // is one count whatever order its calls land in; only its
            // budget goes back (the hand-back of the replaced lease).
            known = true;
            let used = r.window.requests.saturating_sub(r.available);
            l.available = w.requests.saturating_sub(used);
            if gcra(&l.window, algo) || r.unsure {
                // GCRA states units admitted on its own as a charge to add
                // (not a count); a lease whose call failed may have grants
                // in its ledger it never saw, taken under the old limit,
                // which its hand-back releases. Both start a new lease:
                // what was admitted on its own moves to it, and the
                // hand-back no longer states it (below).
                l.consumed = r.pending();
            } else {
                l.incarnation = r.incarnation;
                l.consumed = r.consumed;
                l.ledger = r.ledger.min(r.consumed);
                l.unsure = r.unsure;
                let back = r.held();
                l.returning = back > 0;
                l.last_grant = if l.returning { saturated(back) } else { 0 };
            }
        }
        if let Some(e) = ended.iter().find(|e| e.window.same_counter(w)) {
            l.incarnation = e.incarnation;
            if !gcra(&l.window, algo) && e.period == l.period {
                known = true;
                // Ended by the answer's timing (its period's end is taken
                // from when the call was sent) while this instance's clock
                // still sees the same period: the period may not have
                // ended in Redis. What was admitted and what Redis said was
                // left still count (a fallback share is not drawn from the
                // whole limit again, a grant already spent is not read as
                // budget again); nothing is spent without asking Redis.
                l.consumed = e.consumed;
                l.ledger = e.ledger.min(e.consumed);
                l.available = e.available;
                l.over_until = e.over_until;
                l.refused_cost = e.refused_cost;
                l.unsure = e.unsure;
            }
        }
        if !known {
            prior(&mut l);
        }
        l
    });
    // A replaced lease that keeps its name hands its budget back through
    // its successor's next call (above), not on its own; one whose
    // successor has a name of its own has moved what it admitted beyond its
    // ledger there.
    dropped.retain(|d| {
        gcra(&d.window, algo)
            || !d.live(now)
            || !held.slice().iter().any(|l| l.incarnation == d.incarnation)
    });
    for d in dropped
        .iter_mut()
        .filter(|d| d.live(now) && (gcra(&d.window, algo) || d.unsure))
    {
        let succeeded = held.slice().iter().any(|l| {
            l.window.same_counter(&d.window.window())
                && l.period == d.period
                && l.incarnation != d.incarnation
        });
        if succeeded {
            d.consumed = d.consumed.min(d.ledger);
        }
    }
    for l in held.slice_mut() {
        if l.over_until != 0 && l.over_until <= now {
            l.over_until = 0;
        }
    }
    dropped
}

/// A request of `cost` decided from what this instance holds, when it can
/// be: refused when a window is known to be over, admitted when every
/// window's budget covers it. `None`: Redis must be asked.
pub fn local(leases: &mut [Lease], cost: u64, now: u64) -> Option<(bool, Vec<Outcome>)> {
    let over = |l: &Lease| {
        l.over(now)
            && cost >= u64::from(l.refused_cost)
            && cost > l.budget().saturating_add(l.available)
    };
    if leases.iter().any(over) {
        let outcomes = leases
            .iter()
            .map(|l| {
                if over(l) {
                    l.outcome(now, false, l.over_until - now)
                } else {
                    l.outcome(now, true, 0)
                }
            })
            .collect();
        return Some((false, outcomes));
    }
    if leases.iter().all(|l| l.budget() >= cost) {
        for l in leases.iter_mut() {
            l.consumed += cost;
        }
        return Some((
            true,
            leases.iter().map(|l| l.outcome(now, true, 0)).collect(),
        ));
    }
    None
}

/// What to ask Redis for a request of `cost` that the budget does not
/// cover: the budget's part is reserved for the request (`reserved[i]`,
/// given back if it is refused or the call fails), the rest is needed.
pub fn ask(leases: &mut [Lease], algo: Algorithm, cost: u64) -> (Vec<Ask>, Vec<u64>) {
    let reserved: Vec<u64> = leases.iter().map(|l| l.budget().min(cost)).collect();
    for (l, r) in leases.iter_mut().zip(&reserved) {
        l.consumed += r;
        l.asking = l.asking.saturating_add(1);
    }
    let asks = leases
        .iter_mut()
        .zip(&reserved)
        .map(|(l, r)| Ask {
            need: cost - r,
            ..l.sync_once(algo)
        })
        .collect();
    (asks, reserved)
}

/// Applies Redis' answer to a call made at `sent` (`top_up`: a background
/// call that admits no request). Returns whether every window admitted the
/// request and one outcome per window.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    leases: &mut [Lease],
    algo: Algorithm,
    asks: &[Ask],
    reserved: &[u64],
    grants: &[Grant],
    sent: u64,
    now: u64,
    top_up: bool,
) -> (bool, Vec<Outcome>) {
    let admitted = grants.iter().zip(asks).all(|(g, a)| g.granted >= a.need);
    let mut outcomes = Vec::with_capacity(leases.len());
    for (i, l) in leases.iter_mut().enumerate() {
        let (Some(ask), Some(g)) = (asks.get(i), grants.get(i)) else {
            continue;
        };
        let reserved = reserved.get(i).copied().unwrap_or(0);
        let is_gcra = gcra(&l.window, algo);
        // The period ends no later than this: the answer is at least as
        // old as the call.
        let expires = if is_gcra {
            sent.saturating_add(l.window.period().length())
        } else {
            sent.saturating_add(g.reset_us)
        };
        let mut reserved_here = reserved;
        if !is_gcra && g.period != l.period {
            // A new period: what the lease held or admitted belonged to the
            // last one (the reserved units too; the request counts `need`
            // units here).
            l.period = g.period;
            l.consumed = 0;
            l.returning = false;
            l.over_until = 0;
            l.expires = expires;
            reserved_here = 0;
        }
        learn(l, ask, g);
        let ok = admitted || g.available >= ask.need;
        if admitted {
            l.consumed = l.consumed.saturating_add(ask.need);
            // A GCRA lease lives a window from its last grant.
            if !is_gcra || g.granted > 0 {
                l.expires = expires;
            }
            // A request's own grant ends a refusal; a background answer
            // ends it when it shows room for what was refused (units
            // handed back, or a count restated after a restart).
            if !top_up || g.available.saturating_add(l.budget()) >= u64::from(l.refused_cost.max(1))
            {
                l.over_until = 0;
            }
            if g.granted > 0 {
                l.last_grant = saturated(g.granted);
            }
        } else {
            l.consumed = l.consumed.saturating_sub(reserved_here);
            if g.available.saturating_add(l.budget()) < ask.need.saturating_add(reserved)
                || g.retry_us > 0
            {
                // From when the call was sent: the retry time was measured no
                // earlier, so the lease never refuses past it.
                l.over_until = sent.saturating_add(g.retry_us.max(1));
                l.refused_cost = saturated(ask.need.saturating_add(reserved));
            }
        }
        outcomes.push(l.outcome(now, ok, if ok { 0 } else { g.retry_us }));
    }
    (admitted, outcomes)
}

/// What an answer tells a lease of its ledger (GCRA keeps none: what the
/// call charged and granted is added) and of what is left.
fn learn(l: &mut Lease, ask: &Ask, g: &Grant) {
    match g.ledger {
        Some(ledger) => {
            l.ledger = ledger;
            l.unsure = false;
            if l.returning {
                // The answer counts the hand-back the call carried.
                l.returning = false;
                l.last_grant = 0;
            }
        }
        None => l.ledger = l.ledger.saturating_add(ask.floor).saturating_add(g.granted),
    }
    l.available = g.available;
}

/// An answer for one lease of a call during which the key's windows
/// changed (a reload replaced another of them): applied to the lease it was
/// asked for, found by its incarnation, with the call's own outcome
/// (`admitted`: every window of the call granted). `false`: the lease has
/// moved on to another period, so the answer is not its own.
pub fn apply_one(
    l: &mut Lease,
    algo: Algorithm,
    ask: &Ask,
    reserved: u64,
    g: &Grant,
    admitted: bool,
) -> bool {
    if !gcra(&l.window, algo) && g.period != l.period {
        return false;
    }
    learn(l, ask, g);
    if admitted {
        l.consumed = l.consumed.saturating_add(ask.need);
    } else {
        l.consumed = l.consumed.saturating_sub(reserved);
    }
    true
}

/// The part of a late answer a lease whose limit changed during the call
/// keeps: the request's admitted units (its ledger is left as it is; the
/// next call states them). `false`: the lease has moved on to another
/// period.
pub fn admitted_late(l: &mut Lease, ask: &Ask, reserved: u64, g: &Grant, admitted: bool) -> bool {
    if g.period != l.period {
        return false;
    }
    if admitted {
        l.consumed = l.consumed.saturating_add(ask.need);
    } else {
        l.consumed = l.consumed.saturating_sub(reserved);
    }
    true
}

/// Units Redis counts for a lease that is gone (a reload, an eviction or a
/// change of namespace replaced it while its call was under way) beyond
/// what it admitted: the grant's surplus, or, for a refused request, what
/// the call granted and the units reserved from the lease's budget (they
/// were stated as admitted when the lease was handed back). They go back
/// to that lease's own ledger ([`give_back`]).
pub fn orphaned(ask: &Ask, reserved: u64, g: &Grant, admitted: bool) -> u64 {
    if admitted {
        g.granted.saturating_sub(ask.need)
    } else if ask.period == Some(g.period) {
        g.granted.saturating_add(reserved)
    } else {
        g.granted
    }
}

/// A call that hands `units` back to the ledger of the lease `incarnation`
/// in `period`, whether or not this instance still holds it (a refund or
/// a grant's surplus for a lease that is gone). Redis never takes more
/// than that ledger counts, and a period that has ended is left alone.
pub fn give_back(period: u64, units: u64, incarnation: u32) -> Ask {
    Ask {
        need: 0,
        period: Some(period),
        floor: 0,
        back: units,
        consumed: None,
        incarnation,
    }
}

/// A request's call of the leases `incarnations` is over (answered,
/// failed or given up).
pub fn answered(leases: &mut [Lease], incarnations: &[u32]) {
    for l in leases.iter_mut() {
        if l.asking != u16::MAX && incarnations.contains(&l.incarnation) {
            l.asking = l.asking.saturating_sub(1);
        }
    }
}

/// A call failed (its effect unknown): the reserved units go back.
pub fn undo(leases: &mut [Lease], reserved: &[u64]) {
    for (l, r) in leases.iter_mut().zip(reserved) {
        l.consumed = l.consumed.saturating_sub(*r);
        l.unsure = true;
    }
}

/// While Redis cannot be reached (`on_failure: local`): a request is
/// admitted on this instance's own if it fits in what the instance holds
/// plus its share of what Redis last said was left (`fleet` instances share
/// it; a lease never answered presumes the whole limit was left). A window
/// Redis refused stays refused until its retry time. What is admitted this
/// way is counted in Redis at the next call (the floor).
pub fn fallback(leases: &mut [Lease], cost: u64, fleet: u64, now: u64) -> (bool, Vec<Outcome>) {
    let fleet = fleet.max(1);
    let allowance = |l: &Lease| l.ledger.saturating_add(l.available / fleet);
    let fits = |l: &Lease| !l.over(now) && l.consumed.saturating_add(cost) <= allowance(l);
    let allowed = leases.iter().all(fits);
    if allowed {
        for l in leases.iter_mut() {
            l.consumed += cost;
        }
    }
    let outcomes = leases
        .iter()
        .map(|l| {
            let remaining = allowance(l).saturating_sub(l.consumed);
            let ok = allowed || fits(l);
            let retry = if ok {
                0
            } else if l.over(now) {
                l.over_until - now
            } else {
                l.expires.saturating_sub(now).max(1)
            };
            Outcome {
                allowed: ok,
                remaining,
                reset_us: l.expires.saturating_sub(now),
                retry_us: retry,
            }
        })
        .collect();
    (allowed, outcomes)
}

/// Gives back units a request was charged in `period` (a later scope
/// refused it, or the upstream reported a lower cost). A lease of another
/// period is left alone: its window is not the one that was charged.
pub fn refund(lease: &mut Lease, units: u64, period: u64, now: u64) {
    if lease.live(now) && lease.period == period {
        lease.consumed = lease.consumed.saturating_sub(units);
    }
}

/// Charges units reported after the answer, whether or not they fit: from
/// the budget first, the rest counted in Redis at the next call. Returns
/// whether a call is now owed.
pub fn extra(lease: &mut Lease, units: u64, now: u64) -> bool {
    if !lease.live(now) {
        return false;
    }
    lease.consumed = lease.consumed.saturating_add(units);
    lease.pending() > 0
}

/// Takes the lease's unused units to hand back: the call to make. The
/// budget is gone at once (no request can use what is on its way back);
/// the answer says what Redis counts afterwards.
pub fn hand_back(lease: &mut Lease, algo: Algorithm) -> Ask {
    let back = lease.held();
    let ask = Ask {
        back,
        ..lease.sync(algo)
    };
    lease.ledger -= lease.budget();
    if lease.returning {
        lease.returning = false;
        lease.last_grant = 0;
    }
    Ask {
        floor: lease.floor(algo),
        ..ask
    }
}

/// `back` of a last hand-back that may have to cover a grant never seen:
/// more than any count (Redis' numbers are exact to 2^53); the script keeps
/// what the lease says it admitted (the floor) and releases the rest.
const ALL_BACK: u64 = 1 << 52;

/// The hand-back of a lease about to be forgotten (a reload dropped its
/// window, its key was evicted, its namespace left): like [`hand_back`],
/// and when a call of it failed after it may have reached Redis
/// ([`Lease::unsure`]) and none is under way, everything Redis counts for
/// the lease beyond what it admitted goes back, the grant whose answer was
/// lost too. GCRA keeps
/// no ledger to tell them apart: its lost grants stay counted until its
/// bucket drains.
pub fn hand_back_last(lease: &mut Lease, algo: Algorithm) -> Ask {
    // Not while a request's call is under way: its grant is not lost, and
    // the request it admits stays counted.
    let unsure = lease.unsure && lease.asking == 0 && !gcra(&lease.window, algo);
    let ask = hand_back(lease, algo);
    if unsure {
        Ask {
            back: ALL_BACK,
            ..ask
        }
    } else {
        ask
    }
}

/// The smallest lease cap for these windows: MIN_CHUNK, or more while every
/// window is far from its limit.
pub fn far_floor(leases: &[Lease]) -> u64 {
    leases
        .iter()
        .map(|l| {
            if l.available.saturating_mul(2) > l.window.requests {
                (l.available / FAR_FLOOR_SHARE).min(FAR_FLOOR_MAX)
            } else {
                0
            }
        })
        .min()
        .unwrap_or(0)
        .max(MIN_CHUNK)
}

/// Seconds of the key's rate one lease should cover: the rest of the
/// window (times FAR_HORIZON_FACTOR) with all of the limit available,
/// falling linearly to NEAR_HORIZON_SECS with half of it or less.
pub fn horizon_secs(l: &Lease, now: u64) -> f64 {
    let limit = l.window.requests.max(1);
    let headroom = l.available.min(limit) as f64 / limit as f64;
    let far = ((headroom - 0.5) * 2.0).clamp(0.0, 1.0);
    let rest = if l.expires > now {
        (l.expires - now) as f64 / 1e6
    } else {
        l.window.secs_f64()
    };
    NEAR_HORIZON_SECS.max(far * rest * FAR_HORIZON_FACTOR)
}

pub fn needs_top_up(leases: &[Lease]) -> bool {
    leases.iter().any(|l| {
        !l.returning
            && u64::from(l.last_grant) >= PREFETCH_MIN_GRANT
            && l.budget() < u64::from(l.last_grant) / 4
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const S: u64 = 1_000_000;
    const WALL: u64 = 1_780_000_000 * S;

    fn w(requests: u64, secs: u64) -> Window {
        Window::every(requests, Duration::from_secs(secs))
    }

    fn grant(granted: u64, available: u64, period: u64, ledger: u64) -> Grant {
        Grant {
            granted,
            available,
            reset_us: 30 * S,
            retry_us: if granted == 0 { 30 * S } else { 0 },
            period,
            ledger: Some(ledger),
        }
    }

    #[test]
    fn a_fresh_lease_takes_its_period_from_the_wall_clock() {
        let l = Lease::fresh(&w(100, 60), Algorithm::FixedWindow, 5 * S, WALL + 7 * S);
        assert_eq!(l.period, WALL - WALL % (60 * S));
        assert_eq!(l.expires - 5 * S, l.period + 60 * S - (WALL + 7 * S));
        assert_eq!((l.budget(), l.available), (0, 100));
    }

    #[test]
    fn budget_is_ledger_minus_consumed_and_a_lost_grant_comes_back() {
        let mut leases = [Lease::fresh(&w(100, 60), Algorithm::FixedWindow, 0, WALL)];
        let period = leases[0].period;
        assert_eq!(local(&mut leases, 1, 0), None);
        let (asks, reserved) = ask(&mut leases, Algorithm::FixedWindow, 1);
        assert_eq!(asks[0].need, 1);
        // Redis granted 10 (the request's 1 among them).
        let (ok, _) = apply(
            &mut leases,
            Algorithm::FixedWindow,
            &asks,
            &reserved,
            &[grant(10, 90, period, 10)],
            0,
            1,
            false,
        );
        assert!(ok);
        assert_eq!(
            (leases[0].ledger, leases[0].consumed, leases[0].budget()),
            (10, 1, 9)
        );
        // A later call whose answer was lost: Redis granted 20 more. The
        // next answer's ledger brings them back.
        let mut sync = leases[0].sync(Algorithm::FixedWindow);
        sync.floor = 10;
        apply(
            &mut leases,
            Algorithm::FixedWindow,
            &[sync],
            &[0],
            &[Grant {
                granted: 0,
                ..grant(0, 70, period, 30)
            }],
            2,
            3,
            true,
        );
        assert_eq!(leases[0].budget(), 29);
    }

    #[test]
    fn fallback_admits_a_share_of_what_was_left_and_counts_it_later() {
        let mut leases = [Lease::fresh(&w(90, 60), Algorithm::FixedWindow, 0, WALL)];
        // Never answered: a third of the whole limit for one of 3 instances.
        let admitted = (0..40).filter(|_| fallback(&mut leases, 1, 3, 1).0).count();
        assert_eq!(admitted, 30);
        assert_eq!(leases[0].pending(), 30);
        assert_eq!(leases[0].sync(Algorithm::FixedWindow).floor, 30);
        // Refused by Redis: refused in fallback too.
        leases[0].over_until = 10;
        leases[0].consumed = 0;
        assert!(!fallback(&mut leases, 1, 3, 5).0);
    }

    #[test]
    fn a_window_put_back_in_its_period_starts_from_what_its_lease_knew() {
        let algo = Algorithm::FixedWindow;
        let mut held = Slots::from_vec(vec![Lease::fresh(&w(90, 60), algo, 0, WALL)]);
        // Redis said 30 were left; then, unreachable, the instance admitted
        // its share (10 of 3 instances' 30) and 2 more from its ledger of 2.
        held.slice_mut()[0].ledger = 2;
        held.slice_mut()[0].available = 30;
        let admitted = (0..40)
            .filter(|_| fallback(held.slice_mut(), 1, 3, 1).0)
            .count();
        assert_eq!(admitted, 12);
        // A reload moves the window to another length: the lease goes.
        let gone = align(&mut held, &[w(90, 61)], algo, 2, WALL, |_| false);
        assert_eq!(gone.len(), 1);
        let ghost = Ghost::of(&gone[0]);
        assert_eq!((ghost.available, ghost.own), (30, 10));
        // And back, in the same period: nothing more on its own.
        let _ = align(&mut held, &[w(90, 60)], algo, 3, WALL, |l| {
            ghost.haunt(l, algo, 3, 3)
        });
        assert_eq!(held.slice()[0].available, 0);
        assert!(!fallback(held.slice_mut(), 1, 3, 4).0);
        // Under a limit raised by 30 meanwhile: 30 more for the fleet.
        let mut fresh = Slots::from_vec(vec![]);
        let _ = align(&mut fresh, &[w(120, 60)], algo, 5, WALL, |l| {
            ghost.haunt(l, algo, 3, 5)
        });
        assert_eq!(fresh.slice()[0].available, 30);
        // A ghost of an ended period, or of another one, tells nothing.
        let mut later = Lease::fresh(&w(90, 60), algo, 0, WALL + 60 * S);
        assert!(!ghost.haunt(&mut later, algo, 3, 5));
        assert_eq!(later.available, 90);
        assert!(!ghost.haunt(&mut later, algo, 3, ghost.expires));
    }

    #[test]
    fn refunds_go_back_only_to_the_period_charged() {
        let mut l = Lease::fresh(&w(10, 60), Algorithm::FixedWindow, 0, WALL);
        l.ledger = 5;
        l.consumed = 5;
        let period = l.period;
        refund(&mut l, 2, period + 60 * S, 1);
        assert_eq!(l.consumed, 5);
        refund(&mut l, 2, period, 1);
        assert_eq!(l.consumed, 3);
        assert!(!extra(&mut l, 2, 1));
        assert!(extra(&mut l, 1, 1));
        assert_eq!(l.pending(), 1);
    }

    #[test]
    fn a_new_limit_keeps_the_lease_name_and_what_it_admitted_and_returns_its_budget() {
        let algo = Algorithm::FixedWindow;
        let mut held = Slots::from_vec(vec![Lease::fresh(&w(100, 60), algo, 0, WALL)]);
        let old = held.slice()[0];
        {
            let l = &mut held.slice_mut()[0];
            l.ledger = 40;
            l.consumed = 15;
            l.available = 50;
        }
        let dropped = align(&mut held, &[w(80, 60)], algo, 1, WALL, |_| false);
        // No hand-back of its own: the successor's next call makes it.
        assert!(dropped.is_empty(), "{dropped:?}");
        let l = held.slice()[0];
        assert_eq!(l.incarnation, old.incarnation);
        assert_eq!(
            (l.consumed, l.ledger, l.budget(), l.held()),
            (15, 15, 0, 25)
        );
        // Used 50 of the old limit: 30 of the new one are left.
        assert_eq!(l.available, 30);
        // The next call hands the 25 back and states the 15 admitted.
        let ask = l.sync(algo);
        assert_eq!(
            (ask.back, ask.floor, ask.incarnation),
            (25, 15, old.incarnation)
        );
        // Its budget is not spent under the new limit.
        let mut leases = [l];
        assert_eq!(local(&mut leases, 1, 2), None);
        // Without Redis (one instance): what it admitted and the 30 left;
        // the budget on its way back is not spent.
        let admitted = (0..60).filter(|_| fallback(&mut leases, 1, 1, 2).0).count();
        assert_eq!(admitted, 30);
        assert_eq!(leases[0].consumed, 45);
    }

    #[test]
    fn a_gcra_lease_under_a_new_limit_carries_what_it_admitted_on_its_own() {
        let algo = Algorithm::Gcra;
        let mut held = Slots::from_vec(vec![Lease::fresh(&w(30, 60), algo, 0, WALL)]);
        {
            let l = &mut held.slice_mut()[0];
            l.ledger = 0;
            l.consumed = 10;
        }
        let dropped = align(&mut held, &[w(31, 60)], algo, 1, WALL, |_| false);
        // The old lease's hand-back charges nothing more: the 10 moved.
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].pending(), 0);
        let mut leases = [held.slice()[0]];
        assert_eq!(leases[0].pending(), 10);
        // A third of 31 for one of three instances: 10 are already used.
        assert!(!fallback(&mut leases, 1, 3, 2).0);
    }

    #[test]
    fn what_a_gone_lease_gets_back() {
        let ask = Ask {
            need: 2,
            period: Some(7),
            floor: 5,
            back: 0,
            consumed: Some(5),
            incarnation: 3,
        };
        let g = |granted| Grant {
            granted,
            available: 10,
            reset_us: S,
            retry_us: 0,
            period: 7,
            ledger: Some(9),
        };
        // Admitted: the grant beyond the request's own units.
        assert_eq!(orphaned(&ask, 1, &g(6), true), 4);
        // Refused: the grant and the units reserved from the budget.
        assert_eq!(orphaned(&ask, 1, &g(0), false), 1);
        // Refused in a later period: the reserved units were the last one's.
        let later = Grant { period: 8, ..g(0) };
        assert_eq!(orphaned(&ask, 1, &later, false), 0);
        let back = give_back(7, 4, 3);
        assert_eq!(
            (back.need, back.floor, back.back, back.consumed),
            (0, 0, 4, None)
        );
    }

    #[test]
    fn a_hand_back_drops_the_budget_at_once_and_keeps_the_floor() {
        let mut l = Lease::fresh(&w(100, 60), Algorithm::FixedWindow, 0, WALL);
        l.ledger = 40;
        l.consumed = 15;
        let ask = hand_back(&mut l, Algorithm::FixedWindow);
        assert_eq!((ask.back, ask.floor, ask.need), (25, 15, 0));
        assert_eq!(l.budget(), 0);
    }
}
