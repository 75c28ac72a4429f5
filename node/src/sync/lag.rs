//! Replication lag in time: how long the oldest item a peer has not acknowledged has waited.
//!
//! Owns `LagClock`, a sans-IO record of when our stream reached which sequence number. The
//! shell marks the stream's last sequence number at each status refresh and asks, per peer,
//! for the age of the first mark beyond what the peer acknowledged: the item after the peer's
//! acknowledgement existed by then, so the answer is a lower bound, exact to the refresh
//! interval. Memory is bounded: marks every peer has acknowledged are forgotten, and when a
//! peer stays behind for long the older marks are thinned (every other one dropped), so the
//! resolution of a long lag coarsens instead of the record growing. Must not touch sockets,
//! clocks or the table.

use std::collections::VecDeque;

use super::msg::Seq;
use crate::time::Timestamp;

/// Marks kept at most; beyond, the older half is thinned.
pub const MAX_MARKS: usize = 512;

/// When our stream reached which sequence number.
#[derive(Clone, Debug, Default)]
pub struct LagClock {
    /// `(last_seq, when)`, both increasing.
    marks: VecDeque<(Seq, Timestamp)>,
}

impl LagClock {
    /// Our stream's last sequence number is `last_seq` at `now`.
    pub fn mark(&mut self, last_seq: Seq, now: Timestamp) {
        if self.marks.back().is_some_and(|(s, _)| *s >= last_seq) {
            return;
        }
        self.marks.push_back((last_seq, now));
        if self.marks.len() > MAX_MARKS {
            // Drop every other mark of the older half; the newest marks keep their resolution.
            let half = self.marks.len() / 2;
            let mut i = 0;
            self.marks.retain(|_| {
                let keep = i >= half || i % 2 == 0;
                i += 1;
                keep
            });
        }
    }

    /// How long the first item after `acked` has waited at `now` (zero when every marked item
    /// is acknowledged).
    pub fn age(&self, acked: Seq, now: Timestamp) -> std::time::Duration {
        self.marks
            .iter()
            .find(|(s, _)| *s > acked)
            .map_or(std::time::Duration::ZERO, |(_, t)| now.since(*t))
    }

    /// Forget the marks every peer has acknowledged (`acked` is the smallest acknowledgement).
    pub fn forget_through(&mut self, acked: Seq) {
        while self.marks.front().is_some_and(|(s, _)| *s <= acked) {
            self.marks.pop_front();
        }
    }

    /// Marks held now.
    pub fn len(&self) -> usize {
        self.marks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.marks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t(ms: u64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    #[test]
    fn a_peer_that_has_everything_has_no_lag() {
        let mut c = LagClock::default();
        c.mark(10, t(100));
        assert_eq!(c.age(10, t(5_000)), Duration::ZERO);
        assert_eq!(c.age(12, t(5_000)), Duration::ZERO);
    }

    #[test]
    fn the_age_is_that_of_the_first_mark_beyond_the_acknowledgement() {
        let mut c = LagClock::default();
        c.mark(10, t(100));
        c.mark(10, t(200)); // nothing new: no mark
        c.mark(20, t(300));
        c.mark(30, t(400));
        assert_eq!(c.len(), 3);
        // Acked 15: item 16 existed by the mark at 300 ms.
        assert_eq!(c.age(15, t(1_300)), Duration::from_millis(1_000));
        assert_eq!(c.age(5, t(1_300)), Duration::from_millis(1_200));
        assert_eq!(c.age(30, t(1_300)), Duration::ZERO);
        c.forget_through(20);
        assert_eq!(c.len(), 1);
        assert_eq!(c.age(25, t(1_300)), Duration::from_millis(900));
    }

    #[test]
    fn a_peer_that_stays_behind_keeps_the_record_bounded_and_its_age_growing() {
        let mut c = LagClock::default();
        for i in 1..=100_000u64 {
            c.mark(i, t(i * 100));
            assert!(c.len() <= MAX_MARKS);
        }
        // The first mark (item 1 at 100 ms) is never thinned away: the age is exact.
        let now = t(100_000 * 100);
        assert_eq!(c.age(0, now), now.since(t(100)));
        // A recent acknowledgement keeps full resolution.
        assert_eq!(c.age(99_990, now), Duration::from_millis(900));
    }
}
