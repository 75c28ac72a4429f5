//! A token bucket with an explicit clock: how fast an authenticated peer may make this node
//! work (issue 22 item 6), and how many packets a logged rule may send to NFLOG (issue 23).
//! Sans-IO: every method takes `now`, so tests run on virtual time. Imports nothing of the
//! crate (the bottom layer), so the transport and the datapath both use it.
//!
//! Used three ways. The sync shell *spends* (a message, its bytes) and then waits out the debt
//! before it reads the next message (`spend`, `wait`): nothing is dropped, the sender is
//! slowed by HTTP/2 flow control. The gate *asks* (`try_take`) and refuses a Raft RPC at once
//! when the caller's bucket is empty. A datapath worker asks (`try_take`) whether a packet of
//! a logged rule is logged; over the rate it is still decided, only not logged.
//!
//! Hand-written rather than `governor`: governor's limiters read their own clock (a fake one
//! only through its `clock` traits and quanta), its "wait" API sleeps on a runtime, and it has
//! no notion of spending more than the burst at once (a sync message of many bytes); the
//! arithmetic here is a dozen lines. Owns only the arithmetic: no clock, no I/O, no counters.

use std::time::{Duration, Instant};

/// A rate (units per second) with a burst: starts full at `burst` tokens, refills at `rate`
/// per second up to `burst`. Spending may go into debt (a message larger than the burst
/// still passes); `wait` says how long until the debt is paid. Kept in billionths of a token
/// (a unit per second is a billionth per nanosecond), so the arithmetic is exact.
#[derive(Clone, Debug)]
pub struct Bucket {
    /// Tokens per second = billionths per nanosecond.
    rate: i128,
    burst: i128,
    /// Billionths of a token; negative: in debt.
    level: i128,
    last: Instant,
}

const NANO: i128 = 1_000_000_000;

impl Bucket {
    /// A full bucket at `now`. A `rate` of 0 is taken as 1 (a limit of 0 means "no bucket",
    /// which is the caller's to decide).
    pub fn new(rate: u64, burst: u64, now: Instant) -> Bucket {
        Bucket {
            rate: i128::from(rate.max(1)),
            burst: i128::from(burst) * NANO,
            level: i128::from(burst) * NANO,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        // A `now` before the last one (callers on several threads) refills nothing.
        let dt = now.saturating_duration_since(self.last).as_nanos() as i128;
        self.level = (self.level + dt * self.rate).min(self.burst);
        self.last = self.last.max(now);
    }

    /// Take `n` tokens if there are that many; otherwise take nothing.
    pub fn try_take(&mut self, now: Instant, n: u64) -> bool {
        self.refill(now);
        let n = i128::from(n) * NANO;
        if self.level >= n {
            self.level -= n;
            true
        } else {
            false
        }
    }

    /// Spend `n` tokens, into debt if need be.
    pub fn spend(&mut self, now: Instant, n: u64) {
        self.refill(now);
        self.level -= i128::from(n) * NANO;
    }

    /// How long from `now` until the bucket is out of debt (zero when it is not in debt).
    pub fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.level >= 0 {
            return Duration::ZERO;
        }
        let ns = (-self.level + self.rate - 1) / self.rate;
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_full_bucket_grants_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, 10, t0);
        assert_eq!(
            (0..20).filter(|_| b.try_take(t0, 1)).count(),
            10,
            "the burst"
        );
        assert!(!b.try_take(t0, 1), "empty");
        // 100/s: one token every 10 ms.
        assert!(!b.try_take(t0 + ms(9), 1));
        assert!(b.try_take(t0 + ms(10), 1));
        assert!(!b.try_take(t0 + ms(10), 1));
        // Over one virtual second at most the rate (plus nothing: the burst is spent).
        let granted = (0..10_000)
            .filter(|i| b.try_take(t0 + ms(10) + Duration::from_micros(100 * i), 1))
            .count();
        assert!((99..=101).contains(&granted), "{granted}");
        // Idle time refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| b.try_take(later, 1)).count(), 10);
    }

    #[test]
    fn try_take_of_more_than_is_there_takes_nothing() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, 5, t0);
        assert!(!b.try_take(t0, 6));
        assert!(b.try_take(t0, 5), "the refused request left the tokens");
    }

    #[test]
    fn spending_goes_into_debt_and_wait_says_until_when() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, 100, t0);
        b.spend(t0, 100);
        assert_eq!(b.wait(t0), Duration::ZERO, "exactly empty is not in debt");
        // A spend larger than the burst passes; its debt takes 2 s at 1000/s.
        b.spend(t0, 2000);
        assert_eq!(b.wait(t0), ms(2000));
        assert_eq!(b.wait(t0 + ms(1500)), ms(500));
        assert_eq!(b.wait(t0 + ms(2000)), Duration::ZERO);
    }

    #[test]
    fn a_clock_that_goes_back_refills_nothing() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = Bucket::new(100, 1, t0);
        assert!(b.try_take(t0, 1));
        assert!(!b.try_take(t0 - ms(500), 1));
        assert!(
            !b.try_take(t0 + ms(5), 1),
            "the earlier call did not move the clock back"
        );
        assert!(b.try_take(t0 + ms(10), 1));
    }
}
