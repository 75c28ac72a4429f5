//! `defer` (pfsync's name): the first packet of a new connection is held until every connected
//! peer has acknowledged the connection's state, so that a failover right after that packet
//! left cannot lose the connection. Off by default (`[sync] defer_ms`).
//!
//! Three pieces, all without I/O:
//! - `Gate`, shared by the workers and the replication thread: per worker, the number of the
//!   last event batch that every connected peer has acked, and whether any peer is connected
//!   at all (with none, nothing is held: there is no one to wait for).
//! - `Held`, a worker's bounded list of held packet ids, each with the batch its connection's
//!   event left in and a deadline. The worker releases what the gate allows or what timed out.
//! - `Pending`, the replication thread's record of which outbox sequence number ends each
//!   worker's batch; given the lowest sequence every connected peer has acked it advances the
//!   gate.
//!
//! Owns only that bookkeeping. Must not touch packets (the worker holds and releases them
//! through its queue), the network, or the protocol (the engine reads acks from the sessions).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::msg::Seq;

/// Most packets one worker holds at a time; a new connection beyond it is not held (counted).
pub const MAX_HELD: usize = 128;

/// The longest `defer_ms` a config may ask for. pfsync holds at most 20 ms; a pair whose sync
/// link is slower than that gains little from holding longer, and every new connection pays it.
pub const MAX_DEFER_MS: u64 = 100;

/// A worker's `defer` settings.
#[derive(Clone, Debug)]
pub struct DeferConfig {
    /// The longest a packet is held.
    pub wait: Duration,
    pub gate: std::sync::Arc<Gate>,
}

/// Shared between the workers (readers) and the replication thread (the one writer).
pub struct Gate {
    /// Per worker: every event batch numbered up to this one is acked by every connected peer.
    released: Box<[AtomicU64]>,
    /// At least one peer is connected; while false, workers hold nothing.
    peers_up: AtomicBool,
    /// Per worker: how to wake it when its batches are released (set by the worker).
    wakers: Box<[OnceLock<Waker>]>,
}

/// Wakes a worker sleeping beside its queue.
pub type Waker = Box<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("released", &self.released)
            .field("peers_up", &self.peers_up)
            .finish_non_exhaustive()
    }
}

impl Gate {
    pub fn new(workers: usize) -> Self {
        Gate {
            released: (0..workers.max(1)).map(|_| AtomicU64::new(0)).collect(),
            peers_up: AtomicBool::new(false),
            wakers: (0..workers.max(1)).map(|_| OnceLock::new()).collect(),
        }
    }

    /// How to wake `worker` when its batches are released (once; later calls are ignored).
    pub fn set_waker(&self, worker: usize, w: Waker) {
        if let Some(slot) = self.wakers.get(worker) {
            let _ = slot.set(w);
        }
    }

    /// Batches of `worker` acked through `batch` (the numbers a `Feed` gives, from 1).
    pub fn released(&self, worker: usize) -> u64 {
        self.released
            .get(worker)
            .map_or(u64::MAX, |a| a.load(Ordering::Acquire))
    }

    pub fn peers_up(&self) -> bool {
        self.peers_up.load(Ordering::Acquire)
    }

    fn release(&self, worker: usize, batch: u64) {
        if let Some(a) = self.released.get(worker) {
            a.fetch_max(batch, Ordering::Release);
        }
        if let Some(w) = self.wakers.get(worker).and_then(OnceLock::get) {
            w();
        }
    }
}

/// Why a held packet was let go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Every connected peer acked its connection.
    Acked,
    /// The wait reached `defer_ms`.
    TimedOut,
    /// Its event never reached replication (the hand-off channel was full), or the worker is
    /// stopping: there is nothing to wait for.
    Abandoned,
}

#[derive(Clone, Copy, Debug)]
struct HeldPacket {
    id: u32,
    batch: u64,
    since: Instant,
}

/// A worker's held packets, oldest first (`since` and `batch` only grow along it).
#[derive(Debug)]
pub struct Held {
    packets: VecDeque<HeldPacket>,
    wait: Duration,
}

