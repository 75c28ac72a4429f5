//! Userspace connection tracker.
//!
//! The core is `Shard` (table.rs): a sans-IO state machine driven by `track(now, &packet)`,
//! `handle_timeout(now, budget)` and drained with `poll_event()`. `Conntrack` is the thin shell
//! that owns the shards behind one mutex each and routes a packet to its shard by a symmetric
//! hash of its address pair and protocol, so that both directions of a connection, its ICMP
//! errors and its FTP data connections meet in one shard. With NFQUEUE's `--queue-balance`
//! (which hashes the same way) each worker mostly touches its own shards: locks stay
//! uncontended. The bounds (connections, expectations) are global, shared atomics; when the
//! table is full the shell's `ShardGuard::track` lets the shard early-drop in *other* shards
//! (`early_drop_elsewhere`: bounded work, never an unbounded wait for another shard's lock), so
//! one host pair cannot fill the table and starve every other shard. For the control API it
//! counts (`state_counts`, `count_where`), lists in pages (`snapshots_page`) and deletes for an
//! operator (`delete_where`) without holding a shard lock for long. For state replication it
//! routes a peer's items to their shard (`import_conn`, `apply_update`, `remove_conn`,
//! `kill_conn`, `import_expect`, `remove_expect`, the `begin_peer_bulk`/`end_peer_bulk` sweep;
//! the rules are in `table::peer`) and lists its own table for a peer's bulk transfer
//! (`bulk_page`). Must not touch: I/O, clocks, policy.

pub mod config;
pub mod event;
pub mod expect;
pub mod helper_state;
pub mod id;
mod index;
pub mod table;
pub mod tcp;
pub mod tuple;

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};

pub use config::{Config, Timeouts};
pub use event::{ConnSnapshot, ConnUpdate, Event, ExpectSnapshot, ProtoState};
pub use expect::{ExpectError, ExpectOutcome, Expectation};
pub use id::ConnId;
pub use table::{
    no_room, ApplyError, Bound, ConnInfo, Counters, ImportError, InvalidReason, MakeRoom, Outcome,
    Shard, StateCounts, TableLimit,
};
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

/// How long TCP window checks stay liberal after the VIPs move to or from this node
/// ([`Conntrack::handover`]): they move within a few advert intervals, and pfsync keeps the
/// peer's recent changes for the same 2 s.
pub const HANDOVER_LIBERAL: Duration = Duration::from_secs(2);

/// Global early drop: other shards looked at per attempt (one `try_lock` each).
const EVICT_SHARDS: usize = 64;
/// Global early drop: shards sampled for a victim per attempt (up to 64 slots each).
const EVICT_TRIES: usize = 8;
/// Global early drop: shards found locked during the scan (retried with a bounded wait), and
/// shards below their share (sampled last), remembered per attempt.
const EVICT_LATER: usize = 2;
/// Longest wait for one busy shard. Bounded so that two workers waiting for each other's
/// shard both give up instead of deadlocking.
const EVICT_WAIT: Duration = Duration::from_micros(50);

/// Listing and counting: slots examined per shard lock hold, and snapshots taken per hold, so
/// that the control plane never keeps a worker waiting for more than some microseconds
/// (`cargo bench -p fwnode --bench ct_list_load` measures it).
const PAGE_SCAN: usize = 1024;
const PAGE_TAKE: usize = 64;

/// Where a paged listing (`Conntrack::snapshots_page`) resumes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListCursor {
    pub shard: u32,
    pub slot: u32,
}

impl ListCursor {
    /// As an opaque page token for a client.
    pub fn to_token(self) -> u64 {
        u64::from(self.shard) << 32 | u64::from(self.slot)
    }
    /// From a client's page token (any value is safe: out of range just ends the listing).
    pub fn from_token(t: u64) -> Self {
        ListCursor {
            shard: (t >> 32) as u32,
            slot: t as u32,
        }
    }
}

/// One page of connections and where the next one starts (`None`: the listing is complete).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnPage {
    pub conns: Vec<ConnSnapshot>,
    pub next: Option<ListCursor>,
}

