//! Time as the crate uses it: whole seconds (token expiry) and microseconds
//! (windows kept in process) since the Unix epoch, and a monotonic
//! [`Instant`]. A clock set before 1970 reads as 0 rather than failing.
//!
//! The monotonic clock is tokio's, which is the system's in the binary and
//! can be paused and advanced by hand in tests. Unit tests can also put the
//! wall clock of their thread on that virtual time ([`virtual_wall`]), so
//! the limiter's simulation runs whole minutes of traffic in milliseconds,
//! the same way every time.

use std::time::{SystemTime, UNIX_EPOCH};

pub use tokio::time::Instant;

#[cfg(test)]
thread_local! {
    /// Wall-clock microseconds at `Instant`, for this thread's virtual wall clock.
    static VIRTUAL_WALL: std::cell::Cell<Option<(u64, Instant)>> = const { std::cell::Cell::new(None) };
}

/// From now on this thread's wall clock reads `wall_us` plus the time the
/// (virtual) monotonic clock moves; `None` goes back to the system's.
#[cfg(test)]
pub fn virtual_wall(wall_us: Option<u64>) {
    VIRTUAL_WALL.with(|v| v.set(wall_us.map(|w| (w, Instant::now()))));
}

fn system_us() -> u64 {
    #[cfg(test)]
    if let Some((wall, at)) = VIRTUAL_WALL.with(|v| v.get()) {
        return wall.saturating_add(u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX));
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

pub fn now_secs() -> u64 {
    system_us() / 1_000_000
}

pub fn now_us() -> u64 {
    system_us()
}