impl Held {
    pub fn new(wait: Duration) -> Self {
        Held {
            packets: VecDeque::with_capacity(MAX_HELD),
            wait,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    pub fn len(&self) -> usize {
        self.packets.len()
    }

    /// Hold packet `id` until batch `batch` is acked; false when full (do not hold it).
    pub fn hold(&mut self, id: u32, batch: u64, now: Instant) -> bool {
        if self.packets.len() >= MAX_HELD {
            return false;
        }
        self.packets.push_back(HeldPacket {
            id,
            batch,
            since: now,
        });
        true
    }

    /// Let go of what `released` (the gate's batch number) allows and what has waited long
    /// enough, and of everything in batches up to `abandoned`; `f` gets each packet's id, why,
    /// and how long it was held.
    pub fn release(
        &mut self,
        released: u64,
        abandoned: u64,
        now: Instant,
        mut f: impl FnMut(u32, Release, Duration),
    ) {
        // Acks come in batch order and deadlines in hold order, which are the same order: the
        // front is always the first to go.
        while let Some(p) = self.packets.front() {
            let waited = now.saturating_duration_since(p.since);
            let why = if p.batch <= abandoned {
                Release::Abandoned
            } else if p.batch <= released {
                Release::Acked
            } else if waited >= self.wait {
                Release::TimedOut
            } else {
                break;
            };
            f(p.id, why, waited);
            self.packets.pop_front();
        }
    }

    /// Let go of everything (the worker stops).
    pub fn release_all(&mut self, now: Instant, f: impl FnMut(u32, Release, Duration)) {
        self.release(0, u64::MAX, now, f);
    }

    /// When the oldest held packet times out.
    pub fn deadline(&self) -> Option<Instant> {
        self.packets.front().map(|p| p.since + self.wait)
    }
}

/// The replication thread's side: which outbox sequence number ends each worker's batch.
#[derive(Debug)]
pub struct Pending {
    /// Per worker, (batch number, last outbox sequence of that batch), in batch order.
    batches: Vec<VecDeque<(u64, Seq)>>,
}

/// Batches remembered per worker: more than a worker can hold packets for (each held packet is
/// in one batch), so only a batch nobody waits for is ever forgotten.
const MAX_PENDING: usize = 4 * MAX_HELD;

impl Pending {
    pub fn new(workers: usize) -> Self {
        Pending {
            batches: (0..workers.max(1)).map(|_| VecDeque::new()).collect(),
        }
    }

    /// Batch `batch` of `worker` ended at outbox sequence `last`.
    pub fn pushed(&mut self, worker: usize, batch: u64, last: Seq) {
        let Some(q) = self.batches.get_mut(worker) else {
            return;
        };
        if q.len() >= MAX_PENDING {
            // Whoever waited for it has timed out long ago.
            q.pop_front();
        }
        q.push_back((batch, last));
    }

    /// Every connected peer has acked through `acked` (`None`: no peer is connected, so
    /// nothing is waited for). Advances the gate.
    pub fn acked(&mut self, gate: &Gate, acked: Option<Seq>) {
        gate.peers_up.store(acked.is_some(), Ordering::Release);
        let through = acked.unwrap_or(Seq::MAX);
        for (worker, q) in self.batches.iter_mut().enumerate() {
            let mut last = None;
            while let Some(&(batch, seq)) = q.front() {
                if seq > through {
                    break;
                }
                last = Some(batch);
                q.pop_front();
            }
            if let Some(b) = last {
                gate.release(worker, b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn released(h: &mut Held, gate: u64, abandoned: u64, now: Instant) -> Vec<(u32, Release)> {
        let mut out = vec![];
        h.release(gate, abandoned, now, |id, why, _| out.push((id, why)));
        out
    }

    #[test]
    fn a_held_packet_goes_when_its_batch_is_acked_or_its_wait_is_over() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut h = Held::new(Duration::from_millis(20));
        assert!(h.hold(10, 1, t0));
        assert!(h.hold(11, 2, ms(5)));
        assert!(h.hold(12, 2, ms(6)));
        assert_eq!(h.deadline(), Some(ms(20)));
        assert!(
            released(&mut h, 0, 0, ms(1)).is_empty(),
            "nothing acked yet"
        );
        assert_eq!(released(&mut h, 1, 0, ms(2)), vec![(10, Release::Acked)]);
        // Batch 2 is not acked; its first packet times out at 25 ms, the next at 26 ms.
        assert!(released(&mut h, 1, 0, ms(24)).is_empty());
        assert_eq!(
            released(&mut h, 1, 0, ms(25)),
            vec![(11, Release::TimedOut)]
        );
        assert_eq!(released(&mut h, 2, 0, ms(25)), vec![(12, Release::Acked)]);
        assert!(h.is_empty());
    }

    #[test]
    fn holding_is_bounded_and_an_abandoned_batch_lets_go_at_once() {
        let t0 = Instant::now();
        let mut h = Held::new(Duration::from_millis(20));
        for id in 0..MAX_HELD as u32 {
            assert!(h.hold(id, 7, t0));
        }
        assert!(!h.hold(999, 7, t0), "full: the caller accepts at once");
        let out = released(&mut h, 0, 7, t0);
        assert_eq!(out.len(), MAX_HELD);
        assert!(out.iter().all(|&(_, why)| why == Release::Abandoned));
        assert!(h.hold(1000, 8, t0));
        let mut n = 0;
        h.release_all(t0, |_, why, _| {
            assert_eq!(why, Release::Abandoned);
            n += 1
        });
        assert_eq!(n, 1);
    }

    #[test]
    fn the_gate_opens_a_batch_only_once_every_connected_peer_has_its_last_item() {
        let gate = Gate::new(2);
        let mut p = Pending::new(2);
        p.pushed(0, 1, 10);
        p.pushed(1, 1, 12);
        p.pushed(0, 2, 15);
        p.acked(&gate, Some(11));
        assert!(gate.peers_up());
        assert_eq!((gate.released(0), gate.released(1)), (1, 0));
        p.acked(&gate, Some(14));
        assert_eq!((gate.released(0), gate.released(1)), (1, 1));
        p.acked(&gate, Some(15));
        assert_eq!(gate.released(0), 2);
        // No peer connected: nothing to wait for, and the workers stop holding.
        p.pushed(1, 2, 20);
        p.acked(&gate, None);
        assert!(!gate.peers_up());
        assert_eq!(gate.released(1), 2);
    }
}
