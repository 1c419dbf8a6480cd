//! The three window algorithms as pure functions on a small state, shared by
//! the in-process store and mirrored by the Lua scripts in `lua/`.
//!
//! Times are microseconds since the Unix epoch. A check never changes state;
//! `commit` charges an admitted cost. Refused requests are never charged.

use crate::config::{Algorithm, Calendar, Window};

const DAY_US: u64 = 86_400_000_000;

/// The periods a window counts in: every `n` microseconds from the epoch,
/// or calendar days and months (UTC). Calendar windows are counted as fixed
/// windows on the calendar, whatever the algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Every(u64),
    Day,
    Month,
}

impl Period {
    pub fn of(w: &Window) -> Period {
        match w.calendar {
            Some(Calendar::Day) => Period::Day,
            Some(Calendar::Month) => Period::Month,
            None => Period::Every((w.window.as_micros() as u64).max(1)),
        }
    }

    /// Start and end (exclusive) of the period that holds `now`.
    pub fn bounds(self, now: u64) -> (u64, u64) {
        match self {
            Period::Every(w) => {
                let start = now - now % w;
                (start, start.saturating_add(w))
            }
            Period::Day => {
                let start = now - now % DAY_US;
                (start, start + DAY_US)
            }
            Period::Month => {
                let (y, m, _) = civil_from_days((now / DAY_US) as i64);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let day = |y, m| days_from_civil(y, m, 1).max(0) as u64 * DAY_US;
                (day(y, m), day(ny, nm))
            }
        }
    }

    /// The period's length (the longest, for months): for algorithms that
    /// need one and for how long state is kept.
    pub fn length(self) -> u64 {
        match self {
            Period::Every(w) => w,
            Period::Day => DAY_US,
            Period::Month => 31 * DAY_US,
        }
    }

