//! Sliding anti-replay window over 64-bit packet counters, in the style of RFC 6479.
//!
//! The window remembers which of the [`REPLAY_WINDOW`] most recent counter values (ending at
//! the highest counter accepted so far) have been seen. A counter is accepted when
//!
//! - it is not `u64::MAX` (reserved, never sent), and
//! - it is above the highest accepted counter, or it is at most `REPLAY_WINDOW - 1` below
//!   it and has not been accepted before.
//!
//! Everything further back is rejected as too old, even if it was never seen.
//!
//! The bitmap is a ring of `REPLAY_WINDOW / 64 + 1` words indexed by `counter / 64`. The one
//! extra word is RFC 6479's trick: the word that holds the highest counter is only partly
//! inside the window, so with one spare word a full `REPLAY_WINDOW` counters behind the
//! highest are always representable, and moving the window forward only ever clears whole
//! words (never single bits). Both [`ReplayWindow::check`] and [`ReplayWindow::update`] are
//! O(1); a forward jump clears at most `REPLAY_WINDOW / 64 + 1` words, and each word is
//! cleared at most once per 64 counters the window advances. Memory is fixed (528 bytes).
//!
//! Callers authenticate a packet before they call [`ReplayWindow::update`]: an unauthenticated
//! counter must never move the window, or a forger could push it past genuine packets.

use super::limits::REPLAY_WINDOW;
use std::fmt;

const WORD_BITS: u64 = u64::BITS as u64;
/// Words in the ring: the window plus one partially used word.
const WORDS: usize = (REPLAY_WINDOW / WORD_BITS) as usize + 1;

const _: () = assert!(REPLAY_WINDOW > 0 && REPLAY_WINDOW % WORD_BITS == 0);

/// Replay state of one key's counters. See the module documentation for the exact rule.
#[derive(Clone)]
pub struct ReplayWindow {
    /// One more than the highest accepted counter; 0 while nothing was accepted (the bitmap
    /// is then all zero). Never exceeds `u64::MAX` because `u64::MAX` is never accepted.
    next: u64,
    /// Bit `c % 64` of word `(c / 64) % WORDS` is set iff counter `c` (inside the window) was
    /// accepted.
    bitmap: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayWindow")
            .field("highest", &self.highest())
            .finish_non_exhaustive()
    }
}

/// Ring word index and bit mask of a counter.
#[inline(always)]
fn slot(counter: u64) -> (usize, u64) {
    let word = ((counter / WORD_BITS) % WORDS as u64) as usize;
    (word, 1u64 << (counter % WORD_BITS))
}

impl ReplayWindow {
    /// An empty window: every counter except `u64::MAX` would be accepted.
    pub const fn new() -> Self {
        ReplayWindow {
            next: 0,
            bitmap: [0; WORDS],
        }
    }

    /// The highest counter accepted so far.
    pub fn highest(&self) -> Option<u64> {
        self.next.checked_sub(1)
    }

    /// Whether `counter` would be accepted now. Does not change the window: use it to drop
    /// obvious replays cheaply, and call [`ReplayWindow::update`] after authentication.
    #[inline]
    pub fn check(&self, counter: u64) -> bool {
        if counter == u64::MAX {
            return false;
        }
        if counter >= self.next {
            return true;
        }
        // counter < next here, so the subtraction cannot underflow.
        if self.next - counter > REPLAY_WINDOW {
            return false;
        }
        let (word, mask) = slot(counter);
        self.bitmap[word] & mask == 0
    }

