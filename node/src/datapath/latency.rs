//! The verdict-latency histogram: how long a packet waited in fwnode, from the read of the
//! netlink datagram that carried it out of its queue to the send of its verdict (for a packet
//! `defer` held: to its release).
//!
//! Owns the bucket bounds (declared once, here; the metric's catalog entry points at them), the
//! worker-local histogram that the packet loop updates with plain adds, and the shared copy it
//! publishes on its 100 ms tick for the metrics to read. Must not read a clock: the worker
//! passes durations in.
//!
//! What the clock does not see: the time a packet spent in the kernel's queue before fwnode
//! read it. The kernel stamps a queued packet (`NFQA_TIMESTAMP`) only when receive timestamps
//! are enabled machine-wide, which costs every packet of the host a clock read; the queue's
//! backlog (`keepstate_nfqueue_waiting_packets`) and `keepstate_nfqueue_kernel_drops_total` show
//! that wait instead.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// Upper bounds of the buckets, in microseconds (a last, unbounded bucket follows). From the
/// ~10 µs a lone packet costs to the 1 s a `defer` hold can reach.
pub const BOUNDS_US: [u32; 15] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000,
];

/// Buckets, the unbounded one included.
pub const BUCKETS: usize = BOUNDS_US.len() + 1;

/// A worker's own histogram: plain integers, updated per datagram without atomics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Latency {
    /// Packets per bucket (not cumulative).
    pub counts: [u64; BUCKETS],
    /// Sum of every packet's wait, in microseconds.
    pub sum_us: u64,
}

impl Latency {
    /// Record that `packets` packets each waited `waited`.
    #[inline]
    pub fn record(&mut self, waited: Duration, packets: u64) {
        if packets == 0 {
            return;
        }
        let us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        let i = BOUNDS_US.partition_point(|&b| u64::from(b) < us);
        self.counts[i] += packets;
        self.sum_us = self.sum_us.saturating_add(us.saturating_mul(packets));
    }

    /// Packets recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Add another histogram (summing workers).
    pub fn add(&mut self, o: &Latency) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.sum_us = self.sum_us.saturating_add(o.sum_us);
    }
}

/// The published copy of a worker's histogram, read by the metrics.
#[derive(Debug, Default)]
pub struct SharedLatency {
    counts: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
}

impl SharedLatency {
    /// Publish the worker's totals (its only writer).
    pub fn publish(&self, l: &Latency) {
        for (a, v) in self.counts.iter().zip(&l.counts) {
            a.store(*v, Relaxed);
        }
        self.sum_us.store(l.sum_us, Relaxed);
    }

    /// The last published totals.
    pub fn load(&self) -> Latency {
        let mut l = Latency {
            sum_us: self.sum_us.load(Relaxed),
            ..Latency::default()
        };
        for (v, a) in l.counts.iter_mut().zip(&self.counts) {
            *v = a.load(Relaxed);
        }
        l
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn a_wait_lands_in_the_first_bucket_whose_bound_holds_it() {
        let mut l = Latency::default();
        l.record(us(0), 1);
        l.record(us(10), 2); // on the bound: `le` is inclusive
        l.record(us(11), 3);
        l.record(us(1_000_000), 4);
        l.record(us(1_000_001), 5);
        l.record(Duration::from_secs(3600), 6);
        assert_eq!(l.counts[0], 3);
        assert_eq!(l.counts[1], 3);
        assert_eq!(l.counts[BOUNDS_US.len() - 1], 4);
        assert_eq!(l.counts[BOUNDS_US.len()], 11);
        assert_eq!(l.count(), 21);
        assert_eq!(
            l.sum_us,
            20 + 33 + 4_000_000 + 5_000_005 + 6 * 3_600_000_000
        );
    }

    #[test]
    fn nothing_is_recorded_for_no_packets_and_workers_add_up() {
        let mut a = Latency::default();
        a.record(us(5_000), 0);
        assert_eq!(a, Latency::default());
        a.record(us(40), 2);
        let mut b = Latency::default();
        b.record(us(40), 1);
        b.record(us(300), 1);
        a.add(&b);
        assert_eq!(a.counts[2], 3);
        assert_eq!(a.counts[5], 1);
        assert_eq!(a.sum_us, 80 + 40 + 300);
        let shared = SharedLatency::default();
        shared.publish(&a);
        assert_eq!(shared.load(), a);
    }
}
