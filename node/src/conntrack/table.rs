//! One shard of the connection table: the sans-IO core of the tracker.
//!
//! Owns the connection entries (a slab of fixed-size records), the two-way index, the shard's
//! expectations, incremental expiry, early drop when full (choosing whether this shard or
//! another pays, see `make_room`), the event queue and the counters. Driven by
//! `track(now, &packet)`, `handle_timeout(now, budget)` and drained by `poll_event()`.
//! Must not touch locks, clocks or I/O: `Conntrack` (mod.rs) is the thin sharded shell; it
//! shares the global bounds (`TableLimit`) with every shard and frees room in other shards
//! through the `MakeRoom` callback.
//!
//! Layout: the index (`index::Index`) maps a tuple's hash to `slot << 1 | direction`; the tuple
//! is compared in the slab, so each connection costs two 8-byte index words (one per direction,
//! each a hash tag beside the value) plus its entry, and both directions find the same entry.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use hashbrown::DefaultHashBuilder;

use super::config::{Config, HelperPort, Timeouts};
use super::event::{
    status, ConnSnapshot, ConnUpdate, DestroyReason, Event, ExpectEnd, ExpectSnapshot, ProtoState,
};
use super::expect::{Expect, ExpectError, ExpectOutcome, Expectation};
use super::helper_state::{HelperKind, HelperState, LINE_MAX};
use super::id::ConnId;
use super::index::Index;
use super::tcp::{valid_flags, TcpConn, TcpState, TcpVerdict};
use super::tuple::{shard_hash, Tuple};
use super::{CtState, Direction};
use crate::label::label_enum;
use crate::packet::{IcmpKind, Packet, L4};
use crate::time::Timestamp;

mod peer;

label_enum! {
    /// Why a packet was judged INVALID (counted per reason: `keepstate_invalid_packets_total`,
    /// `fwctl stats` and the stats file, under the names of [`InvalidReason::name`]).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum InvalidReason {
        /// An IP fragment: the kernel reassembles before the queue, so one that still arrives is
        /// not judged piece by piece.
        Fragment => "fragment",
        /// A TCP flag combination Linux does not accept either (SYN+FIN, no flags, Xmas, ...).
        TcpBadFlags => "tcp_bad_flags",
        /// A TCP segment that finds no connection and may not start one (not a SYN, and no
        /// `tcp_pickup`).
        TcpNoConnection => "tcp_no_connection",
        /// A TCP segment the state table refuses in the connection's state.
        TcpBadTransition => "tcp_bad_transition",
        /// A TCP segment outside the window its receiver announced.
        TcpOutOfWindow => "tcp_out_of_window",
        /// A RST outside the window (in SYN_SENT: one that does not acknowledge the SYN).
        TcpRstOutOfWindow => "tcp_rst_out_of_window",
        /// An ICMP or ICMPv6 message that is neither an echo nor an error: the tracker follows only
        /// those.
        IcmpUntracked => "icmp_untracked",
        /// An echo that fits no exchange: a reply that would start one, or a request or reply going
        /// the wrong way in an existing one.
        IcmpEchoMismatch => "icmp_echo_mismatch",
        /// An ICMP error whose quoted packet belongs to no connection, or that does not travel back
        /// toward the quoted packet's sender.
        IcmpErrorUnmatched => "icmp_error_unmatched",
        /// A new connection while the table is full and nothing could be early-dropped.
        TableFull => "table_full",
        /// Source and destination (address and port) are the same: a LAND-style packet whose
        /// reply would be itself.
        SameEndpoints => "same_endpoints",
        /// The transport checksum is wrong (checked by the datapath when the kernel had not).
        BadChecksum => "bad_checksum",
    }
}

/// What the tracker decided about one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub state: CtState,
    pub dir: Direction,
    pub conn: Option<ConnId>,
    /// The connection's helper, if any (only for packets of the connection itself).
    pub helper: Option<HelperKind>,
    pub invalid: Option<InvalidReason>,
    /// This packet created the connection.
    pub created: bool,
}

impl Outcome {
    fn invalid(r: InvalidReason) -> Self {
        Outcome {
            state: CtState::Invalid,
            dir: Direction::Original,
            conn: None,
            helper: None,
            invalid: Some(r),
            created: false,
        }
    }
}

/// Per-shard counters; `Conntrack::counters` sums them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub invalid: [u64; InvalidReason::COUNT],
    pub created: u64,
    pub destroyed: u64,
    pub expired: u64,
    pub early_drops: u64,
    pub tcp_ignored: u64,
    pub expect_created: u64,
    pub expect_refreshed: u64,
    pub expect_matched: u64,
    pub expect_expired: u64,
    pub expect_evicted: u64,
    pub expect_refused: u64,
    pub events_dropped: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        for (a, b) in self.invalid.iter_mut().zip(o.invalid.iter()) {
            *a += b;
        }
        self.created += o.created;
        self.destroyed += o.destroyed;
        self.expired += o.expired;
        self.early_drops += o.early_drops;
        self.tcp_ignored += o.tcp_ignored;
        self.expect_created += o.expect_created;
        self.expect_refreshed += o.expect_refreshed;
        self.expect_matched += o.expect_matched;
        self.expect_expired += o.expect_expired;
        self.expect_evicted += o.expect_evicted;
        self.expect_refused += o.expect_refused;
        self.events_dropped += o.events_dropped;
    }
}

/// Status bits that say "the peer's, not used here yet"; a local packet clears them.
const LEARNED: u16 = status::FROM_PEER | status::INTERNAL;

/// What a slab slot holds: free, or a connection of one protocol family of rules. An enum so
/// that every match on it is exhaustive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Free,
    Tcp,
    Udp,
    Icmp,
    Generic,
}

/// One connection. Fixed size; the helper state is boxed because only control connections
/// have one.
#[derive(Clone, Debug)]
struct Entry {
    tuple: Tuple,
    status: u16,
    kind: Kind,
    tcp: TcpConn,
    gen: u32,
    expires: u64,
    master: Option<ConnId>,
    helper: Option<Box<HelperState>>,
}

