//! Userspace connection tracker.
//!
//! The core is `Shard` (table.rs): a sans-IO state machine driven by `track(now, &packet)`,
//! `handle_timeout(now, budget)` and drained with `poll_event()`. `Conntrack` is the thin shell
//! that owns the shards behind one mutex each and routes a packet to its shard by a symmetric
//! hash of its address pair and protocol, so that both directions of a connection, its ICMP
//! errors and its FTP data connections meet in one shard. With NFQUEUE's `--queue-balance`
//! (which hashes the same way) each worker mostly touches its own shards: locks stay
//! uncontended. Must not touch: I/O, clocks, policy.

pub mod config;
pub mod event;
pub mod expect;
pub mod helper_state;
pub mod table;
pub mod tcp;
pub mod tuple;

use parking_lot::{Mutex, MutexGuard};

pub use config::{Config, Timeouts};
pub use event::{ConnSnapshot, Event, ExpectSnapshot, ProtoState};
pub use expect::{ExpectError, ExpectOutcome, Expectation};
pub use table::{ConnId, ConnInfo, Counters, InvalidReason, Outcome, Shard, TableLimit};
pub use tuple::Tuple;

use crate::packet::{IcmpKind, Packet, L4};
use crate::time::Timestamp;

/// The connection-tracking state a packet is seen in, as the policy matches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CtState {
    New,
    Established,
    Related,
    Invalid,
}

/// Direction of a packet relative to the connection's first packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Direction {
    Original = 0,
    Reply = 1,
}

/// The sharded tracker shared by the datapath workers.
#[derive(Debug)]
pub struct Conntrack {
    shards: Box<[Mutex<Shard>]>,
    mask: usize,
    limit: std::sync::Arc<TableLimit>,
}

impl Conntrack {
    pub fn new(cfg: &Config) -> Self {
        let n = cfg.shards.clamp(1, 1 << 16).next_power_of_two();
        let limit = std::sync::Arc::new(TableLimit::new(cfg.max_entries));
        let shards = (0..n)
            .map(|i| Mutex::new(Shard::new(cfg, i, n, limit.clone())))
            .collect();
        Conntrack {
            shards,
            mask: n as usize - 1,
            limit,
        }
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard a packet belongs to: ICMP errors go to the shard of the packet they quote.
    #[inline]
    pub fn shard_of(&self, pkt: &Packet) -> usize {
        let (a, b, p) = match pkt.l4 {
            L4::Icmp(i) => match i.kind {
                IcmpKind::Error(inner) => (inner.src, inner.dst, inner.proto),
                _ => (pkt.src, pkt.dst, pkt.proto),
            },
            _ => (pkt.src, pkt.dst, pkt.proto),
        };
        tuple::shard_hash(&tuple::addr_bytes(a), &tuple::addr_bytes(b), p) as usize & self.mask
    }

    /// Lock the shard `pkt` belongs to; track it, run helpers and add expectations under it.
    #[inline]
    pub fn lock_for(&self, pkt: &Packet) -> MutexGuard<'_, Shard> {
        self.shards[self.shard_of(pkt)].lock()
    }

    pub fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        self.shards[shard & self.mask].lock()
    }

    /// Convenience for tests and tools: lock, track, unlock.
    pub fn track(&self, now: Timestamp, pkt: &Packet) -> Outcome {
        self.lock_for(pkt).track(now, pkt)
    }

    /// Live connections over all shards.
    pub fn len(&self) -> usize {
        self.limit.count() as usize
    }

    /// The global table bound.
    pub fn max_entries(&self) -> u32 {
        self.limit.max()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn counters(&self) -> Counters {
        let mut c = Counters::default();
        for s in self.shards.iter() {
            c.add(&s.lock().counters);
        }
        c
    }

    /// Reap expired entries in shards `first, first + step, ...` with `budget` slots each.
    /// Workers split the shards between them this way.
    pub fn handle_timeout(&self, now: Timestamp, first: usize, step: usize, budget: u32) -> u32 {
        let mut reaped = 0;
        let mut i = first;
        while i < self.shards.len() {
            reaped += self.shards[i].lock().handle_timeout(now, budget);
            i += step.max(1);
        }
        reaped
    }
}

#[cfg(test)]
mod tests;
