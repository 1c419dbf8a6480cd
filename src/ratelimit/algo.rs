//! The three window algorithms as pure functions on a small state, shared by
//! the in-process store and mirrored by the Lua scripts in `lua/`.
//!
//! Times are microseconds since the Unix epoch. A check never changes state;
//! `commit` charges an admitted cost. Refused requests are never charged.

use crate::config::Algorithm;

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

/// Moves a fixed/sliding state into the window that contains `now`.
fn roll(s: &mut WindowState, now: u64, window: u64) {
    let start = now - now % window;
    if s.start != start {
        s.prev = if s.start + window == start {
            s.count
        } else {
            0
        };
        s.count = 0;
        s.start = start;
    }
}

pub fn check(
    algo: Algorithm,
    s: &mut WindowState,
    now: u64,
    limit: u64,
    window: u64,
    cost: u64,
) -> Outcome {
    match algo {
        Algorithm::FixedWindow => {
            roll(s, now, window);
            let reset = s.start + window - now;
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
            roll(s, now, window);
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
                // Room appears as the previous window slides out.
                let room_needed = (used.saturating_add(cost) - limit) as u128;
                ((room_needed * window as u128).div_ceil(s.prev.max(1) as u128) as u64)
                    .min(window - elapsed)
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
pub fn commit(algo: Algorithm, s: &mut WindowState, now: u64, limit: u64, window: u64, cost: u64) {
    match algo {
        Algorithm::FixedWindow | Algorithm::SlidingWindow => {
            roll(s, now, window);
            s.count = s.count.saturating_add(cost);
        }
        Algorithm::Gcra => {
            let interval = (window / limit.max(1)).max(1);
            s.tat = s.tat.max(now).saturating_add(cost.saturating_mul(interval));
        }
    }
}

/// Takes back a charge (a later window refused the request).
pub fn refund(algo: Algorithm, s: &mut WindowState, now: u64, limit: u64, window: u64, cost: u64) {
    match algo {
        Algorithm::FixedWindow | Algorithm::SlidingWindow => {
            if s.start == now - now % window {
                s.count = s.count.saturating_sub(cost);
            }
        }
        Algorithm::Gcra => {
            let interval = (window / limit.max(1)).max(1);
            s.tat = s.tat.saturating_sub(cost * interval).max(now.min(s.tat));
        }
    }
}

/// True once nothing in the state can affect a future decision.
pub fn is_stale(algo: Algorithm, s: &WindowState, now: u64, window: u64) -> bool {
    match algo {
        Algorithm::FixedWindow => s.start + window <= now,
        Algorithm::SlidingWindow => s.start + 2 * window <= now,
        Algorithm::Gcra => s.tat <= now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    fn run(algo: Algorithm, limit: u64, window: u64, times: &[u64]) -> Vec<bool> {
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
                let o = check(Algorithm::FixedWindow, &mut s, t0, 5, 5 * S, 1);
                if o.allowed {
                    commit(Algorithm::FixedWindow, &mut s, t0, 5, 5 * S, 1);
                }
                o.remaining
            })
            .collect();
        assert_eq!(remaining, vec![4, 3, 2, 1, 0, 0]);
        let o = check(Algorithm::FixedWindow, &mut s, t0 + S, 5, 5 * S, 1);
        assert!(!o.allowed);
        assert_eq!(o.retry_us, 4 * S);
        assert!(check(Algorithm::FixedWindow, &mut s, t0 + 5 * S, 5, 5 * S, 1).allowed);
    }

    #[test]
    fn refused_requests_are_not_counted() {
        let times: Vec<u64> = (0..100).map(|i| 100 * S + i).collect();
        let allowed = run(Algorithm::FixedWindow, 3, S, &times);
        assert_eq!(allowed.iter().filter(|a| **a).count(), 3);
        // Next window: the hammering did not eat into it.
        let mut next: Vec<u64> = times.clone();
        next.extend((0..3).map(|i| 101 * S + i));
        assert_eq!(
            run(Algorithm::FixedWindow, 3, S, &next)
                .iter()
                .filter(|a| **a)
                .count(),
            6
        );
    }

    #[test]
    fn sliding_window_weights_the_previous_window() {
        let mut s = WindowState::EMPTY;
        let w = 10 * S;
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
        let w = 10 * S; // 10 per 10 s: one per second, burst 10
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
            let before = check(algo, &mut s, 100 * S, 5, 5 * S, 1);
            commit(algo, &mut s, 100 * S, 5, 5 * S, 2);
            refund(algo, &mut s, 100 * S, 5, 5 * S, 2);
            assert_eq!(
                check(algo, &mut s, 100 * S, 5, 5 * S, 1),
                before,
                "{algo:?}"
            );
        }
    }
}
