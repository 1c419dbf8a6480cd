//! Compact per-key storage shared by the lease map (`hybrid`) and the
//! in-process store (`local`): each keeps one entry per key, so the size of
//! these types is most of the memory a key costs.

use super::algo::Period;
use crate::config::{Calendar, Window};
use std::num::NonZeroU64;
use std::time::Duration;

/// A window in 16 bytes instead of `Window`'s 32. Lossless for every window
/// a config can name (at most 366 days): the length in nanoseconds below
/// 2^62, the calendar in the two bits above, plus one so the value is never
/// zero (which lets `Slots` keep its tag inside an entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedWindow {
    pub requests: u64,
    span: NonZeroU64,
}

const SPAN_BITS: u32 = 62;
const LENGTH_MASK: u64 = (1 << SPAN_BITS) - 1;

impl PackedWindow {
    pub fn of(w: &Window) -> PackedWindow {
        let nanos = u64::try_from(w.window.as_nanos())
            .unwrap_or(u64::MAX)
            .min(LENGTH_MASK);
        let calendar: u64 = match w.calendar {
            None => 0,
            Some(Calendar::Day) => 1,
            Some(Calendar::Month) => 2,
        };
        PackedWindow {
            requests: w.requests,
            span: NonZeroU64::MIN.saturating_add((calendar << SPAN_BITS) | nanos),
        }
    }

    pub fn is(&self, w: &Window) -> bool {
        *self == PackedWindow::of(w)
    }

    /// Counted in the same counter as `w`: the same length or calendar
    /// (Redis names a window's counter by its length, not its limit). A
    /// reload that only changes a window's limit keeps what was counted.
    pub fn same_counter(&self, w: &Window) -> bool {
        self.span == PackedWindow::of(w).span
    }

    /// The counter's identity ([`PackedWindow::same_counter`]) as a number.
    pub fn counter(&self) -> u64 {
        self.span.get()
    }

    fn length_nanos(&self) -> u64 {
        (self.span.get() - 1) & LENGTH_MASK
    }

    fn calendar(&self) -> Option<Calendar> {
        match (self.span.get() - 1) >> SPAN_BITS {
            1 => Some(Calendar::Day),
            2 => Some(Calendar::Month),
            _ => None,
        }
    }

    pub fn window(&self) -> Window {
        match self.calendar() {
            Some(c) => Window::calendar(self.requests, c),
            None => Window::every(self.requests, Duration::from_nanos(self.length_nanos())),
        }
    }

    pub fn secs_f64(&self) -> f64 {
        self.length_nanos() as f64 / 1e9
    }

    /// `Period::of(&self.window())`, without building the window.
    pub fn period(&self) -> Period {
        match self.calendar() {
            Some(Calendar::Day) => Period::Day,
            Some(Calendar::Month) => Period::Month,
            None => Period::Every((self.length_nanos() / 1000).max(1)),
        }
    }
}

/// A key's per-window entries: inline when it has one window (the common
/// case), boxed when it has several.
pub enum Slots<T> {
    One(T),
    Many(Box<[T]>),
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots::Many(Box::new([]))
    }
}

impl<T: Copy> Slots<T> {
    /// Makes the entries one per window, in the windows' order: for each
    /// window the entry `keep` accepts stays (a window a reload kept keeps
    /// its state), and `fresh` makes one for any other. Returns the entries
    /// no window kept (nothing, and no allocation, when the windows are
    /// the same).
    pub fn align(
        &mut self,
        windows: &[Window],
        keep: impl Fn(&T, &Window) -> bool,
        fresh: impl Fn(&Window) -> T,
    ) -> Vec<T> {
        let held = self.slice();
        if held.len() == windows.len() && held.iter().zip(windows).all(|(e, w)| keep(e, w)) {
            return Vec::new();
        }
        let aligned = windows
            .iter()
            .map(|w| {
                held.iter()
                    .find(|e| keep(e, w))
                    .copied()
                    .unwrap_or_else(|| fresh(w))
            })
            .collect();
        let dropped = held
            .iter()
            .filter(|e| !windows.iter().any(|w| keep(e, w)))
            .copied()
            .collect();
        *self = Slots::from_vec(aligned);
        dropped
    }
}