/// What a bulk transfer for a peer carries (`sync::core::Session::bulk_scope` decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BulkScope {
    /// This node's own entries (the normal case: the peer is the source of what we learned).
    Own,
    /// Also what we learned from the peer and never used: the peer restarted and lost them.
    OwnAndLearned,
}

/// One page of a bulk transfer (`Conntrack::bulk_page`). Import `conns` in order, then
/// `expects`: each shard lists its connections without a master, then those with one (a
/// RELATED connection lives in its master's shard, so it follows its master), then its
/// expectations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BulkPage {
    pub conns: Vec<ConnSnapshot>,
    pub expects: Vec<ExpectSnapshot>,
    /// The cursor of the next page (`None`: the transfer is complete).
    pub next: Option<u64>,
}

/// Up to `EVICT_LATER` shard indexes to come back to, on the stack.
#[derive(Default)]
struct Later {
    at: [usize; EVICT_LATER],
    n: usize,
}

impl Later {
    fn push(&mut self, i: usize) {
        if let Some(x) = self.at.get_mut(self.n) {
            *x = i;
            self.n += 1;
        }
    }
    fn get(&self) -> &[usize] {
        &self.at[..self.n]
    }
}

/// The sharded tracker shared by the datapath workers.
#[derive(Debug)]
pub struct Conntrack {
    shards: Box<[Mutex<Shard>]>,
    mask: usize,
    limit: Arc<TableLimit>,
    /// Where the next global early drop starts looking (touched only when the table is full).
    evict_cursor: AtomicUsize,
}

/// A locked shard: derefs to `Shard`, and its `track` may early-drop in other shards when the
/// table is full (see `Conntrack::early_drop_elsewhere`).
#[derive(Debug)]
pub struct ShardGuard<'a> {
    ct: &'a Conntrack,
    index: usize,
    shard: MutexGuard<'a, Shard>,
}

impl ShardGuard<'_> {
    /// `Shard::track`, making room in other shards if the table is full.
    #[inline]
    pub fn track(&mut self, now: Timestamp, pkt: &Packet) -> Outcome {
        let (ct, own) = (self.ct, self.index);
        self.shard
            .track_with_room(now, pkt, &mut |now| ct.early_drop_elsewhere(own, now))
    }

    /// Which shard this is.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Deref for ShardGuard<'_> {
    type Target = Shard;
    fn deref(&self) -> &Shard {
        &self.shard
    }
}

impl DerefMut for ShardGuard<'_> {
    fn deref_mut(&mut self) -> &mut Shard {
        &mut self.shard
    }
}

impl Conntrack {
    pub fn new(cfg: &Config) -> Self {
        let n = cfg.shards.clamp(1, 1 << 16).next_power_of_two();
        let limit = Arc::new(TableLimit::new(cfg));
        let shards = (0..n)
            .map(|i| Mutex::new(Shard::new(cfg, i, n, limit.clone())))
            .collect();
        Conntrack {
            shards,
            mask: n as usize - 1,
            limit,
            evict_cursor: AtomicUsize::new(0),
        }
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard a packet belongs to: ICMP errors go to the shard of the packet they quote.
    #[inline]
    pub fn shard_of(&self, pkt: &Packet) -> usize {
        let (a, b, p) = match &pkt.l4 {
            L4::Icmp(i) => match &i.kind {
                IcmpKind::Error(inner) => (inner.src, inner.dst, inner.proto),
                _ => (pkt.src, pkt.dst, pkt.proto),
            },
            _ => (pkt.src, pkt.dst, pkt.proto),
        };
        tuple::shard_hash_ip(a, b, p) as usize & self.mask
    }

    /// Lock the shard `pkt` belongs to; track it, run helpers and add expectations under it.
    #[inline]
    pub fn lock_for(&self, pkt: &Packet) -> ShardGuard<'_> {
        self.lock(self.shard_of(pkt))
    }

