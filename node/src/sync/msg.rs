//! The messages of the state-replication protocol, as the sans-IO core sees them.
//!
//! Owns the protocol's vocabulary: what one replicated change (`Item`) is, and the messages two
//! gateways exchange on their one stream (`Msg`). These are plain Rust types; `codec` turns them
//! into `keepstate.v1.Sync` protobuf and back (and validates what comes in), so the core and its
//! simulated-link tests never see protobuf. Must not touch the table, the network or a clock.

pub use crate::conntrack::ConnUpdate;
use crate::conntrack::{ConnSnapshot, ExpectSnapshot, Tuple};

/// Protocol version this build speaks (`Hello::version`).
pub const VERSION: u32 = 1;

/// The oldest peer version this build understands (the first release speaks 1). A Hello below
/// it closes the stream (`CloseReason::UnsupportedVersion`, counted in the session's
/// `versions_refused`, shown by `fwctl sync status`). A newer peer is accepted: its unknown
/// fields and message kinds are skipped by the codec, and it is the newer side's job to refuse
/// a version it no longer speaks. Raise this only together with a release note: a rolling
/// upgrade needs N to speak N−1.
pub const MIN_PEER_VERSION: u32 = 1;

/// Position in one node's stream of items (per boot of that node; the first item is 1).
pub type Seq = u64;

/// One replicated change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// A whole connection: its creation, a change of its helper state, or a re-send the peer
    /// asked for (`Msg::Need`) or a bulk transfer carries. Replaces what the receiver has.
    Conn(ConnSnapshot),
    /// A state change of a connection the receiver should have; one it does not have is
    /// reported to the core (`Session::missing`), which asks for it whole.
    Update(ConnUpdate),
    /// The connection left the sender's table. The receiver removes only an entry it learned
    /// from the sender and has not used itself (a `ConnGone` from the old active must not
    /// delete what the new active owns).
    ConnGone(Tuple),
    /// An operator deleted the connection on the sender (`fwctl ct delete`): the receiver
    /// removes its entry whoever owns it (`Conntrack::kill_conn`). A build that predates this
    /// kind skips it (`Skip::UnknownKind`, counted): during a rolling upgrade a delete reaches
    /// only upgraded peers.
    ConnKilled(Tuple),
    Expect(ExpectSnapshot),
    ExpectGone(ExpectSnapshot),
    /// An item this build cannot use: a kind a newer peer sent, or one that failed validation.
    /// It keeps its sequence number (the stream stays gap-free) and changes nothing.
    Skipped(Skip),
}

/// Why a received item was skipped (counted per reason by the shell).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// An item kind this build does not know (a newer peer).
    UnknownKind,
    /// Malformed: a bad tuple, address, enum value, length or range.
    Invalid,
}

/// What a node already holds of its peer's stream, so that a reconnect resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    /// The peer's boot id the sequence numbers belong to.
    pub boot_id: u64,
    /// Every item up to this one has been applied.
    pub seq: Seq,
}

/// First message on a stream, both ways.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub node_id: u64,
    /// Random per process start: sequence numbers restart with it.
    pub boot_id: u64,
    /// `None`: this node holds nothing of the peer's current boot and needs a bulk transfer.
    pub resume: Option<Resume>,
}

/// One message on the stream between two gateways. Each side sends and receives all kinds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    Hello(Hello),
    /// Items numbered `first_seq`, `first_seq + 1`, ... of the sender's stream.
    Batch {
        first_seq: Seq,
        items: Vec<Item>,
    },
    /// Cumulative: every item of the peer's stream up to `seq` has been applied here.
    Ack {
        seq: Seq,
    },
    /// Items from `from` on did not arrive (a gap): send them again, or a bulk if they are gone.
    Nack {
        from: Seq,
    },
    /// Nothing else to send for a while; proves the peer is alive.
    Heartbeat,
    /// A full-table transfer begins. When it completes the receiver is in sync with the
    /// sender's stream up to `seq` (items after it follow as batches, interleaved or after).
    BulkStart {
        id: u64,
        seq: Seq,
        estimate: u64,
    },
    /// Chunk `index` (0, 1, ...) of bulk `id`.
    BulkChunk {
        id: u64,
        index: u32,
        items: Vec<Item>,
    },
    /// The last chunk of bulk `id` was `chunks - 1`.
    BulkEnd {
        id: u64,
        chunks: u32,
    },
    /// Cumulative: chunks up to `index` of bulk `id` were applied (`BulkEnd` is acked with
    /// `index == chunks`).
    BulkAck {
        id: u64,
        index: u32,
    },
    /// Chunk `index` of bulk `id` was missing: send again from it.
    BulkNack {
        id: u64,
        index: u32,
    },
    /// Please send a bulk transfer (an operator's resync, or this side lost items).
    BulkRequest,
    /// The receiver got updates for connections it does not have: send them whole.
    Need {
        tuples: Vec<Tuple>,
    },
}