impl Entry {
    fn free() -> Self {
        Entry {
            tuple: Tuple {
                src: [0; 16],
                dst: [0; 16],
                src_port: 0,
                dst_port: 0,
                proto: 0,
                family: 0,
            },
            status: 0,
            kind: Kind::Free,
            tcp: TcpConn::default(),
            gen: 0,
            expires: 0,
            master: None,
            helper: None,
        }
    }
    #[inline]
    fn tuple_in(&self, dir: u32) -> Tuple {
        if dir == 0 {
            self.tuple
        } else {
            self.tuple.reverse()
        }
    }
    #[inline]
    fn matches(&self, dir: u32, t: &Tuple) -> bool {
        let e = &self.tuple;
        if dir == 0 {
            e == t
        } else {
            e.src == t.dst
                && e.dst == t.src
                && e.src_port == t.dst_port
                && e.dst_port == t.src_port
                && e.proto == t.proto
                && e.family == t.family
        }
    }
    fn proto_state(&self) -> ProtoState {
        match self.kind {
            Kind::Tcp => ProtoState::Tcp(self.tcp),
            Kind::Udp => ProtoState::Udp,
            Kind::Icmp => ProtoState::IcmpEcho,
            // A free slot has no state; nothing reads it, Generic is the stateless answer.
            Kind::Generic | Kind::Free => ProtoState::Generic,
        }
    }
}

/// Bytes of one slab entry (the index adds two 8-byte words per connection, at most 3/4
/// full). The bench measures the whole per-connection cost; this keeps the entry from growing
/// unnoticed.
pub const ENTRY_SIZE: usize = std::mem::size_of::<Entry>();
const _: () = assert!(ENTRY_SIZE <= 112);

/// How long a peer's copy of `e` should live, in milliseconds from `now_ms`: what is left of the
/// local timer, except that a TCP entry with data in flight gets its state's own timeout. The
/// "unacknowledged data" timeout flips on and off with the ACKs, which are not announced (see
/// `refresh_due`), so a copy given 300 s while data was in flight would expire on the standby
/// under a long transfer's idle control connection.
fn peer_expires_in_ms(timeouts: &Timeouts, e: &Entry, now_ms: u64) -> u64 {
    let left = e.expires.saturating_sub(now_ms);
    if e.kind == Kind::Tcp && e.tcp.unacked() {
        let state_ms = timeouts.tcp(e.tcp.state()).saturating_mul(1000);
        let unacked_ms = timeouts.tcp_unacknowledged.saturating_mul(1000);
        left.saturating_add(state_ms.saturating_sub(unacked_ms))
    } else {
        left
    }
}

/// Read-only facts about a live connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    pub tuple: Tuple,
    pub proto: ProtoState,
    pub status: u16,
    pub master: Option<ConnId>,
    pub expires: Timestamp,
}

/// Live connections by protocol and, for TCP, by state (`tcp[TcpState as usize]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateCounts {
    pub tcp: [u64; TcpState::ALL.len()],
    pub udp: u64,
    pub icmp: u64,
    pub generic: u64,
}

impl StateCounts {
    pub fn add(&mut self, o: &StateCounts) {
        for (a, b) in self.tcp.iter_mut().zip(o.tcp.iter()) {
            *a += b;
        }
        self.udp += o.udp;
        self.icmp += o.icmp;
        self.generic += o.generic;
    }
    pub fn total(&self) -> u64 {
        self.tcp.iter().sum::<u64>() + self.udp + self.icmp + self.generic
    }
}

/// Why a snapshot could not be imported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    #[error("snapshot protocol state does not match its tuple's protocol")]
    ProtoMismatch,
    #[error("snapshot has an invalid address family")]
    BadFamily,
    #[error("snapshot does not belong to this shard")]
    WrongShard,
    #[error("connection table full")]
    TableFull,
    #[error("snapshot's source and destination are the same endpoint")]
    SameEndpoints,
    #[error("snapshot's TCP state is not one a live connection can be in, or its window scale is above 14")]
    BadTcpState,
    #[error("snapshot's helper state is malformed (line longer than the buffer, or on a connection that is not TCP)")]
    BadHelper,
    #[error("the master connection is not in the table")]
    NoMaster,
}

/// Why a peer's update was not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// No connection with this tuple (in this orientation): ask the peer for it whole.
    #[error("no such connection")]
    Missing,
    #[error(transparent)]
    Invalid(#[from] ImportError),
}

/// A bound shared by all shards: traffic between one pair of hosts lands in one shard, so a
/// per-shard split of a bound would cap that pair at a fraction of it.
#[derive(Debug)]
pub struct Bound {
    count: AtomicU32,
    max: u32,
}