    #[inline]
    pub fn lock(&self, shard: usize) -> ShardGuard<'_> {
        let index = shard & self.mask;
        ShardGuard {
            ct: self,
            index,
            shard: self.shards[index].lock(),
        }
    }

    /// Convenience for tests and tools: lock, track, unlock.
    pub fn track(&self, now: Timestamp, pkt: &Packet) -> Outcome {
        self.lock_for(pkt).track(now, pkt)
    }

    /// Live connections over all shards.
    pub fn len(&self) -> usize {
        self.limit.conns.count() as usize
    }

    /// The global table bound.
    pub fn max_entries(&self) -> u32 {
        self.limit.conns.max()
    }

    /// Live expectations over all shards (a counter, no lock).
    pub fn expectation_count(&self) -> usize {
        self.limit.expects.count() as usize
    }

    /// The global expectation bound.
    pub fn max_expectations(&self) -> u32 {
        self.limit.expects.max()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Global early drop, the `MakeRoom` of shard `own` (whose lock the caller holds): free one
    /// connection in another shard. Bounded like Linux's `early_drop` (a bounded sample from a
    /// rotating start): looks at up to `EVICT_SHARDS` other shards and samples at most
    /// `EVICT_TRIES` of them (`Shard::early_drop`, 64 slots each). Shards holding at least
    /// their share of the table (`Shard::holds_its_share`: where a flooding pair lives) are
    /// sampled first; up to `EVICT_LATER` smaller non-empty ones are the last resort, since an
    /// unassured entry anywhere should go before a new connection is refused (as in Linux).
    ///
    /// Locking: the caller holds its own shard, so taking another shard's lock blockingly could
    /// deadlock against a worker doing the same the other way round. Shards are taken with
    /// `try_lock`; up to `EVICT_LATER` shards that were busy (under a flood, the flooded ones)
    /// are retried with a wait bounded by `EVICT_WAIT`, so two workers waiting for each other
    /// both give up. Never called for a packet of an existing connection.
    ///
    /// Why not per-shard quotas: one host pair lives in one shard, so a quota would cap a
    /// legitimate busy pair (a proxy, a NAT) at a fraction of the table.
    #[cold]
    fn early_drop_elsewhere(&self, own: usize, now: Timestamp) -> bool {
        let n = self.shards.len();
        if n < 2 {
            return false;
        }
        let start = self.evict_cursor.fetch_add(1, Ordering::Relaxed);
        let mut tries = 0;
        let mut busy = Later::default();
        let mut small = Later::default();
        for k in 0..(n - 1).min(EVICT_SHARDS) {
            let i = (own + 1 + start.wrapping_add(k) % (n - 1)) & self.mask;
            let Some(mut sh) = self.shards[i].try_lock() else {
                busy.push(i);
                continue;
            };
            if !sh.holds_its_share() {
                if !sh.is_empty() {
                    small.push(i);
                }
                continue;
            }
            if sh.early_drop(now) {
                return true;
            }
            tries += 1;
            if tries >= EVICT_TRIES {
                return false;
            }
        }
        for &i in busy.get() {
            if let Some(mut sh) = self.shards[i].try_lock_for(EVICT_WAIT) {
                if sh.holds_its_share() && sh.early_drop(now) {
                    return true;
                }
            }
        }
        for &i in small.get() {
            if let Some(mut sh) = self.shards[i].try_lock() {
                if sh.early_drop(now) {
                    return true;
                }
            }
        }
        false
    }

    /// Connections matching `filter`, counted without building snapshots; holds one shard
    /// lock at a time, for `PAGE_SCAN` slots at most.
    pub fn count_where(&self, now: Timestamp, filter: impl Fn(&ConnInfo) -> bool) -> u64 {
        let mut n = 0;
        for s in self.shards.iter() {
            let mut from = Some(0);
            while let Some(f) = from {
                let (k, next) = s.lock().count_where(f, PAGE_SCAN, now, &filter);
                n += k;
                from = next;
            }
        }
        n
    }

    /// An operator's delete: kill every unexpired connection matching `filter` and its
    /// expectations (`Shard::delete_where`: announced as killed, so the peer removes them
    /// too). Holds one shard lock at a time, for `PAGE_SCAN` slots at most. Returns how many
    /// connections and expectations went. Not atomic: a matching connection created during the
    /// walk, in a range already passed, stays.
    pub fn delete_where(&self, now: Timestamp, filter: impl Fn(&ConnInfo) -> bool) -> (u64, u64) {
        let (mut conns, mut expects) = (0, 0);
        for s in self.shards.iter() {
            let mut from = Some(0);
            while let Some(f) = from {
                let (c, x, next) = s.lock().delete_where(f, PAGE_SCAN, now, &filter);
                conns += c;
                expects += x;
                from = next;
            }
        }
        (conns, expects)
    }

    /// Connections by protocol and TCP state; holds one shard lock at a time, for `PAGE_SCAN`
    /// slots at most, and allocates nothing.
    pub fn state_counts(&self, now: Timestamp) -> StateCounts {
        let mut c = StateCounts::default();
        for s in self.shards.iter() {
            let mut from = Some(0);
            while let Some(f) = from {
                from = s.lock().state_counts(f, PAGE_SCAN, now, &mut c);
            }
        }
        c
    }

    /// Up to `limit` connections matching `filter`, from `from` (`ListCursor::default()` for
    /// the first page) on. The shard lock is dropped every `PAGE_SCAN` slots, every
    /// `PAGE_TAKE` snapshots and between shards; the listing is not atomic, but a connection that lives through all of it is
    /// listed exactly once (connections never move). A page may be short with a `next`
    /// cursor; only `next == None` ends the listing.
    pub fn snapshots_page(
        &self,
        from: ListCursor,
        limit: usize,
        now: Timestamp,
        filter: impl Fn(&ConnInfo) -> bool,
    ) -> ConnPage {
        let limit = limit.max(1);
        let mut conns = Vec::new();
        let mut cur = from;
        while (cur.shard as usize) < self.shards.len() {
            if conns.len() >= limit {
                return ConnPage {
                    conns,
                    next: Some(cur),
                };
            }
            let take = limit.min(conns.len() + PAGE_TAKE);
            let next = self.shards[cur.shard as usize]
                .lock()
                .snapshots_page(cur.slot, take, PAGE_SCAN, now, &filter, &mut conns);
            cur = match next {
                Some(slot) => ListCursor {
                    shard: cur.shard,
                    slot,
                },
                None => ListCursor {
                    shard: cur.shard + 1,
                    slot: 0,
                },
            };
        }
        ConnPage { conns, next: None }
    }

    // ---- state replication: a peer's items (see `table::peer`) ------------------------------

    /// The shard that holds connections between `a` and `b` over `proto` (and their
    /// expectations), as `lock_for` routes their packets.
    fn shard_of_pair(&self, a: &[u8; 16], b: &[u8; 16], proto: u8) -> usize {
        tuple::shard_hash(a, b, proto) as usize & self.mask
    }

    /// Lock the shard that holds connection `t` (either direction), e.g. to look an entry
    /// up and snapshot it for a peer under one lock.
    pub fn lock_tuple(&self, t: &Tuple) -> ShardGuard<'_> {
        self.lock(self.shard_of_pair(&t.src, &t.dst, t.proto))
    }

    /// Import a peer's whole connection (`Shard::import_conn`): validated first, marked
    /// `FROM_PEER` if new, merged (never backwards) if present. Announces nothing.
    pub fn import_conn(&self, now: Timestamp, snap: &ConnSnapshot) -> Result<(), ImportError> {
        self.lock_tuple(&snap.tuple)
            .import_conn(now, snap)
            .map(|_| ())
    }

    /// Apply a peer's compact update (`Shard::apply_update`); `ApplyError::Missing` when the
    /// connection is not here.
    pub fn apply_update(&self, now: Timestamp, u: &ConnUpdate) -> Result<(), ApplyError> {
        self.lock_tuple(&u.tuple).apply_update(now, u)
    }

    /// The peer's connection `t` ended (`Shard::remove_conn`: only entries still `FROM_PEER`).
    pub fn remove_conn(&self, t: &Tuple) -> bool {
        self.lock_tuple(t).remove_conn(t)
    }

    /// The peer's operator killed connection `t` (`Shard::kill_conn`: whoever owns it).
    pub fn kill_conn(&self, t: &Tuple) -> bool {
        self.lock_tuple(t).kill_conn(t)
    }

    /// Import a peer's expectation (`Shard::import_expect`); its master must be here.
    pub fn import_expect(&self, now: Timestamp, x: &ExpectSnapshot) -> Result<(), ImportError> {
        self.lock(self.shard_of_pair(&x.src, &x.dst, x.proto))
            .import_expect(now, x)
    }

    /// The peer's expectation `x` ended (`Shard::remove_expect`).
    pub fn remove_expect(&self, x: &ExpectSnapshot) -> bool {
        self.lock(self.shard_of_pair(&x.src, &x.dst, x.proto))
            .remove_expect(x)
    }

    /// A bulk transfer from the peer begins: learned entries count as not refreshed until it
    /// (or a live item) brings them again. Locks one shard at a time.
    pub fn begin_peer_bulk(&self, peer_restarted: bool) {
        for s in self.shards.iter() {
            s.lock().begin_peer_bulk(peer_restarted);
        }
    }

    /// The VIPs move to or from this node (its HA role becomes or stops being ACTIVE, or a
    /// planned move is about to give it the VIPs): every TCP connection re-learns its
    /// sequence bounds from its next segment in each direction, as a learned entry does, and
    /// for [`HANDOVER_LIBERAL`] the window checks are liberal (a segment outside the bounds
    /// passes without moving them, as Linux's `be_liberal`). The peer may have forwarded any
    /// connection meanwhile (a switchover, and the failback after it), and replication
    /// carries state changes and refreshes, not every window move: stale bounds would drop
    /// the live streams; and while the two gateways swap the VIPs, the segments of one stream
    /// cross both and each sees part of them. A RST still needs a segment each way first
    /// (`TcpConn::update`). Locks one shard at a time; returns how many connections were
    /// marked.
    pub fn handover(&self, now: Timestamp) -> u64 {
        let until = now
            .as_millis()
            .saturating_add(HANDOVER_LIBERAL.as_millis() as u64);
        self.shards.iter().map(|s| s.lock().handover(until)).sum()
    }

    /// The bulk transfer completed: remove learned entries and expectations it did not
    /// refresh (entries used here since are ours and stay). Returns how many connections and
    /// expectations were removed. Call it only for a transfer that completed: after an
    /// aborted one, call `begin_peer_bulk` again with the next.
    pub fn end_peer_bulk(&self) -> u64 {
        self.shards.iter().map(|s| s.lock().end_peer_bulk()).sum()
    }

    /// One page of this node's table for a peer's bulk transfer, from `cursor` (0: the start;
    /// then a page's `next`; any value is safe). Up to about `limit` items (a shard's
    /// expectations come whole). Each shard lists its masterless connections, then those
    /// with a master, then its expectations, so importing pages in order always finds a
    /// master first. Shard locks are dropped every `PAGE_SCAN` slots and between shards: not
    /// atomic, the replication stream carries what changes meanwhile. `scope`: see
    /// [`BulkScope`].
    pub fn bulk_page(
        &self,
        cursor: u64,
        limit: usize,
        now: Timestamp,
        scope: BulkScope,
    ) -> BulkPage {
        let limit = limit.max(1);
        let mut page = BulkPage::default();
        let mut cur = ListCursor::from_token(cursor);
        while (cur.shard as usize) < self.shards.len() {
            if page.conns.len() + page.expects.len() >= limit {
                page.next = Some(cur.to_token());
                return page;
            }
            let next = self.shards[cur.shard as usize].lock().bulk_page(
                cur.slot,
                limit,
                PAGE_SCAN,
                now,
                scope == BulkScope::OwnAndLearned,
                &mut page,
            );
            cur = match next {
                Some(slot) => ListCursor {
                    shard: cur.shard,
                    slot,
                },
                None => ListCursor {
                    shard: cur.shard + 1,
                    slot: 0,
                },
            };
        }
        page
    }

    /// Check every shard and that the global counts agree with them (tests and fuzzing).
    pub fn check_invariants(&self) -> Result<(), String> {
        let (mut conns, mut expects) = (0, 0);
        for (i, s) in self.shards.iter().enumerate() {
            let s = s.lock();
            s.check_invariants()
                .map_err(|e| format!("shard {i}: {e}"))?;
            conns += s.len();
            expects += s.expectation_count();
        }
        if conns != self.len() || expects != self.expectation_count() {
            return Err(format!(
                "shards hold {conns} conns, {expects} expectations; the bounds count {} and {}",
                self.len(),
                self.expectation_count()
            ));
        }
        Ok(())
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