impl<T> Slots<T> {
    pub fn from_vec(mut v: Vec<T>) -> Slots<T> {
        match v.len() {
            1 => Slots::One(v.remove(0)),
            _ => Slots::Many(v.into_boxed_slice()),
        }
    }

    pub fn slice(&self) -> &[T] {
        match self {
            Slots::One(l) => std::slice::from_ref(l),
            Slots::Many(v) => v,
        }
    }

    pub fn slice_mut(&mut self) -> &mut [T] {
        match self {
            Slots::One(l) => std::slice::from_mut(l),
            Slots::Many(v) => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packed_window_round_trips() {
        let windows = [
            Window::every(1, Duration::from_millis(1)),
            Window::every(100, Duration::from_secs(1)),
            Window::every(100, Duration::from_millis(1500)),
            Window::every(100, Duration::from_nanos(1500)),
            Window::every(u64::MAX, Duration::from_secs(366 * 86_400)),
            Window::every(100, Duration::from_secs(86_400)),
            Window::calendar(100, Calendar::Day),
            Window::calendar(100, Calendar::Month),
            Window::calendar(101, Calendar::Month),
        ];
        assert_eq!(std::mem::size_of::<PackedWindow>(), 16);
        for (i, w) in windows.iter().enumerate() {
            let packed = PackedWindow::of(w);
            assert_eq!(packed.window(), *w, "{w:?}");
            assert_eq!(packed.secs_f64(), w.window.as_secs_f64(), "{w:?}");
            assert_eq!(packed.period(), Period::of(w), "{w:?}");
            assert!(packed.is(w));
            for (j, other) in windows.iter().enumerate() {
                assert_eq!(packed.is(other), i == j, "{w:?} against {other:?}");
            }
        }
    }

    #[test]
    fn aligning_keeps_the_entries_of_windows_that_stay() {
        let (a, b, c) = (
            Window::every(1, Duration::from_secs(1)),
            Window::every(2, Duration::from_secs(1)),
            Window::every(3, Duration::from_secs(1)),
        );
        // An entry: the window's limit and a count.
        let keep = |e: &(u64, u64), w: &Window| e.0 == w.requests;
        let fresh = |w: &Window| (w.requests, 0);
        let mut slots = Slots::default();
        assert!(slots.align(&[a], keep, fresh).is_empty());
        assert!(matches!(slots, Slots::One((1, 0))));
        slots.slice_mut()[0].1 = 7;
        let _ = slots.align(&[a], keep, fresh);
        assert_eq!(slots.slice(), &[(1, 7)]);
        let _ = slots.align(&[b, a], keep, fresh);
        assert_eq!(slots.slice(), &[(2, 0), (1, 7)]);
        slots.slice_mut()[0].1 = 5;
        // The entry of a window no longer named comes back.
        assert_eq!(slots.align(&[c, b], keep, fresh), vec![(1, 7)]);
        assert_eq!(slots.slice(), &[(3, 0), (2, 5)]);
        let _ = slots.align(&[b], keep, fresh);
        assert!(matches!(slots, Slots::One((2, 5))));
    }

    #[test]
    fn one_entry_is_held_inline_in_the_same_space() {
        #[derive(Clone, Copy)]
        struct Entry {
            _window: PackedWindow,
            _state: [u64; 4],
        }
        assert_eq!(std::mem::size_of::<Slots<Entry>>(), 48);
        let mut one = Slots::from_vec(vec![1u8]);
        assert!(matches!(one, Slots::One(1)));
        one.slice_mut()[0] = 2;
        assert_eq!(one.slice(), &[2]);
        let many = Slots::from_vec(vec![1u8, 2]);
        assert_eq!(many.slice(), &[1, 2]);
        assert!(Slots::<u8>::default().slice().is_empty());
    }
}
