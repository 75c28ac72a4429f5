//! What the tracker tells the outside world: events for replication and plain snapshots of
//! connections and expectations that a peer can import.
//!
//! Owns the event and snapshot types. Must not touch the table: what a snapshot may hold is
//! checked where it is imported (`table::peer`).

use super::helper_state::{HelperKind, HelperState};
use super::tcp::TcpConn;
use super::tuple::Tuple;

/// Connection status bits.
pub mod status {
    /// A packet was seen in the reply direction.
    pub const SEEN_REPLY: u16 = 0x0001;
    /// Traffic both ways (TCP: handshake done): not an early-drop victim.
    pub const ASSURED: u16 = 0x0002;
    /// Created from an expectation: RELATED until the first reply.
    pub const RELATED: u16 = 0x0004;
    /// Learned from a peer by state replication and not used here yet: windows are re-learned
    /// from live packets, and the peer may remove it (`Conntrack::remove_conn`, the sweep after
    /// a bulk transfer). The first local packet clears it: from then on the entry is ours.
    pub const FROM_PEER: u16 = 0x0008;
    /// The bits a peer's copy contributes; the rest of what it sends is ignored (FROM_PEER
    /// means "learned by *this* node"). SEEN_REPLY and ASSURED only ever get set.
    pub const REPLICATED: u16 = SEEN_REPLY | ASSURED | RELATED;
    /// Internal: a learned entry not refreshed since `Conntrack::begin_peer_bulk`. Never
    /// shown outside the table.
    pub(crate) const PEER_STALE: u16 = 0x0010;
    /// Internal: learned from an earlier boot of the peer, which lost it by restarting. The
    /// new boot's bulks do not sweep it (the peer never had it; this table holds the only
    /// copy, and sends it back to the peer); a live item for it from the peer, or a local
    /// packet, makes it ordinary again. Never shown outside the table.
    pub(crate) const PEER_ORPHAN: u16 = 0x0020;
    /// The internal bits, masked out of every snapshot.
    pub(crate) const INTERNAL: u16 = PEER_STALE | PEER_ORPHAN;
}

/// Protocol-specific state of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ProtoState {
    Tcp(TcpConn),
    Udp,
    IcmpEcho,
    Generic,
}

/// A self-contained copy of one connection, as shipped to a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnSnapshot {
    /// Original-direction tuple.
    pub tuple: Tuple,
    pub proto: ProtoState,
    /// `status::*` bits.
    pub status: u16,
    /// Original-direction tuple of the master connection, for RELATED connections.
    pub master: Option<Tuple>,
    /// Milliseconds until the entry expires.
    pub expires_in_ms: u64,
    /// The helper's per-direction parse state (FTP control connections).
    pub helper: Option<Box<HelperState>>,
}

/// The state of a connection the receiver is expected to have already (no helper state, no
/// master): what most changes are, and cheap to build on the packet path. Replication ships it
/// as `sync::Item::Update`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnUpdate {
    pub tuple: Tuple,
    pub proto: ProtoState,
    /// `conntrack::event::status` bits.
    pub status: u16,
    pub expires_in_ms: u64,
}

/// A copy of one expectation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectSnapshot {
    pub master: Tuple,
    pub proto: u8,
    pub src: [u8; 16],
    pub src_port: Option<u16>,
    pub dst: [u8; 16],
    pub dst_port: u16,
    pub family: u8,
    pub expires_in_ms: u64,
    pub helper: Option<HelperKind>,
}

/// Why a connection left the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestroyReason {
    Timeout,
    EarlyDrop,
    /// Replaced by a new connection with the same tuple (TCP reopen in TIME_WAIT/CLOSE).
    Reopened,
    /// Removed by the datapath (policy dropped its first packet), or by the peer's kill of a
    /// connection this node owned (`Shard::kill_conn`).
    Removed,
    /// An operator deleted it (`fwctl ct delete`, `Conntrack::delete_where`): announced even
    /// when it was learned from the peer, as a kill (`sync::Item::ConnKilled`) that removes the
    /// peer's entry whoever owns it.
    Killed,
}

/// Why an expectation left the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectEnd {
    Matched,
    Timeout,
    Evicted,
    MasterGone,
}

/// A change the replication sender ships to peers. None is built when replication is off
/// (`Config::event_queue == 0`), and none for what a peer told us (no echo).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A new connection, whole (its master's tuple and an empty helper state included).
    ConnCreated(ConnSnapshot),
    /// The protocol state or status bits changed: the compact form, built on the packet path
    /// without cloning the helper state or looking up the master.
    ConnUpdated(ConnUpdate),
    /// The helper consumed a segment of this connection (`Shard::helper_changed`): the whole
    /// connection again, so that the peer holds the helper's parse state (next sequence
    /// number, partial line) and parses the first command after a failover. The receiver
    /// imports it like `ConnCreated` (it replaces what it holds, never moving the TCP state
    /// back); it is a separate variant so the sender can coalesce or count it apart.
    ConnHelper(ConnSnapshot),
    ConnDestroyed {
        tuple: Tuple,
        reason: DestroyReason,
    },
    ExpectCreated(ExpectSnapshot),
    ExpectDestroyed {
        snapshot: ExpectSnapshot,
        reason: ExpectEnd,
    },
}