    /// How a window of this period counts under `algo`.
    pub fn counted_by(self, algo: Algorithm) -> Algorithm {
        match self {
            Period::Every(_) => algo,
            Period::Day | Period::Month => Algorithm::FixedWindow,
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the civil-calendar
/// algorithm also used by `lua/prelude.lua`).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number: the inverse of `days_from_civil`.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowState {
    /// Start of the current fixed window (fixed and sliding).
    pub start: u64,
    pub count: u64,
    /// Count of the previous window (sliding).
    pub prev: u64,
    /// Theoretical arrival time (gcra).
    pub tat: u64,
}

impl WindowState {
    pub const EMPTY: WindowState = WindowState {
        start: 0,
        count: 0,
        prev: 0,
        tat: 0,
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// Units left after this request (after charging it, when allowed).
    pub remaining: u64,
    /// Microseconds until the window is whole again.
    pub reset_us: u64,
    /// Microseconds until a request of this cost could pass (refusals).
    pub retry_us: u64,
}

/// Moves a fixed/sliding state into the period that contains `now`; returns
/// the period's end.
fn roll(s: &mut WindowState, now: u64, period: Period) -> u64 {
    let (start, end) = period.bounds(now);
    if s.start != start {
        s.prev = if period.bounds(s.start).1 == start {
            s.count
        } else {
            0
        };
        s.count = 0;
        s.start = start;
    }
    end
}

pub fn check(
    algo: Algorithm,
    s: &mut WindowState,
    now: u64,
    limit: u64,
    period: Period,
    cost: u64,
) -> Outcome {
    let window = period.length();
    match period.counted_by(algo) {
        Algorithm::FixedWindow => {
            let end = roll(s, now, period);
            let reset = end - now;
            let allowed = s.count.saturating_add(cost) <= limit;
            let used = if allowed { s.count + cost } else { s.count };
            Outcome {
                allowed,
                remaining: limit.saturating_sub(used),
                reset_us: reset,
                retry_us: if allowed { 0 } else { reset },
            }
        }
        Algorithm::SlidingWindow => {
            roll(s, now, period);
            let elapsed = now - s.start;
            // prev is weighted by the share of the previous window still inside
            // the sliding window; integer maths, rounded up so it never under-counts.
            let weighted_prev =
                (s.prev as u128 * (window - elapsed) as u128).div_ceil(window as u128) as u64;
            let used = weighted_prev.saturating_add(s.count);
            let allowed = used.saturating_add(cost) <= limit;
            let after = if allowed { used + cost } else { used };
            let retry = if allowed {
                0
            } else if s.count.saturating_add(cost) > limit {
                // Not even an empty previous window would make room: wait for
                // the next window, whose own previous is this one.
                let next_prev_room = limit.saturating_sub(cost);
                let wait_in_next = if s.count == 0 || s.count <= next_prev_room {
                    0
                } else {
                    let excess = (s.count - next_prev_room) as u128;
                    (excess * window as u128).div_ceil(s.count as u128) as u64
                };
                (window - elapsed) + wait_in_next.min(window)
            } else {
                // Room appears as the previous window slides out: the first
                // moment its weight, rounded up, fits what is left.
                let room = (limit - s.count - cost) as u128;
                let at = window - ((room * window as u128) / s.prev.max(1) as u128) as u64;
                at.saturating_sub(elapsed).max(1).min(window - elapsed)
            };
            Outcome {
                allowed,
                remaining: limit.saturating_sub(after),
                reset_us: window - elapsed,
                retry_us: retry,
            }
        }
        Algorithm::Gcra => {
            // Emission interval: one unit every window/limit.
            let interval = (window / limit.max(1)).max(1);
            let tat = s.tat.max(now);
            let new_tat = tat.saturating_add(cost.saturating_mul(interval));
            let allowed = new_tat - now <= window;
            let backlog = if allowed { new_tat - now } else { tat - now };
            Outcome {
                allowed,
                remaining: window.saturating_sub(backlog) / interval,
                reset_us: backlog,
                retry_us: if allowed { 0 } else { new_tat - now - window },
            }
        }
    }
}

/// Charges `cost` to a state that `check` has just admitted at `now`.
pub fn commit(
    algo: Algorithm,
    s: &mut WindowState,
    now: u64,
    limit: u64,
    period: Period,
    cost: u64,
) {
    let window = period.length();
    match period.counted_by(algo) {
        Algorithm::FixedWindow | Algorithm::SlidingWindow => {
            roll(s, now, period);
            s.count = s.count.saturating_add(cost);
        }
        Algorithm::Gcra => {
            let interval = (window / limit.max(1)).max(1);
            s.tat = s.tat.max(now).saturating_add(cost.saturating_mul(interval));
        }
    }
}

/// Takes back a charge (a later window refused the request).
pub fn refund(
    algo: Algorithm,
    s: &mut WindowState,
    now: u64,
    limit: u64,
    period: Period,
    cost: u64,
) {
    let window = period.length();
    match period.counted_by(algo) {
        Algorithm::FixedWindow | Algorithm::SlidingWindow => {
            if s.start == period.bounds(now).0 {
                s.count = s.count.saturating_sub(cost);
            }
        }
        Algorithm::Gcra => {
            let interval = (window / limit.max(1)).max(1);
            s.tat = s
                .tat
                .saturating_sub(cost.saturating_mul(interval))
                .max(now.min(s.tat));
        }
    }
}

/// True once nothing in the state can affect a future decision.
pub fn is_stale(algo: Algorithm, s: &WindowState, now: u64, period: Period) -> bool {
    let window = period.length();
    match period.counted_by(algo) {
        Algorithm::FixedWindow => period.bounds(s.start).1 <= now,
        Algorithm::SlidingWindow => s.start + 2 * window <= now,
        Algorithm::Gcra => s.tat <= now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;
    const P5: Period = Period::Every(5 * S);

    fn run(algo: Algorithm, limit: u64, window: Period, times: &[u64]) -> Vec<bool> {
        let mut s = WindowState::EMPTY;
        times
            .iter()
            .map(|&t| {
                let o = check(algo, &mut s, t, limit, window, 1);
                if o.allowed {
                    commit(algo, &mut s, t, limit, window, 1);
                }
                o.allowed
            })
            .collect()
    }

    #[test]
    fn fixed_window_counts_down_and_resets() {
        let mut s = WindowState::EMPTY;
        let t0 = 100 * S;
        let remaining: Vec<u64> = (0..6)
            .map(|_| {
                let o = check(Algorithm::FixedWindow, &mut s, t0, 5, P5, 1);
                if o.allowed {
                    commit(Algorithm::FixedWindow, &mut s, t0, 5, P5, 1);
                }
                o.remaining
            })
            .collect();
        assert_eq!(remaining, vec![4, 3, 2, 1, 0, 0]);
        let o = check(Algorithm::FixedWindow, &mut s, t0 + S, 5, P5, 1);
        assert!(!o.allowed);
        assert_eq!(o.retry_us, 4 * S);
        assert!(check(Algorithm::FixedWindow, &mut s, t0 + 5 * S, 5, P5, 1).allowed);
    }

    #[test]
    fn refused_requests_are_not_counted() {
        let times: Vec<u64> = (0..100).map(|i| 100 * S + i).collect();
        let allowed = run(Algorithm::FixedWindow, 3, Period::Every(S), &times);
        assert_eq!(allowed.iter().filter(|a| **a).count(), 3);
        // Next window: the hammering did not eat into it.
        let mut next: Vec<u64> = times.clone();
        next.extend((0..3).map(|i| 101 * S + i));
        assert_eq!(
            run(Algorithm::FixedWindow, 3, Period::Every(S), &next)
                .iter()
                .filter(|a| **a)
                .count(),
            6
        );
    }

    #[test]
    fn sliding_window_weights_the_previous_window() {
        let mut s = WindowState::EMPTY;
        let w = Period::Every(10 * S);
        for _ in 0..10 {
            commit(Algorithm::SlidingWindow, &mut s, 100 * S, 10, w, 1);
        }
        // Halfway through the next window, half of the previous 10 still count.
        let o = check(Algorithm::SlidingWindow, &mut s, 115 * S, 10, w, 1);
        assert!(o.allowed);
        assert_eq!(o.remaining, 4);
        for _ in 0..5 {
            commit(Algorithm::SlidingWindow, &mut s, 115 * S, 10, w, 1);
        }
        let o = check(Algorithm::SlidingWindow, &mut s, 115 * S, 10, w, 1);
        assert!(!o.allowed);
        assert!(o.retry_us > 0 && o.retry_us <= 5 * S, "{}", o.retry_us);
    }

    #[test]
    fn gcra_spaces_requests_and_allows_a_burst() {
        let w = Period::Every(10 * S); // 10 per 10 s: one per second, burst 10
        let burst: Vec<u64> = (0..12).map(|_| 100 * S).collect();
        assert_eq!(
            run(Algorithm::Gcra, 10, w, &burst)
                .iter()
                .filter(|a| **a)
                .count(),
            10
        );
        let mut s = WindowState::EMPTY;
        for _ in 0..10 {
            commit(Algorithm::Gcra, &mut s, 100 * S, 10, w, 1);
        }
        let o = check(Algorithm::Gcra, &mut s, 100 * S, 10, w, 1);
        assert!(!o.allowed);
        assert_eq!(o.retry_us, S);
        assert!(check(Algorithm::Gcra, &mut s, 101 * S, 10, w, 1).allowed);
    }

    #[test]
    fn refunds_undo_commits() {
        for algo in [
            Algorithm::FixedWindow,
            Algorithm::SlidingWindow,
            Algorithm::Gcra,
        ] {
            let mut s = WindowState::EMPTY;
            let before = check(algo, &mut s, 100 * S, 5, P5, 1);
            commit(algo, &mut s, 100 * S, 5, P5, 2);
            refund(algo, &mut s, 100 * S, 5, P5, 2);
            assert_eq!(check(algo, &mut s, 100 * S, 5, P5, 1), before, "{algo:?}");
        }
    }

    /// Seconds since the epoch of midnight UTC on a date.
    fn midnight(y: i64, m: u32, d: u32) -> u64 {
        days_from_civil(y, m, d) as u64 * 86_400
    }

    #[test]
    fn civil_dates_round_trip() {
        // Known day numbers: the epoch, a leap day, the year 2000 and 2100.
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(
            civil_from_days(days_from_civil(2100, 3, 1) - 1),
            (2100, 2, 28)
        );
        for days in -1_000..200_000 {
            let (y, m, d) = civil_from_days(days);
            assert!((1..=12).contains(&m) && (1..=31).contains(&d));
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
    }

    #[test]
    fn calendar_periods_end_at_midnight_and_month_starts() {
        let at = |y, m, d, secs: u64| (midnight(y, m, d) + secs) * S;
        // 2024-02-29 13:00 UTC: the day ends at midnight, the month on 1 March.
        let now = at(2024, 2, 29, 13 * 3600);
        assert_eq!(
            Period::Day.bounds(now),
            (at(2024, 2, 29, 0), at(2024, 3, 1, 0))
        );
        assert_eq!(
            Period::Month.bounds(now),
            (at(2024, 2, 1, 0), at(2024, 3, 1, 0))
        );
        // December rolls into the next year; the last microsecond of a month
        // belongs to it, the next one starts the next month.
        let dec = at(2025, 12, 31, 86_399) + S - 1;
        assert_eq!(
            Period::Month.bounds(dec),
            (at(2025, 12, 1, 0), at(2026, 1, 1, 0))
        );
        assert_eq!(Period::Month.bounds(dec + 1).0, at(2026, 1, 1, 0));
    }

    #[test]
    fn calendar_windows_count_fixed_and_reset_at_the_boundary() {
        let end_of_april = (midnight(2026, 5, 1) - 10) * S;
        for algo in [Algorithm::FixedWindow, Algorithm::SlidingWindow] {
            let mut s = WindowState::EMPTY;
            for _ in 0..3 {
                let o = check(algo, &mut s, end_of_april, 3, Period::Month, 1);
                assert!(o.allowed);
                commit(algo, &mut s, end_of_april, 3, Period::Month, 1);
            }
            let o = check(algo, &mut s, end_of_april, 3, Period::Month, 1);
            assert!(!o.allowed);
            assert_eq!(o.retry_us, 10 * S, "{algo:?}");
            assert_eq!(o.reset_us, 10 * S);
            // Sliding would still weigh April in; a calendar month does not.
            let may = midnight(2026, 5, 1) * S;
            let o = check(algo, &mut s, may, 3, Period::Month, 1);
            assert!(o.allowed && o.remaining == 2, "{algo:?} {o:?}");
            assert_eq!(o.reset_us, 31 * 86_400 * S);
        }
    }
}