impl Bound {
    pub fn new(max: u32) -> Self {
        Bound {
            count: AtomicU32::new(0),
            max,
        }
    }
    /// Items held over all shards.
    pub fn count(&self) -> u32 {
        self.count.load(Ordering::Relaxed)
    }
    pub fn max(&self) -> u32 {
        self.max
    }
    /// Reserve one item; false when the bound is reached.
    fn reserve(&self) -> bool {
        self.count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }
    fn release(&self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The bounds all shards share: connections (`Config::max_entries`) and expectations
/// (`Config::max_expectations`).
#[derive(Debug)]
pub struct TableLimit {
    pub conns: Bound,
    pub expects: Bound,
}

impl TableLimit {
    pub fn new(cfg: &Config) -> Self {
        TableLimit {
            conns: Bound::new(cfg.max_entries),
            expects: Bound::new(cfg.max_expectations),
        }
    }
}

/// What `Shard::track_with_room` calls when the table is full and this shard alone cannot (or,
/// below its share of the table, should not) make room: free one connection elsewhere (another
/// shard) and say whether it did. The sans-IO core knows nothing of other shards or locks;
/// `Conntrack` (mod.rs) supplies it.
pub type MakeRoom<'a> = dyn FnMut(Timestamp) -> bool + 'a;

/// `MakeRoom` for a shard used on its own: there is nowhere else to look.
pub fn no_room(_: Timestamp) -> bool {
    false
}

/// One shard of the tracker. See the module docs.
#[derive(Debug)]
pub struct Shard {
    id: u32,
    mask: u32,
    timeouts: Timeouts,
    liberal: bool,
    /// TCP window checks are liberal before this time (ms): a takeover's grace period
    /// (`Conntrack::handover`).
    liberal_until_ms: u64,
    pickup: bool,
    helper_ports: Vec<HelperPort>,
    max_expect_per_master: usize,
    max_events: usize,
    /// Longest lifetime a peer may give an entry or expectation (the longest timeout).
    max_expiry_ms: u64,
    limit: Arc<TableLimit>,
    entries: Vec<Entry>,
    free: Vec<u32>,
    len: u32,
    index: Index,
    hasher: DefaultHashBuilder,
    sweep: u32,
    expects: Vec<Expect>,
    events: VecDeque<Event>,
    resync_needed: bool,
    pub counters: Counters,
}

impl Shard {
    /// Shard `id` of `count` (a power of two), sharing the bounds `limit` with the others.
    /// Shards grow on demand: preallocating every shard for the whole bound would multiply
    /// memory by `count`.
    pub fn new(cfg: &Config, id: u32, count: u32, limit: Arc<TableLimit>) -> Self {
        let count = count.max(1);
        Shard {
            id,
            mask: count - 1,
            timeouts: cfg.timeouts.clone(),
            liberal: cfg.tcp_liberal,
            liberal_until_ms: 0,
            pickup: cfg.tcp_pickup,
            helper_ports: cfg.helper_ports.clone(),
            max_expect_per_master: cfg.max_expect_per_master.max(1) as usize,
            max_events: cfg.event_queue as usize,
            max_expiry_ms: cfg.timeouts.longest().saturating_mul(1000),
            limit,
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
            index: Index::default(),
            hasher: DefaultHashBuilder::default(),
            sweep: 0,
            expects: Vec::new(),
            events: VecDeque::new(),
            resync_needed: false,
            counters: Counters::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn expectation_count(&self) -> usize {
        self.expects.len()
    }

    /// Does this shard hold at least its share (`max_entries / shards`) of the table? Such a
    /// shard pays for new connections when the table is full (see `make_room`).
    pub fn holds_its_share(&self) -> bool {
        u64::from(self.len) * (u64::from(self.mask) + 1) >= u64::from(self.limit.conns.max())
    }

    #[inline]
    fn hash(&self, t: &Tuple) -> u64 {
        self.hasher.hash_one(t)
    }

    /// Find the live entry for `t`: `(slot, direction)`.
    #[inline]
    fn lookup(&self, t: &Tuple) -> Option<(u32, u32)> {
        let h = self.hash(t);
        let entries = &self.entries;
        self.index
            .find(h, |v| {
                entries
                    .get((v >> 1) as usize)
                    .is_some_and(|e| e.matches(v & 1, t))
            })
            .map(|v| (v >> 1, v & 1))
    }

    #[inline]
    fn id_of(&self, slot: u32) -> ConnId {
        ConnId {
            slot,
            gen: self.entries[slot as usize].gen,
        }
    }

    fn live(&self, id: ConnId) -> Option<&Entry> {
        self.entries
            .get(id.slot as usize)
            .filter(|e| e.kind != Kind::Free && e.gen == id.gen)
    }

    /// Judge one packet and update the table. The packet must belong to this shard
    /// (`Conntrack::lock_for` picks it). When the table is full only this shard's entries are
    /// early-drop candidates; `track_with_room` also looks elsewhere.
    pub fn track(&mut self, now: Timestamp, pkt: &Packet) -> Outcome {
        self.track_with_room(now, pkt, &mut no_room)
    }

    /// `track`, with `room` to free a connection in another shard when the table is full (see
    /// `MakeRoom`). Only a packet that creates a connection on a full table calls it.
    pub fn track_with_room(
        &mut self,
        now: Timestamp,
        pkt: &Packet,
        room: &mut MakeRoom<'_>,
    ) -> Outcome {
        let now_ms = now.as_millis();
        if pkt.fragment.is_some() {
            return self.invalid(InvalidReason::Fragment);
        }
        match pkt.l4 {
            L4::Tcp(t) if !valid_flags(t.flags) => return self.invalid(InvalidReason::TcpBadFlags),
            L4::Icmp(i) => match i.kind {
                IcmpKind::Error(inner) => return self.track_icmp_error(now_ms, pkt, &inner),
                IcmpKind::Other { .. } => return self.invalid(InvalidReason::IcmpUntracked),
                _ => {}
            },
            _ => {}
        }
        let Some(tuple) = Tuple::of_packet(pkt) else {
            return self.invalid(InvalidReason::IcmpUntracked);
        };
        if let Some((slot, dir)) = self.lookup(&tuple) {
            if self.entries[slot as usize].expires > now_ms {
                return self.update(now_ms, slot, dir, pkt, room);
            }
            self.counters.expired += 1;
            self.destroy(slot, DestroyReason::Timeout);
        }
        self.create(now_ms, tuple, pkt, room)
    }

    #[inline]
    fn invalid(&mut self, r: InvalidReason) -> Outcome {
        self.counters.invalid[r as usize] += 1;
        Outcome::invalid(r)
    }

    /// Judge a packet INVALID for a reason found outside the tracker (a bad checksum), counted
    /// with the tracker's own reasons; no connection is looked up or changed.
    pub fn track_invalid(&mut self, r: InvalidReason) -> Outcome {
        self.invalid(r)
    }

    fn update(
        &mut self,
        now_ms: u64,
        slot: u32,
        dir: u32,
        pkt: &Packet,
        room: &mut MakeRoom<'_>,
    ) -> Outcome {
        let direction = if dir == 0 {
            Direction::Original
        } else {
            Direction::Reply
        };
        let liberal = self.liberal || now_ms < self.liberal_until_ms;
        let e = &mut self.entries[slot as usize];
        let old_status = e.status;
        let mut changed = false;
        let timeout_s;
        match (e.kind, pkt.l4) {
            (Kind::Tcp, L4::Tcp(t)) => {
                let old = e.tcp.state();
                // A new SYN on a finished connection reopens it (Linux: the SYN_SENT cells of
                // the TIME_WAIT and CLOSE columns kill the entry and look up again): from the
                // initiator in TIME_WAIT or CLOSE, or from the responder in TIME_WAIT (RFC 1122
                // 4.2.2.13), which makes it the new connection's originator.
                let reopen = matches!(
                    (dir, old),
                    (0, TcpState::TimeWait | TcpState::Close) | (1, TcpState::TimeWait)
                );
                if reopen && t.flags.syn() && !t.flags.ack() {
                    let tuple = e.tuple_in(dir);
                    self.destroy(slot, DestroyReason::Reopened);
                    return self.create(now_ms, tuple, pkt, room);
                }
                match e.tcp.update(direction, &t, liberal) {
                    TcpVerdict::Ok => {}
                    TcpVerdict::Ignored => {
                        self.counters.tcp_ignored += 1;
                        e.status &= !LEARNED;
                        let out = self.outcome(slot, direction, false);
                        return out;
                    }
                    TcpVerdict::BadTransition => {
                        return self.invalid(InvalidReason::TcpBadTransition)
                    }
                    TcpVerdict::OutOfWindow => return self.invalid(InvalidReason::TcpOutOfWindow),
                    TcpVerdict::RstOutOfWindow => {
                        return self.invalid(InvalidReason::TcpRstOutOfWindow)
                    }
                }
                let new = e.tcp.state();
                if new != old {
                    changed = true;
                    if new == TcpState::Established {
                        e.status |= status::ASSURED;
                    }
                }
                let to = self.timeouts.tcp(new);
                timeout_s = if e.tcp.unacked() {
                    to.min(self.timeouts.tcp_unacknowledged)
                } else {
                    to
                };
            }
            (Kind::Udp, _) => {
                if e.status & status::SEEN_REPLY != 0 {
                    e.status |= status::ASSURED;
                }
                timeout_s = if e.status & status::SEEN_REPLY != 0 || dir == 1 {
                    self.timeouts.udp_replied
                } else {
                    self.timeouts.udp_unreplied
                };
            }
            (Kind::Icmp, l4) => {
                // An echo entry's tuple is ICMP over IPv4 or ICMPv6 over IPv6 (as created, and
                // on import: `check_conn`), so its packets parse as ICMP; only an echo going
                // the entry's way fits.
                let ok = match l4 {
                    L4::Icmp(i) => match i.kind {
                        IcmpKind::EchoRequest { .. } => dir == 0,
                        IcmpKind::EchoReply { .. } => dir == 1,
                        _ => false,
                    },
                    _ => false,
                };
                if !ok {
                    return self.invalid(InvalidReason::IcmpEchoMismatch);
                }
                timeout_s = self.timeouts.icmp;
            }
            (Kind::Generic, _) => timeout_s = self.timeouts.generic,
            // Unreachable: the tuple holds the protocol, and a TCP packet that is not a
            // fragment parses as `L4::Tcp` or not at all; the index never points at a free
            // slot. Judged INVALID (a TCP packet without a usable connection) rather than a
            // panic on the packet path.
            (Kind::Tcp | Kind::Free, _) => return self.invalid(InvalidReason::TcpNoConnection),
        }
        let e = &mut self.entries[slot as usize];
        if dir == 1 {
            e.status |= status::SEEN_REPLY;
        }
        // A local packet: the entry is ours now (a peer's sweep or ConnGone cannot remove it).
        // Not announced: the bit means something only here.
        e.status &= !LEARNED;
        let to_ms = timeout_s.saturating_mul(1000);
        let old_expires = e.expires;
        e.expires = now_ms.saturating_add(to_ms);
        if self.max_events != 0
            && (changed
                || (e.status ^ old_status) & !LEARNED != 0
                || refresh_due(old_expires, e.expires, to_ms))
        {
            let u = ConnUpdate {
                tuple: e.tuple,
                proto: e.proto_state(),
                status: e.status,
                expires_in_ms: peer_expires_in_ms(&self.timeouts, e, now_ms),
            };
            self.push_event(Event::ConnUpdated(u));
        }
        self.outcome(slot, direction, false)
    }

    /// The ct state a packet of an existing connection is seen in.
    fn outcome(&self, slot: u32, dir: Direction, created: bool) -> Outcome {
        let e = &self.entries[slot as usize];
        let state = if dir == Direction::Reply || e.status & status::SEEN_REPLY != 0 {
            CtState::Established
        } else if e.status & status::RELATED != 0 {
            CtState::Related
        } else {
            CtState::New
        };
        Outcome {
            state,
            dir,
            conn: Some(ConnId { slot, gen: e.gen }),
            helper: e.helper.as_ref().map(|h| h.kind),
            invalid: None,
            created,
        }
    }

    fn create(
        &mut self,
        now_ms: u64,
        tuple: Tuple,
        pkt: &Packet,
        room: &mut MakeRoom<'_>,
    ) -> Outcome {
        if tuple == tuple.reverse() {
            return self.invalid(InvalidReason::SameEndpoints);
        }
        let (kind, tcp, timeout_s) = match pkt.l4 {
            L4::Tcp(t) => match TcpConn::new_from(&t, self.pickup) {
                Some(c) => (Kind::Tcp, c, self.timeouts.tcp(c.state())),
                None => return self.invalid(InvalidReason::TcpNoConnection),
            },
            L4::Udp(_) => (Kind::Udp, TcpConn::default(), self.timeouts.udp_unreplied),
            L4::Icmp(i) => match i.kind {
                IcmpKind::EchoRequest { .. } => {
                    (Kind::Icmp, TcpConn::default(), self.timeouts.icmp)
                }
                _ => return self.invalid(InvalidReason::IcmpEchoMismatch),
            },
            L4::Other { .. } => (Kind::Generic, TcpConn::default(), self.timeouts.generic),
        };
        let Some(slot) = self.alloc(now_ms, room) else {
            return self.invalid(InvalidReason::TableFull);
        };
        // An expected connection? Looked up only now that the connection has its slot, so that
        // a full table does not consume the expectation (and after `alloc`'s early drop, which
        // may have taken the expectation along with its master).
        let mut status_bits = 0;
        let mut master = None;
        let mut helper = self
            .helper_for(&tuple)
            .map(|k| Box::new(HelperState::new(k)));
        if let Some(i) = self.find_expectation(now_ms, &tuple) {
            let x = self.take_expect(i);
            self.counters.expect_matched += 1;
            status_bits |= status::RELATED;
            master = Some(x.master);
            helper = x.helper.map(|k| Box::new(HelperState::new(k)));
            if self.events_on() {
                let snap = expect_snapshot(&x, now_ms);
                self.push_event(Event::ExpectDestroyed {
                    snapshot: snap,
                    reason: ExpectEnd::Matched,
                });
            }
        }
        let e = &mut self.entries[slot as usize];
        e.tuple = tuple;
        e.status = status_bits;
        e.kind = kind;
        e.tcp = tcp;
        e.expires = now_ms.saturating_add(timeout_s.saturating_mul(1000));
        e.master = master;
        e.helper = helper;
        self.index_insert(slot);
        self.counters.created += 1;
        if self.events_on() {
            let snap = self.peer_snapshot_slot(slot, now_ms);
            self.push_event(Event::ConnCreated(snap));
        }
        self.outcome(slot, Direction::Original, true)
    }

    fn helper_for(&self, t: &Tuple) -> Option<HelperKind> {
        self.helper_ports
            .iter()
            .find(|h| h.proto == t.proto && h.port == t.dst_port)
            .map(|h| h.helper.into())
    }

    fn index_insert(&mut self, slot: u32) {
        let e = &self.entries[slot as usize];
        let (t0, t1) = (e.tuple, e.tuple.reverse());
        let (h0, h1) = (self.hash(&t0), self.hash(&t1));
        self.index.insert(h0, slot << 1);
        self.index.insert(h1, slot << 1 | 1);
    }

    fn index_remove(&mut self, slot: u32) {
        let e = &self.entries[slot as usize];
        for dir in 0..2u32 {
            let h = self.hash(&e.tuple_in(dir));
            self.index.remove(h, slot << 1 | dir);
        }
    }

    /// A free slot, making room by early drop if the table is full.
    #[inline]
    fn alloc(&mut self, now_ms: u64, room: &mut MakeRoom<'_>) -> Option<u32> {
        if !self.limit.conns.reserve() && !self.make_room(now_ms, room) {
            return None;
        }
        self.len += 1;
        if let Some(s) = self.free.pop() {
            return Some(s);
        }
        self.entries.push(Entry::free());
        Some((self.entries.len() - 1) as u32)
    }

    /// The table is full: early-drop a connection here or elsewhere (`room`) and reserve its
    /// place. Who pays: a shard holding at least its share of the table (`max / shards`) drops
    /// one of its own first; one below its share asks the other shards first. So one host pair
    /// that fills the table (it lives in one shard) makes room for everyone else, and its
    /// flood cannot make other pairs evict each other's connections.
    #[cold]
    fn make_room(&mut self, now_ms: u64, room: &mut MakeRoom<'_>) -> bool {
        let own_first = self.holds_its_share();
        let now = Timestamp::from_millis(now_ms);
        if own_first && self.early_drop_ms(now_ms) && self.limit.conns.reserve() {
            return true;
        }
        if room(now) && self.limit.conns.reserve() {
            return true;
        }
        !own_first && self.early_drop_ms(now_ms) && self.limit.conns.reserve()
    }

    /// Free one slot of this shard: an expired entry, else the droppable entry closest to
    /// expiry among a bounded sample (like Linux's early_drop): one that is not assured, or a
    /// TCP connection that is closing (Linux's `tcp_can_early_drop`). False if none is
    /// droppable. `Conntrack` calls it on other shards for their `MakeRoom`.
    pub fn early_drop(&mut self, now: Timestamp) -> bool {
        self.early_drop_ms(now.as_millis())
    }

    fn early_drop_ms(&mut self, now_ms: u64) -> bool {
        const SAMPLE: u32 = 64;
        let n = self.entries.len() as u32;
        if n == 0 {
            return false;
        }
        let mut victim: Option<(u32, u64)> = None;
        for k in 0..SAMPLE.min(n) {
            let slot = (self.sweep + k) % n;
            let e = &self.entries[slot as usize];
            if e.kind == Kind::Free {
                continue;
            }
            if e.expires <= now_ms {
                victim = Some((slot, 0));
                break;
            }
            let closing = e.kind == Kind::Tcp
                && matches!(
                    e.tcp.state(),
                    TcpState::FinWait
                        | TcpState::CloseWait
                        | TcpState::LastAck
                        | TcpState::TimeWait
                        | TcpState::Close
                );
            let droppable = e.status & status::ASSURED == 0 || closing;
            if droppable && victim.is_none_or(|(_, x)| e.expires < x) {
                victim = Some((slot, e.expires));
            }
        }
        self.sweep = (self.sweep + SAMPLE) % n;
        match victim {
            Some((slot, _)) => {
                self.counters.early_drops += 1;
                self.destroy(slot, DestroyReason::EarlyDrop);
                true
            }
            None => false,
        }
    }

    /// Remove a connection. Its end is announced to peers unless it was still only the
    /// peer's (`FROM_PEER`: the peer decides when its connection ends; announcing our timeout
    /// or early drop would remove a live connection there) - except for a reopen, which the
    /// peer must see before the new connection, and an operator's kill, which must reach the
    /// peer whoever owns the connection.
    fn destroy(&mut self, slot: u32, reason: DestroyReason) {
        let learned = self.entries[slot as usize].status & status::FROM_PEER != 0;
        let announce =
            matches!(reason, DestroyReason::Reopened | DestroyReason::Killed) || !learned;
        self.destroy_as(slot, reason, announce)
    }

    /// Remove a connection because the peer said so: nothing is announced (no echo).
    fn destroy_quiet(&mut self, slot: u32) {
        self.destroy_as(slot, DestroyReason::Removed, false)
    }

    fn destroy_as(&mut self, slot: u32, reason: DestroyReason, announce: bool) {
        let announce = announce && self.events_on();
        self.index_remove(slot);
        let id = self.id_of(slot);
        let e = &mut self.entries[slot as usize];
        let tuple = e.tuple;
        e.kind = Kind::Free;
        e.gen = e.gen.wrapping_add(1);
        e.helper = None;
        e.master = None;
        self.free.push(slot);
        self.len -= 1;
        self.limit.conns.release();
        self.counters.destroyed += 1;
        // Expectations die with their master.
        let mut i = 0;
        while i < self.expects.len() {
            if self.expects[i].master == id {
                let x = self.take_expect(i);
                if announce && !x.from_peer {
                    let snap = expect_snapshot(&x, 0);
                    self.push_event(Event::ExpectDestroyed {
                        snapshot: snap,
                        reason: ExpectEnd::MasterGone,
                    });
                }
            } else {
                i += 1;
            }
        }
        if !announce {
            return;
        }
        // A connection created and removed before anyone drained its creation leaves no trace.
        if reason == DestroyReason::Removed {
            if let Some(Event::ConnCreated(s)) = self.events.back() {
                if s.tuple == tuple {
                    self.events.pop_back();
                    return;
                }
            }
        }
        self.push_event(Event::ConnDestroyed { tuple, reason });
    }

    /// Remove a connection (e.g. the policy dropped the packet that created it).
    pub fn remove(&mut self, id: ConnId) -> bool {
        if self.live(id).is_none() {
            return false;
        }
        self.destroy(id.slot, DestroyReason::Removed);
        true
    }

    /// An operator's delete (`Conntrack::delete_where`): kill the unexpired connections in
    /// slots `from..from + scan` that match `filter`, with their expectations. Each is announced
    /// as killed (`DestroyReason::Killed`, replicated as `sync::Item::ConnKilled`, which removes
    /// the peer's entry whoever owns it), learned entries included. Returns how many
    /// connections and expectations went, and where the next range starts (`None`: the shard
    /// ends within this one).
    pub fn delete_where(
        &mut self,
        from: u32,
        scan: usize,
        now: Timestamp,
        filter: &dyn Fn(&ConnInfo) -> bool,
    ) -> (u64, u64, Option<u32>) {
        let now_ms = now.as_millis();
        let len = self.entries.len();
        let start = (from as usize).min(len);
        let end = start.saturating_add(scan).min(len);
        let expects_before = self.expects.len();
        let mut conns = 0;
        for slot in start..end {
            let e = &self.entries[slot];
            if e.kind != Kind::Free && e.expires > now_ms && filter(&info_of(e)) {
                self.destroy(slot as u32, DestroyReason::Killed);
                conns += 1;
            }
        }
        let expects = expects_before.saturating_sub(self.expects.len()) as u64;
        (conns, expects, (end < len).then_some(end as u32))
    }

    /// Remove every connection and expectation.
    pub fn flush(&mut self) {
        for slot in 0..self.entries.len() as u32 {
            if self.entries[slot as usize].kind != Kind::Free {
                self.destroy(slot, DestroyReason::Removed);
            }
        }
    }

    fn track_icmp_error(
        &mut self,
        now_ms: u64,
        pkt: &Packet,
        inner: &crate::packet::Inner,
    ) -> Outcome {
        // The error must travel back toward the sender of the quoted packet.
        if pkt.dst != inner.src {
            return self.invalid(InvalidReason::IcmpErrorUnmatched);
        }
        let Some(t) = Tuple::of_inner(inner) else {
            return self.invalid(InvalidReason::IcmpErrorUnmatched);
        };
        match self.lookup(&t) {
            Some((slot, dir)) if self.entries[slot as usize].expires > now_ms => Outcome {
                state: CtState::Related,
                // The quoted packet went one way; the error comes back the other way.
                dir: if dir == 0 {
                    Direction::Reply
                } else {
                    Direction::Original
                },
                conn: Some(self.id_of(slot)),
                helper: None,
                invalid: None,
                created: false,
            },
            _ => self.invalid(InvalidReason::IcmpErrorUnmatched),
        }
    }

    // ---- expectations ------------------------------------------------------------------

    /// Remove expectation `i`, giving its place in the global bound back.
    fn take_expect(&mut self, i: usize) -> Expect {
        self.limit.expects.release();
        self.expects.swap_remove(i)
    }

    fn find_expectation(&mut self, now_ms: u64, t: &Tuple) -> Option<usize> {
        if self.expects.is_empty() {
            return None;
        }
        self.expire_expectations(now_ms);
        self.expects.iter().position(|x| x.matches(t))
    }

    fn expire_expectations(&mut self, now_ms: u64) {
        let mut i = 0;
        while i < self.expects.len() {
            if self.expects[i].expires <= now_ms {
                let x = self.take_expect(i);
                self.counters.expect_expired += 1;
                if self.events_on() && !x.from_peer {
                    let snap = expect_snapshot(&x, now_ms);
                    self.push_event(Event::ExpectDestroyed {
                        snapshot: snap,
                        reason: ExpectEnd::Timeout,
                    });
                }
            } else {
                i += 1;
            }
        }
    }

    /// Announce an expected connection (see `Expectation`). Identical announcements from the
    /// same master refresh the timeout; beyond the per-master limit the oldest is evicted;
    /// beyond the global `max_expectations` (shared by all shards) a new one is refused.
    pub fn expect(
        &mut self,
        now: Timestamp,
        req: Expectation,
    ) -> Result<ExpectOutcome, ExpectError> {
        let now_ms = now.as_millis();
        let Some(m) = self.live(req.master) else {
            return Err(ExpectError::NoMaster);
        };
        let x = Expect::from_request(&req, m.tuple, now_ms)?;
        if shard_hash(&x.src, &x.dst, x.proto) as u32 & self.mask != self.id {
            self.counters.expect_refused += 1;
            return Err(ExpectError::WrongShard);
        }
        self.expire_expectations(now_ms);
        if let Some(old) = self.expects.iter_mut().find(|o| o.same_as(&x)) {
            old.expires = x.expires;
            self.counters.expect_refreshed += 1;
            return Ok(ExpectOutcome::Refreshed);
        }
        let owned = self.expects.iter().filter(|o| o.master == x.master).count();
        let oldest = (owned >= self.max_expect_per_master)
            .then(|| {
                self.expects
                    .iter()
                    .enumerate()
                    .filter(|(_, o)| o.master == x.master)
                    .min_by_key(|(_, o)| o.created)
                    .map(|(i, _)| i)
            })
            .flatten();
        if let Some(i) = oldest {
            // The new one takes the evicted one's place in the global bound.
            let old = self.expects.swap_remove(i);
            self.counters.expect_evicted += 1;
            if self.events_on() {
                let snap = expect_snapshot(&old, now_ms);
                self.push_event(Event::ExpectDestroyed {
                    snapshot: snap,
                    reason: ExpectEnd::Evicted,
                });
            }
        } else if !self.limit.expects.reserve() {
            self.counters.expect_refused += 1;
            return Err(ExpectError::TableFull);
        }
        self.counters.expect_created += 1;
        if self.events_on() {
            let snap = expect_snapshot(&x, now_ms);
            self.push_event(Event::ExpectCreated(snap));
        }
        self.expects.push(x);
        Ok(ExpectOutcome::Created)
    }

    /// Copies of the live expectations.
    pub fn expectations(&self, now: Timestamp) -> impl Iterator<Item = ExpectSnapshot> + '_ {
        let now_ms = now.as_millis();
        self.expects
            .iter()
            .filter(move |x| x.expires > now_ms)
            .map(move |x| expect_snapshot(x, now_ms))
    }

    // ---- timers ------------------------------------------------------------------------

    /// Reap expired entries, examining at most `budget` slots from where the last call stopped,
    /// and expired expectations. Returns how many connections were reaped.
    pub fn handle_timeout(&mut self, now: Timestamp, budget: u32) -> u32 {
        let now_ms = now.as_millis();
        self.expire_expectations(now_ms);
        let n = self.entries.len() as u32;
        if n == 0 {
            return 0;
        }
        let mut reaped = 0;
        for _ in 0..budget.min(n) {
            let slot = self.sweep % n;
            self.sweep = (slot + 1) % n;
            let e = &self.entries[slot as usize];
            if e.kind != Kind::Free && e.expires <= now_ms {
                self.counters.expired += 1;
                self.destroy(slot, DestroyReason::Timeout);
                reaped += 1;
            }
        }
        reaped
    }

    /// The earliest expiry among live entries and expectations (a full scan: for tests and
    /// idle shells; the datapath calls `handle_timeout` on a fixed tick instead).
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let c = self
            .entries
            .iter()
            .filter(|e| e.kind != Kind::Free)
            .map(|e| e.expires);
        let x = self.expects.iter().map(|x| x.expires);
        c.chain(x).min().map(Timestamp::from_millis)
    }

    // ---- events and snapshots ------------------------------------------------------------

    /// Is anyone listening (`Config::event_queue > 0`, set when replication is configured)?
    /// Every event site asks before it builds anything, so a standalone node pays one branch.
    #[inline]
    fn events_on(&self) -> bool {
        self.max_events != 0
    }

    /// Queue an event. Callers check `events_on` first, before building it.
    fn push_event(&mut self, ev: Event) {
        if self.events.len() >= self.max_events {
            self.counters.events_dropped += 1;
            self.resync_needed = true;
        } else {
            self.events.push_back(ev);
        }
    }

    /// The helper consumed a segment of connection `id`: queue the whole connection
    /// (`Event::ConnHelper`) so the peer's copy of the helper's parse state stays current.
    /// Nothing when replication is off, the connection is gone or has no helper.
    pub fn helper_changed(&mut self, id: ConnId, now: Timestamp) {
        if !self.events_on() || self.live(id).is_none_or(|e| e.helper.is_none()) {
            return;
        }
        let snap = self.peer_snapshot_slot(id.slot, now.as_millis());
        self.push_event(Event::ConnHelper(snap));
    }

    /// Next event for the replication sender.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Events were lost since the last call (queue overflow): the peer needs a full resync.
    pub fn take_resync_needed(&mut self) -> bool {
        std::mem::take(&mut self.resync_needed)
    }

    /// A copy for the peer: like `snapshot_slot`, with the lifetime `peer_expires_in_ms` gives
    /// it (a TCP connection with data in flight gets its state's own timeout, not the
    /// "unacknowledged data" limit, whose end is not announced).
    fn peer_snapshot_slot(&self, slot: u32, now_ms: u64) -> ConnSnapshot {
        let mut snap = self.snapshot_slot(slot, now_ms);
        snap.expires_in_ms =
            peer_expires_in_ms(&self.timeouts, &self.entries[slot as usize], now_ms);
        snap
    }

    fn snapshot_slot(&self, slot: u32, now_ms: u64) -> ConnSnapshot {
        let e = &self.entries[slot as usize];
        ConnSnapshot {
            tuple: e.tuple,
            proto: e.proto_state(),
            status: e.status & !status::INTERNAL,
            master: e.master.and_then(|m| self.live(m)).map(|m| m.tuple),
            expires_in_ms: e.expires.saturating_sub(now_ms),
            helper: e.helper.clone(),
        }
    }

    /// A copy of a live connection for the peer (its timer as `peer_snapshot_slot` says).
    pub fn snapshot(&self, id: ConnId, now: Timestamp) -> Option<ConnSnapshot> {
        self.live(id)?;
        Some(self.peer_snapshot_slot(id.slot, now.as_millis()))
    }

    /// Copies of every live connection.
    pub fn snapshots(&self, now: Timestamp) -> impl Iterator<Item = ConnSnapshot> + '_ {
        let now_ms = now.as_millis();
        (0..self.entries.len() as u32)
            .filter(move |&s| {
                let e = &self.entries[s as usize];
                e.kind != Kind::Free && e.expires > now_ms
            })
            .map(move |s| self.snapshot_slot(s, now_ms))
    }

    /// The live connection whose original-direction tuple is `t`.
    pub fn find(&self, t: &Tuple) -> Option<ConnId> {
        match self.lookup(t) {
            Some((slot, 0)) => Some(self.id_of(slot)),
            _ => None,
        }
    }

    pub fn conn(&self, id: ConnId) -> Option<ConnInfo> {
        self.live(id).map(info_of)
    }

    /// Unexpired live connections in slots `from..from + scan`, and where the next range
    /// starts (`None`: the shard ends within this one). Counting goes range by range so that
    /// a caller can drop the shard lock between ranges.
    fn unexpired_range(
        &self,
        from: u32,
        scan: usize,
        now_ms: u64,
    ) -> (impl Iterator<Item = &Entry> + '_, Option<u32>) {
        let len = self.entries.len();
        let start = (from as usize).min(len);
        let end = start.saturating_add(scan).min(len);
        let next = (end < len).then_some(end as u32);
        let it = self.entries[start..end]
            .iter()
            .filter(move |e| e.kind != Kind::Free && e.expires > now_ms);
        (it, next)
    }

    /// How many unexpired connections in slots `from..from + scan` match `filter` (no
    /// snapshot built, nothing allocated), and where the next range starts.
    pub fn count_where(
        &self,
        from: u32,
        scan: usize,
        now: Timestamp,
        filter: &dyn Fn(&ConnInfo) -> bool,
    ) -> (u64, Option<u32>) {
        let (it, next) = self.unexpired_range(from, scan, now.as_millis());
        (it.filter(|e| filter(&info_of(e))).count() as u64, next)
    }

    /// Unexpired connections in slots `from..from + scan` by protocol and TCP state (nothing
    /// allocated), added to `c`; returns where the next range starts.
    pub fn state_counts(
        &self,
        from: u32,
        scan: usize,
        now: Timestamp,
        c: &mut StateCounts,
    ) -> Option<u32> {
        let (it, next) = self.unexpired_range(from, scan, now.as_millis());
        for e in it {
            match e.kind {
                Kind::Tcp => c.tcp[e.tcp.state() as usize] += 1,
                Kind::Udp => c.udp += 1,
                Kind::Icmp => c.icmp += 1,
                Kind::Generic => c.generic += 1,
                Kind::Free => {}
            }
        }
        next
    }

    /// One page of a listing: snapshots of the unexpired connections matching `filter` in slots
    /// `from..`, appended to `out` until it holds `limit` or `scan` slots were examined. Returns
    /// the slot to resume at, or `None` at the end of the shard. A connection keeps its slot
    /// for life, so one that lives through a whole paged listing is listed exactly once.
    pub fn snapshots_page(
        &self,
        from: u32,
        limit: usize,
        scan: usize,
        now: Timestamp,
        filter: &dyn Fn(&ConnInfo) -> bool,
        out: &mut Vec<ConnSnapshot>,
    ) -> Option<u32> {
        let now_ms = now.as_millis();
        let end = self.entries.len() as u32;
        let mut slot = from;
        let mut scanned = 0;
        while slot < end {
            if out.len() >= limit || scanned >= scan {
                return Some(slot);
            }
            let e = &self.entries[slot as usize];
            if e.kind != Kind::Free && e.expires > now_ms && filter(&info_of(e)) {
                out.push(self.snapshot_slot(slot, now_ms));
            }
            slot += 1;
            scanned += 1;
        }
        None
    }

    pub fn helper_state_mut(&mut self, id: ConnId) -> Option<&mut HelperState> {
        let e = self.entries.get_mut(id.slot as usize)?;
        if e.kind == Kind::Free || e.gen != id.gen {
            return None;
        }
        e.helper.as_deref_mut()
    }

    /// Check the table's internal consistency (tests and fuzzing).
    pub fn check_invariants(&self) -> Result<(), String> {
        let live = self.entries.iter().filter(|e| e.kind != Kind::Free).count();
        if live != self.len as usize {
            return Err(format!("len {} but {} live entries", self.len, live));
        }
        for (what, b) in [
            ("connections", &self.limit.conns),
            ("expectations", &self.limit.expects),
        ] {
            if b.count() > b.max() {
                return Err(format!("{} {what} above the bound {}", b.count(), b.max()));
            }
        }
        if self.index.len() != 2 * live {
            return Err(format!(
                "index has {} slots for {} entries",
                self.index.len(),
                live
            ));
        }
        for (slot, e) in self.entries.iter().enumerate() {
            if e.kind == Kind::Free {
                continue;
            }
            for dir in 0..2u32 {
                match self.lookup(&e.tuple_in(dir)) {
                    Some((s, d)) if s == slot as u32 && d == dir => {}
                    other => return Err(format!("slot {slot} dir {dir} looks up as {other:?}")),
                }
            }
        }
        for x in &self.expects {
            if self.live(x.master).is_none() {
                return Err("expectation outlived its master".into());
            }
            if (x.stale || x.orphan) && !x.from_peer {
                return Err("a local expectation is marked stale or orphaned".into());
            }
            if x.stale && x.orphan {
                return Err("an orphaned expectation is marked stale".into());
            }
        }
        for e in self.entries.iter().filter(|e| e.kind != Kind::Free) {
            if e.status & status::FROM_PEER == 0 && e.status & status::INTERNAL != 0 {
                return Err(
                    "an entry not learned from the peer is marked stale or orphaned".into(),
                );
            }
            if e.status & status::INTERNAL == status::INTERNAL {
                return Err("an orphaned entry is marked stale".into());
            }
            if e.kind == Kind::Tcp && e.tcp.state.checked().is_none() {
                return Err("TCP state out of range".into());
            }
            let long = |h: &HelperState| h.dir.iter().any(|d| usize::from(d.len) > LINE_MAX);
            if e.helper.as_deref().is_some_and(long) {
                return Err("helper line longer than its buffer".into());
            }
        }
        if self.free.len() + live != self.entries.len() {
            return Err("free list and slab disagree".into());
        }
        Ok(())
    }
}

#[inline]
fn info_of(e: &Entry) -> ConnInfo {
    ConnInfo {
        tuple: e.tuple,
        proto: e.proto_state(),
        status: e.status & !status::PEER_STALE,
        master: e.master,
        expires: Timestamp::from_millis(e.expires),
    }
}

fn expect_snapshot(x: &Expect, now_ms: u64) -> ExpectSnapshot {
    ExpectSnapshot {
        master: x.master_tuple,
        proto: x.proto,
        src: x.src,
        src_port: x.src_port,
        dst: x.dst,
        dst_port: x.dst_port,
        family: x.family,
        expires_in_ms: x.expires.saturating_sub(now_ms),
        helper: x.helper,
    }
}

/// Does moving a connection's expiry from `old` to `new` (ms; `timeout` is the timeout that
/// set `new`) need announcing to the peer, although nothing else changed? A peer's copy learns
/// the timer only from the items it gets, and packets refresh it here without one (found by
/// the `sync_wire` fuzz target: a UDP or ICMP flow kept alive by traffic expired on the standby,
/// which a failover then dropped). Announcing each time the expiry crosses a multiple of the
/// largest power of two not above half the timeout keeps the copy at least half a timeout from
/// expiring while packets flow, at two to four updates per timeout per busy connection (one
/// every 1.6 to 3.2 days for an established TCP connection), with no state per entry: one shift
/// and compare per packet.
///
/// Only a forward move by less than half the timeout counts: a jump between timeout classes
/// (a TCP connection's 300 s "unacknowledged data" timeout and its 5-day established one flip
/// with nearly every ACK of a bulk transfer) is not a refresh, and announcing it made an update
/// per packet, which kept a busy pair's sync stream from ever catching up (the end-to-end
/// `sync_link_down_3s_then_up_loses_no_session_at_a_later_failover` caught it).
#[inline]
fn refresh_due(old: u64, new: u64, timeout: u64) -> bool {
    let k = 63 - (timeout / 2).max(1).leading_zeros();
    new > old && new - old < timeout / 2 && new >> k != old >> k
}