    /// Accepts and records `counter` if [`ReplayWindow::check`] allows it; returns whether it
    /// did. Call only for authenticated packets.
    #[inline]
    pub fn update(&mut self, counter: u64) -> bool {
        if !self.check(counter) {
            return false;
        }
        if counter >= self.next {
            // The window moves forward: every ring word of a block after the current highest
            // block up to the new block held counters that are now out of the window (or were
            // never used), so it is cleared. When `next == 0` the bitmap is still all zero.
            if let Some(highest) = self.highest() {
                let old_block = highest / WORD_BITS;
                let new_block = counter / WORD_BITS;
                let advance = new_block - old_block;
                if advance >= WORDS as u64 {
                    self.bitmap = [0; WORDS];
                } else {
                    for block in old_block + 1..=new_block {
                        self.bitmap[(block % WORDS as u64) as usize] = 0;
                    }
                }
            }
            // counter < u64::MAX (checked above), so this does not overflow.
            self.next = counter + 1;
        }
        let (word, mask) = slot(counter);
        self.bitmap[word] |= mask;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    const W: u64 = REPLAY_WINDOW;

    /// The obvious specification: every accepted counter in a set, and the highest.
    #[derive(Default)]
    struct Reference {
        seen: HashSet<u64>,
        highest: Option<u64>,
    }

    impl Reference {
        fn check(&self, c: u64) -> bool {
            if c == u64::MAX || self.seen.contains(&c) {
                return false;
            }
            match self.highest {
                None => true,
                Some(h) => c > h || h - c < W,
            }
        }
        fn update(&mut self, c: u64) -> bool {
            if !self.check(c) {
                return false;
            }
            self.seen.insert(c);
            self.highest = Some(self.highest.map_or(c, |h| h.max(c)));
            true
        }
    }

    #[test]
    fn in_order() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.highest(), None);
        for c in 0..3 * W + 17 {
            assert!(w.check(c));
            assert!(w.update(c), "{c}");
            assert!(!w.check(c));
            assert!(!w.update(c));
        }
        assert_eq!(w.highest(), Some(3 * W + 16));
    }

    #[test]
    fn out_of_order_within_window() {
        let mut w = ReplayWindow::new();
        assert!(w.update(W + 500));
        // Every counter of the window below the highest is still acceptable, once.
        for c in (501..W + 500).rev() {
            assert!(w.check(c), "{c}");
            assert!(w.update(c), "{c}");
        }
        for c in 501..=W + 500 {
            assert!(!w.update(c), "{c}");
        }
        // The oldest value inside the window is highest - (W - 1); one further is too old.
        assert!(!w.check(500));
        assert!(!w.update(500));
        assert_eq!(w.highest(), Some(W + 500));
    }

    #[test]
    fn window_edge_exactly() {
        let mut w = ReplayWindow::new();
        assert!(w.update(10 * W));
        assert!(w.check(10 * W - (W - 1)));
        assert!(!w.check(10 * W - W));
        assert!(w.update(9 * W + 1));
        assert!(!w.update(9 * W));
        assert!(!w.check(0));
    }

    #[test]
    fn duplicates_rejected() {
        let mut w = ReplayWindow::new();
        for c in [5u64, 9, 7, 6, 8, 0, 63, 64, 65, 128] {
            assert!(w.update(c), "{c}");
        }
        for c in [5u64, 9, 7, 6, 8, 0, 63, 64, 65, 128] {
            assert!(!w.check(c), "{c}");
            assert!(!w.update(c), "{c}");
        }
        for c in [1u64, 2, 3, 4, 10, 62, 66, 127, 129] {
            assert!(w.check(c), "{c}");
        }
    }

    #[test]
    fn too_old_rejected_even_if_unseen() {
        let mut w = ReplayWindow::new();
        assert!(w.update(0));
        assert!(w.update(W));
        assert!(!w.check(0));
        assert!(w.check(1));
        assert!(w.update(5 * W));
        for c in [1u64, W, 4 * W - 1, 4 * W] {
            assert!(!w.check(c), "{c}");
            assert!(!w.update(c), "{c}");
        }
        // The oldest counter still inside the window.
        assert!(w.update(4 * W + 1));
    }

    #[test]
    fn reserved_max_counter() {
        let mut w = ReplayWindow::new();
        assert!(!w.check(u64::MAX));
        assert!(!w.update(u64::MAX));
        assert!(w.update(u64::MAX - 1));
        assert_eq!(w.highest(), Some(u64::MAX - 1));
        assert!(!w.update(u64::MAX));
        assert!(!w.update(u64::MAX - 1));
        assert!(w.update(u64::MAX - W));
        assert!(!w.update(u64::MAX - W - 1));
    }

    #[test]
    fn big_jumps_clear_the_bitmap() {
        // For jumps around the ring size, every counter marked before the jump must either be
        // rejected as too old or still be remembered; nothing stale may survive as a
        // "seen" bit for a counter that has not been received.
        let ring = WORDS as u64 * WORD_BITS;
        for jump in [
            1,
            63,
            64,
            65,
            W - 1,
            W,
            W + 1,
            W + 63,
            W + 64,
            ring - 1,
            ring,
            ring + 1,
            2 * ring + 5,
            1 << 40,
        ] {
            for start in [0u64, 1, 63, 64, 100, W - 1] {
                let mut w = ReplayWindow::new();
                let mut r = Reference::default();
                // Fill a full window below and including `start + W`.
                let top = start + W;
                for c in start + 1..=top {
                    assert_eq!(w.update(c), r.update(c));
                }
                let new = top + jump;
                assert!(w.update(new));
                assert!(r.update(new));
                let low = new.saturating_sub(W + 2 * WORD_BITS);
                for c in low..=new + 2 {
                    assert_eq!(w.check(c), r.check(c), "jump {jump} start {start} c {c}");
                }
            }
        }
    }

    /// Counter sequences that stay mostly near the top of the window, with occasional big
    /// jumps and values near the reserved maximum.
    fn step() -> impl Strategy<Value = (u8, u64)> {
        (0u8..10, any::<u64>())
    }

    fn next_counter(highest: Option<u64>, (kind, v): (u8, u64)) -> u64 {
        let h = highest.unwrap_or(0);
        match kind {
            // Close to the highest, either side: in order, reordering, duplicates, too old.
            0..=5 => h.wrapping_add(v % (2 * W + 200)).wrapping_sub(W + 100),
            // Slightly ahead.
            6 => h.saturating_add(v % 300),
            // Jumps of up to a few ring sizes.
            7 => h.saturating_add(v % (4 * W)),
            // Anywhere.
            8 => v,
            // Near the reserved maximum.
            _ => u64::MAX - (v % (W + 10)),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn matches_reference_model(steps in proptest::collection::vec(step(), 1..400)) {
            let mut w = ReplayWindow::new();
            let mut r = Reference::default();
            for (i, s) in steps.into_iter().enumerate() {
                let c = next_counter(r.highest, s);
                prop_assert_eq!(w.check(c), r.check(c), "check {}", c);
                prop_assert_eq!(w.update(c), r.update(c), "update {}", c);
                prop_assert_eq!(w.highest(), r.highest);
                // Every so often compare the whole window and its surroundings.
                if i % 32 == 0 {
                    let h = r.highest.unwrap_or(0);
                    for c in h.saturating_sub(W + 130)..=h.saturating_add(130) {
                        prop_assert_eq!(w.check(c), r.check(c), "scan {}", c);
                    }
                }
            }
        }
    }
}
