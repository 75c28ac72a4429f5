//! The sans-IO replication core: a node's numbered stream of changes (`Outbox`) and one
//! `Session` per peer that carries it over one ordered stream and applies the peer's stream.
//!
//! Owns the protocol's state machines: the Hello handshake, resume, batching, acks, go-back-N
//! retransmission, heartbeats and idle detection, bulk transfers, and "send me this entry whole"
//! (`Need`). It takes messages and an explicit `now` and returns messages (`poll_transmit`),
//! a deadline (`poll_timeout`) and table operations (`poll_op`). Must not touch the table, a
//! socket, a clock or protobuf: `sync::replicator` applies `Op`s, `codec` does the wire.
//!
//! Decisions (the reasons are the interesting part):
//!
//! - **Hello first.** Nothing but our Hello is sent before it; anything but a Hello received before
//!   the peer's is a protocol error (`Op::Close`). A second Hello is an error too. Any
//!   `version >= 1` is accepted.
//! - **Resume or bulk.** On the peer's Hello the sender resumes from `resume.seq + 1` only if the
//!   resume names this boot, every item after it is still in the outbox and `Outbox::mark_lost`
//!   has not been called since this session's last bulk; otherwise it starts a bulk. A receiver
//!   whose bulk did not complete holds nothing usable and says `resume: None`.
//! - **Bulk and live items are ordered against each other by the sender.** A chunk is a snapshot
//!   of part of the table taken at some point of the outbox. If a live item younger than that
//!   snapshot were applied *before* the chunk, the chunk would roll it back (a `ConnGone` undone:
//!   a ghost entry). So each chunk remembers the outbox position the core had seen before the shell
//!   read it (a lower bound of the read's position), and live items beyond the oldest unacked
//!   chunk's position are held back until that chunk is acked (applied); live items beyond
//!   `BulkStart.seq` wait for the bulk's first ack. Older items may still arrive after a chunk;
//!   replaying a suffix of the stream over a newer snapshot converges, because every item carries
//!   the entry's full new state and the last one wins. On an ordered stream this costs one round
//!   trip of live lag during a bulk; on the simulated lossy link it is what keeps the replica exact.
//! - **Chunk entries are `Op::Import`, live items `Op::Apply`.** Because of the ordering above, a
//!   chunk entry is never older than anything the receiver applied from this stream, so the replicator
//!   replaces what it has (even a higher TCP state: a stale entry from an earlier incarnation of
//!   the tuple must go). A live `Update` may be older than a chunk entry, so the replicator merges it
//!   without moving TCP state backwards; a live `Conn` replaces (it starts an incarnation, and a
//!   stale entry of an earlier one, say from the peer's previous boot, must not block it; if it
//!   is an older re-send, the items after it restore the newest state). A chunk carries only
//!   `Conn` and `Expect`; any other kind is counted (`invalid_items`) and dropped.
//! - **Bulk framing.** `BulkAck { index }` acknowledges positions `0..=index`, where the chunks are
//!   positions `0..chunks` and `BulkEnd` is position `chunks`; the first ack of a bulk also proves
//!   its `BulkStart` arrived. A chunk of a bulk the receiver has not seen start is answered with
//!   `BulkNack { index: 0 }`, which makes the sender repeat `BulkStart`. A new bulk replaces a running
//!   one on both sides (`Op::BulkBegin` again, without an `Op::BulkEnd` for the old one). A stream
//!   break abandons a bulk; the next Hello asks for a new one (it restarts from the beginning: the
//!   table may have changed arbitrarily while apart).
//! - **Receiving a bulk.** On `BulkStart { seq }` the receiver's applied position jumps to `seq`
//!   (the bulk covers everything before) so live items after it apply while the bulk runs, and
//!   its resume state is invalid until `BulkEnd`.
//! - **Needs are answered in the stream.** `Op::Lookup` is answered with `Session::resend`, which
//!   pushes the snapshots into the outbox as new sequenced `Item::Conn`s, and an `Item::ConnGone`
//!   for each asked tuple the table no longer has: every peer gets the entry again (harmless), they
//!   are ordered, acked and retransmitted like any change, and every need gets an answer. The
//!   receiver keeps a need outstanding until a `Conn` or `ConnGone` for the tuple arrives and asks
//!   again after `retransmit_timeout` or a reconnect. The replicator must look up and push under the
//!   same table lock (a change between the two would be reordered behind an older snapshot).
//! - **Backpressure instead of drops.** The op queue is bounded (`Config::max_queued_ops`): a
//!   batch or chunk that arrives while it is full is not applied and not acked, and the gap is
//!   repaired by Nack/retransmission. Pending needs are bounded (`max_pending_needs`); beyond
//!   that the receiver asks for a bulk instead (counted).
//! - **Ready (`in_sync`).** True once a bulk from the peer completed or a resume was accepted, and
//!   it stays true across disconnects and peer restarts: a node whose peer died must be able to
//!   take over, and a restarted peer's table is no reason to doubt ours. It becomes false again
//!   only when a resume we offered for the peer's current boot is refused (the peer's first data
//!   after the Hellos is a bulk we did not ask for: we reconnected after a gap its outbox no
//!   longer covers, or it lost items meanwhile), until that bulk completes.
//!   Whenever not synced, it turns true `bulk_timeout` after the wait began (session start, or
//!   the refused resume), so a node without a reachable peer still comes up.
//! - **Caller contract for table operations** (`sync::replicator` is the caller). Answer `Op::ReadBulk` with `bulk_page` before calling
//!   anything else on the session (the chunk's outbox position is taken then); page by a cursor
//!   that lists every entry which lives through the whole bulk at least once (twice is
//!   harmless: chunk entries replace), masters before what depends on them, about
//!   `bulk_chunk_items` entries a page (the core does not enforce it), in the scope
//!   `bulk_scope` says; and at `Op::BulkBegin`/`Op::BulkEnd` mark and sweep only entries
//!   learned from *this* peer. `Replicator` does this with `Replica::bulk_page` (on
//!   `Conntrack`: pages of `bulk_chunk_items` connections, plus a shard's expectations whole) and
//!   `begin_peer_bulk`/`end_peer_bulk`, which mark and sweep every learned entry: a learned
//!   entry does not record its peer, which is exact for a pair (one peer) only.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use super::msg::{Hello, Item, Msg, Resume, Seq, MIN_PEER_VERSION, VERSION};
use crate::conntrack::{BulkScope, ConnSnapshot, Tuple};
use crate::time::Timestamp;

/// Most `Op::Lookup`s waiting for `resend`; beyond it a `Need` is dropped (the peer asks again).
const MAX_LOOKUPS: usize = 64;

/// Tunables of a session. Both ends should run the same values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Most items in one `Batch`.
    pub batch_items: usize,
    /// Most sequenced items sent and not yet acked.
    pub window_items: u64,
    /// Acks are coalesced for this long.
    pub ack_delay: Duration,
    /// No ack progress for this long: send again from the first unacked item (or chunk).
    pub retransmit_timeout: Duration,
    /// Send a heartbeat when nothing was sent for this long.
    pub heartbeat_interval: Duration,
    /// Nothing received for this long: the stream is dead.
    pub idle_timeout: Duration,
    /// Most entries the shell puts in one bulk page (one `BulkChunk`).
    pub bulk_chunk_items: usize,
    /// Most bulk chunks read and not yet acked.
    pub bulk_window_chunks: usize,
    /// A bulk that has not completed by then no longer keeps the node from being ready.
    pub bulk_timeout: Duration,
    /// Most table operations queued for the shell; beyond it incoming items wait for a resend.
    pub max_queued_ops: usize,
    /// Most connections asked for (`Need`) and not yet sent; beyond it the receiver asks for a bulk.
    pub max_pending_needs: usize,
    /// Most tuples in one `Need` message, and in one `Op::Lookup`.
    pub need_batch: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            batch_items: 512,
            window_items: 65_536,
            ack_delay: Duration::from_millis(2),
            retransmit_timeout: Duration::from_millis(500),
            heartbeat_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(3),
            bulk_chunk_items: 1024,
            bulk_window_chunks: 8,
            bulk_timeout: Duration::from_secs(30),
            max_queued_ops: 131_072,
            max_pending_needs: 4096,
            need_batch: 1024,
        }
    }
}

/// This node's numbered stream of items, shared by all its peer sessions (one per peer).
/// Bounded: when full the oldest items are dropped; a session whose peer still needed them
/// must do a bulk instead. Pushing never allocates (the ring is allocated up front).
#[derive(Debug)]
pub struct Outbox {
    boot_id: u64,
    capacity: usize,
    items: VecDeque<Item>,
    /// Sequence number of `items[0]` (or of the next push when empty).
    first_seq: Seq,
    /// Bumped by `mark_lost`; each session remembers the value its last bulk covered.
    lost_gen: u64,
    /// Pushed items dropped because the ring was full.
    dropped: u64,
    /// The shell's latest count of table entries, for `BulkStart::estimate`.
    table_estimate: u64,
}

impl Outbox {
    pub fn new(boot_id: u64, capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Outbox {
            boot_id,
            capacity,
            items: VecDeque::with_capacity(capacity),
            first_seq: 1,
            lost_gen: 0,
            dropped: 0,
            table_estimate: 0,
        }
    }

    /// Appends an item; returns its sequence number (the first is 1).
    pub fn push(&mut self, item: Item) -> Seq {
        if self.items.len() == self.capacity {
            self.items.pop_front();
            self.first_seq += 1;
            self.dropped += 1;
        }
        self.items.push_back(item);
        self.last_seq()
    }

    /// Items were lost before they reached the outbox (the datapath's queue overflowed):
    /// every peer needs a bulk.
    pub fn mark_lost(&mut self) {
        self.lost_gen += 1;
    }

    pub fn boot_id(&self) -> u64 {
        self.boot_id
    }

    /// The newest item's number; 0 before the first push.
    pub fn last_seq(&self) -> Seq {
        self.first_seq + self.items.len() as u64 - 1
    }

    /// The oldest item still held; `last_seq() + 1` when empty.
    pub fn first_seq(&self) -> Seq {
        self.first_seq
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Items pushed out of the ring by newer ones.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn lost_generation(&self) -> u64 {
        self.lost_gen
    }

    /// The item numbered `seq`, if still held.
    pub fn get(&self, seq: Seq) -> Option<&Item> {
        let idx = seq.checked_sub(self.first_seq)?;
        self.items.get(usize::try_from(idx).ok()?)
    }

    /// How many entries the table holds (the shell updates it now and then): what a bulk announces.
    pub fn set_table_estimate(&mut self, entries: u64) {
        self.table_estimate = entries;
    }

    pub fn table_estimate(&self) -> u64 {
        self.table_estimate
    }
}

/// Why a session closed its stream.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    #[error("nothing received for the idle timeout")]
    IdleTimeout,
    #[error("message before the peer's Hello")]
    MessageBeforeHello,
    #[error("second Hello on one stream")]
    DuplicateHello,
    #[error(
        "the peer speaks sync protocol version {0}; this node speaks {VERSION} and understands \
         {MIN_PEER_VERSION} and newer"
    )]
    UnsupportedVersion(u32),
    #[error("peer is node {got}, expected node {expected}")]
    UnexpectedPeer { expected: u64, got: u64 },
    #[error("peer claims this node's own id")]
    SelfConnect,
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
}

/// What the shell must do for a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Apply a live item from the peer's stream to the table (marked `FROM_PEER`). An
    /// `Item::Conn` replaces what the table has (a creation, a helper change or a re-send: it may
    /// be a new incarnation of a tuple the table holds stale). An `Item::Update` merges without
    /// moving the TCP state backwards: it may be older than an entry a bulk imported (the items
    /// after it follow in order and restore the newest state). An update for a connection the
    /// table does not have: call `Session::missing(tuple)`.
    Apply(Item),
    /// An entry of a bulk chunk (`Item::Conn` or `Item::Expect`): the peer's state, never older
    /// than anything applied from its stream before. Replace what the table has.
    Import(Item),
    /// A bulk from the peer begins (again, if one was running): start marking the learned
    /// entries that `Apply`/`Import` touch. `peer_restarted`: it comes from a new boot of the
    /// peer, and what the table learned came from an earlier one (the peer lost it: the table
    /// keeps it, see `Conntrack::begin_peer_bulk`).
    BulkBegin { peer_restarted: bool },
    /// The bulk completed: remove this peer's learned entries not touched since `BulkBegin`
    /// (the peer destroyed them while we were apart).
    BulkEnd,
    /// The peer asked for these connections whole: look them up and call `Session::resend`.
    Lookup(Vec<Tuple>),
    /// Read the next bulk page from `cursor` (opaque; 0 = start) and call `Session::bulk_page`.
    ReadBulk { cursor: u64 },
    /// The stream is dead: drop it, call `Session::disconnected`, and reconnect.
    Close(CloseReason),
}

/// Progress of one bulk transfer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BulkProgress {
    pub id: u64,
    /// Chunks applied (receiver) or read (sender).
    pub chunks: u32,
    pub items: u64,
    /// Entries the sender announced.
    pub estimate: u64,
}

/// A session's counters and positions, for `fwctl sync status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// The stream is up and both Hellos were exchanged.
    pub connected: bool,
    /// The peer holds our table: connected, and it resumed our stream or our bulk to it
    /// completed, with nothing lost since (no bulk to it running or due). Live items may still
    /// be in flight (`lag`). What a planned switchover to this peer requires.
    pub peer_has_table: bool,
    pub peer_node_id: Option<u64>,
    pub peer_boot_id: Option<u64>,
    /// This node's newest item.
    pub last_seq: Seq,
    /// Highest item sent to this peer (or covered by a bulk).
    pub sent: Seq,
    pub acked: Seq,
    /// `last_seq - acked`: items this peer does not have yet.
    pub lag: u64,
    /// Items sent and not acked.
    pub in_flight: u64,
    /// Operations waiting for the shell.
    pub queued_ops: usize,
    /// Peer's stream: every item up to this one is applied.
    pub applied: Seq,
    pub items_applied: u64,
    pub items_imported: u64,
    /// Bulks to the peer started / completed.
    pub bulks_started: u64,
    pub bulks_sent: u64,
    /// Bulks from the peer completed.
    pub bulks_received: u64,
    pub bulk_rx: Option<BulkProgress>,
    pub bulk_tx: Option<BulkProgress>,
    /// Bulks started to replace state the peer could not resume (every bulk after the first).
    pub resyncs: u64,
    pub last_error: Option<CloseReason>,
    /// Streams closed because of what the peer sent (every `CloseReason` but `IdleTimeout`).
    pub protocol_errors: u64,
    /// The protocol version of the peer's last Hello.
    pub peer_version: Option<u32>,
    /// Hellos refused for a version this build does not understand (`MIN_PEER_VERSION`).
    pub versions_refused: u64,
    pub nacks_sent: u64,
    pub nacks_received: u64,
    pub retransmits: u64,
    pub needs_sent: u64,
    /// Connections waiting to be asked for.
    pub pending_needs: usize,
    /// Tuples not asked for because too many were pending (a bulk was asked instead).
    pub needs_dropped: u64,
    pub lookups: u64,
    pub resent: u64,
    /// Received items of a kind a bulk chunk must not carry.
    pub invalid_items: u64,
    /// Batches or chunks not applied because the op queue was full.
    pub backpressure: u64,
}

/// The stream: down, or up with the handshake's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Down,
    Up {
        hello_sent: bool,
        peer: Option<Hello>,
    },
    /// Closed by us; waiting for the shell's `disconnected`.
    Closed,
}

/// Whether this node may take traffic, as far as this peer is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readiness {
    /// Waiting for a first bulk (or for the timeout) since `since`.
    Waiting {
        since: Timestamp,
    },
    Synced,
}

/// One chunk read and not yet acked.
#[derive(Debug)]
struct TxChunk {
    items: Vec<Item>,
    /// Outbox position seen before the page was read: live items after it wait for this chunk's ack.
    limit: Seq,
}

#[derive(Debug)]
struct BulkTx {
    id: u64,
    seq: Seq,
    /// The outbox's lost generation this bulk makes good once it completes.
    lost_gen: u64,
    estimate: u64,
    /// Next page to read; `None` once the table was read to the end.
    cursor: Option<u64>,
    read_pending: bool,
    /// Chunks `base..read_chunks`, read and not acked.
    chunks: VecDeque<TxChunk>,
    base: u32,
    read_chunks: u32,
    next_tx: u32,
    items_read: u64,
    start_sent: bool,
    start_acked: bool,
    end_sent: bool,
    last_progress: Timestamp,
}

impl BulkTx {
    /// Chunk count, once the table has been read to the end.
    fn total(&self) -> Option<u32> {
        self.cursor.is_none().then_some(self.read_chunks)
    }

    fn outstanding(&self) -> bool {
        (self.start_sent && !self.start_acked) || self.next_tx > self.base || self.end_sent
    }

    /// Live items beyond this must wait.
    fn live_limit(&self) -> Seq {
        if !self.start_acked {
            self.seq
        } else {
            self.chunks.front().map_or(Seq::MAX, |c| c.limit)
        }
    }
}

#[derive(Debug)]
struct Tx {
    /// The peer's Hello was handled: we know where its stream starts.
    ready: bool,
    acked: Seq,
    next_send: Seq,
    max_sent: Seq,
    last_progress: Timestamp,
    lost_gen: u64,
    bulk: Option<BulkTx>,
    next_bulk_id: u64,
    /// Tuples of each `Op::Lookup` not yet answered by `resend`, oldest first.
    lookups: VecDeque<Vec<Tuple>>,
}

#[derive(Debug)]
struct BulkRx {
    id: u64,
    next: u32,
    items: u64,
    estimate: u64,
    nacked_at: Option<u32>,
}

impl Rx {
    /// Ask again for everything asked and not answered.
    fn requeue_needs(&mut self) {
        self.needs.clear();
        self.needs.extend(self.needs_unanswered.iter().copied());
    }

    /// A whole entry or its removal arrived: whatever was asked for it is answered.
    fn answered(&mut self, item: &Item) {
        if self.needs_unanswered.is_empty() {
            return;
        }
        if let Item::Conn(ConnSnapshot { tuple, .. })
        | Item::ConnGone(tuple)
        | Item::ConnKilled(tuple) = item
        {
            self.needs_unanswered.remove(tuple);
        }
    }
}

#[derive(Debug)]
struct Rx {
    /// The peer boot our positions belong to.
    boot: Option<u64>,
    applied: Seq,
    /// `applied` rests on a complete base (a finished bulk, or an accepted resume of one).
    valid: bool,
    acked_sent: Seq,
    ack_due: Option<Timestamp>,
    nack_pending: Option<Seq>,
    nacked_at: Option<Seq>,
    bulk: Option<BulkRx>,
    /// Highest bulk id seen on this stream (older ones are stale).
    last_bulk_id: u64,
    completed: Option<(u64, u32)>,
    bulk_ack_pending: Option<(u64, u32)>,
    bulk_nack_pending: Option<(u64, u32)>,
    /// Connections to ask for (next `Need`s); a tuple answered meanwhile is skipped.
    needs: Vec<Tuple>,
    /// Every connection wanted and not yet received (a `Conn` or `ConnGone` for it answers).
    needs_unanswered: HashSet<Tuple>,
    /// When unanswered needs are asked again.
    needs_due: Option<Timestamp>,
    bulk_request_pending: bool,
    requested_by_us: bool,
    /// Our Hello offered a resume for the peer's boot; its first data says whether it was taken.
    resume_pending: bool,
}

/// One peer: long-lived across reconnects.
#[derive(Debug)]
pub struct Session {
    cfg: Config,
    node_id: u64,
    expected_peer: Option<u64>,
    stream: Stream,
    last_recv: Timestamp,
    last_sent: Timestamp,
    /// `outbox.last_seq()` as of the latest call that had the outbox.
    seen_last_seq: Seq,
    tx: Tx,
    rx: Rx,
    ops: VecDeque<Op>,
    readiness: Readiness,
    st: SessionStats,
    /// The peer boot whose items we last applied or imported: what we learned belongs to it.
    learned_from: Option<u64>,
}

impl Session {
    pub fn new(cfg: Config, node_id: u64, now: Timestamp) -> Self {
        Session {
            cfg,
            node_id,
            expected_peer: None,
            stream: Stream::Down,
            last_recv: now,
            last_sent: now,
            seen_last_seq: 0,
            tx: Tx {
                ready: false,
                acked: 0,
                next_send: 1,
                max_sent: 0,
                last_progress: now,
                lost_gen: 0,
                bulk: None,
                next_bulk_id: 1,
                lookups: VecDeque::new(),
            },
            rx: Rx {
                boot: None,
                applied: 0,
                valid: false,
                acked_sent: 0,
                ack_due: None,
                nack_pending: None,
                nacked_at: None,
                bulk: None,
                last_bulk_id: 0,
                completed: None,
                bulk_ack_pending: None,
                bulk_nack_pending: None,
                needs: Vec::new(),
                needs_unanswered: HashSet::new(),
                needs_due: None,
                bulk_request_pending: false,
                requested_by_us: false,
                resume_pending: false,
            },
            ops: VecDeque::new(),
            readiness: Readiness::Waiting { since: now },
            st: SessionStats::default(),
            learned_from: None,
        }
    }

    /// What a bulk for this peer carries. Our own entries; and what we learned from the peer
    /// (and never used) only if it restarted since we learned it, so that its table lost them.
    /// Echoing a live peer's entries back races its own changes (a reset connection came back
    /// to it as a learned SYN_SENT entry; found by the `sync_wire` fuzz target).
    pub fn bulk_scope(&self) -> BulkScope {
        match (self.learned_from, self.rx.boot) {
            (Some(a), Some(b)) if a != b => BulkScope::OwnAndLearned,
            _ => BulkScope::Own,
        }
    }

    /// Only this node id is accepted in the peer's Hello.
    pub fn set_expected_peer(&mut self, peer: Option<u64>) {
        self.expected_peer = peer;
    }

    /// A new stream to the peer is up: our Hello goes first.
    pub fn connected(&mut self, now: Timestamp, outbox: &Outbox) {
        self.reset_stream();
        self.stream = Stream::Up {
            hello_sent: false,
            peer: None,
        };
        self.last_recv = now;
        self.last_sent = now;
        self.seen_last_seq = outbox.last_seq();
    }

    /// The stream broke: everything in flight is lost; what is needed to resume is kept.
    pub fn disconnected(&mut self, _now: Timestamp) {
        self.reset_stream();
        self.stream = Stream::Down;
    }

    /// Forget everything that belonged to one stream.
    fn reset_stream(&mut self) {
        self.tx.ready = false;
        self.tx.bulk = None;
        self.tx.next_send = self.tx.acked + 1;
        self.ops.retain(|op| !matches!(op, Op::ReadBulk { .. }));
        let rx = &mut self.rx;
        // An abandoned bulk already made the base invalid when it started: the next Hello asks
        // for a new one.
        rx.bulk = None;
        rx.ack_due = None;
        rx.acked_sent = rx.applied;
        rx.nack_pending = None;
        rx.nacked_at = None;
        rx.last_bulk_id = 0;
        rx.completed = None;
        rx.bulk_ack_pending = None;
        rx.bulk_nack_pending = None;
        rx.resume_pending = false;
        // A request or need that went out on the broken stream may never have arrived.
        if rx.requested_by_us {
            rx.bulk_request_pending = true;
        }
        rx.requeue_needs();
        rx.needs_due = None;
    }

    fn peer_hello(&self) -> Option<Hello> {
        match self.stream {
            Stream::Up { peer, .. } => peer,
            _ => None,
        }
    }

    fn close(&mut self, reason: CloseReason) {
        if matches!(self.stream, Stream::Up { .. }) {
            if reason != CloseReason::IdleTimeout {
                self.st.protocol_errors += 1;
            }
            self.st.last_error = Some(reason.clone());
            self.ops.push_back(Op::Close(reason));
            self.reset_stream();
            self.stream = Stream::Closed;
        }
    }

    /// A message from the peer.
    pub fn handle(&mut self, now: Timestamp, msg: Msg, outbox: &Outbox) {
        let Stream::Up { peer, .. } = self.stream else {
            return;
        };
        self.last_recv = now;
        self.seen_last_seq = outbox.last_seq();
        match (msg, peer) {
            (Msg::Hello(h), None) => self.on_hello(now, h, outbox),
            (Msg::Hello(_), Some(_)) => self.close(CloseReason::DuplicateHello),
            (_, None) => self.close(CloseReason::MessageBeforeHello),
            (Msg::Batch { first_seq, items }, Some(_)) => self.on_batch(now, first_seq, items),
            (Msg::Ack { seq }, Some(_)) => self.on_ack(now, seq),
            (Msg::Nack { from }, Some(_)) => self.on_nack(now, from, outbox),
            (Msg::Heartbeat, Some(_)) => {}
            (Msg::BulkStart { id, seq, estimate }, Some(_)) => {
                self.on_bulk_start(now, id, seq, estimate)
            }
            (Msg::BulkChunk { id, index, items }, Some(_)) => {
                self.on_bulk_chunk(now, id, index, items)
            }
            (Msg::BulkEnd { id, chunks }, Some(_)) => self.on_bulk_end(now, id, chunks),
            (Msg::BulkAck { id, index }, Some(_)) => self.on_bulk_ack(now, id, index),
            (Msg::BulkNack { id, index }, Some(_)) => self.on_bulk_nack(now, id, index),
            (Msg::BulkRequest, Some(_)) => self.start_bulk(now, outbox),
            (Msg::Need { tuples }, Some(_)) => self.on_need(tuples),
        }
    }

    fn on_hello(&mut self, now: Timestamp, h: Hello, outbox: &Outbox) {
        self.st.peer_version = Some(h.version);
        if h.version < MIN_PEER_VERSION {
            self.st.versions_refused += 1;
            return self.close(CloseReason::UnsupportedVersion(h.version));
        }
        if h.node_id == self.node_id {
            return self.close(CloseReason::SelfConnect);
        }
        if let Some(expected) = self.expected_peer {
            if h.node_id != expected {
                return self.close(CloseReason::UnexpectedPeer {
                    expected,
                    got: h.node_id,
                });
            }
        }
        if let Stream::Up { peer, .. } = &mut self.stream {
            *peer = Some(h);
        }
        self.st.peer_node_id = Some(h.node_id);
        self.st.peer_boot_id = Some(h.boot_id);

        // Receive side: positions of another boot of the peer mean nothing.
        if self.rx.boot != Some(h.boot_id) {
            self.rx.boot = Some(h.boot_id);
            self.rx.applied = 0;
            self.rx.acked_sent = 0;
            self.rx.valid = false;
        } else if self.rx.valid {
            // Our Hello offered a resume of this very boot.
            self.rx.resume_pending = true;
            self.readiness = Readiness::Synced;
        }

        // Send side.
        self.tx.ready = true;
        let resume = h.resume.filter(|r| {
            r.boot_id == outbox.boot_id()
                && r.seq <= outbox.last_seq()
                && r.seq + 1 >= outbox.first_seq()
                && self.tx.lost_gen == outbox.lost_generation()
        });
        match resume {
            Some(r) => {
                self.tx.acked = r.seq;
                self.tx.next_send = r.seq + 1;
                self.tx.max_sent = self.tx.max_sent.max(r.seq);
                self.tx.last_progress = now;
            }
            None => self.start_bulk(now, outbox),
        }
    }

    /// Begin a bulk to the peer, replacing a running one.
    fn start_bulk(&mut self, now: Timestamp, outbox: &Outbox) {
        if !self.tx.ready {
            return;
        }
        self.ops.retain(|op| !matches!(op, Op::ReadBulk { .. }));
        let id = self.tx.next_bulk_id;
        self.tx.next_bulk_id += 1;
        let seq = outbox.last_seq();
        // The bulk covers every item up to `seq`; nothing before it is sent again.
        self.tx.acked = seq;
        self.tx.next_send = seq + 1;
        self.tx.max_sent = self.tx.max_sent.max(seq);
        self.tx.last_progress = now;
        self.tx.bulk = Some(BulkTx {
            id,
            seq,
            lost_gen: outbox.lost_generation(),
            estimate: outbox.table_estimate(),
            cursor: Some(0),
            read_pending: false,
            chunks: VecDeque::new(),
            base: 0,
            read_chunks: 0,
            next_tx: 0,
            items_read: 0,
            start_sent: false,
            start_acked: false,
            end_sent: false,
            last_progress: now,
        });
        if self.st.bulks_started > 0 {
            self.st.resyncs += 1;
        }
        self.st.bulks_started += 1;
        self.maybe_read();
    }

    fn maybe_read(&mut self) {
        let window = self.cfg.bulk_window_chunks.max(1);
        if let Some(b) = &mut self.tx.bulk {
            if let (Some(cursor), false) = (b.cursor, b.read_pending) {
                if b.chunks.len() < window {
                    b.read_pending = true;
                    self.ops.push_back(Op::ReadBulk { cursor });
                }
            }
        }
    }

    fn schedule_ack(&mut self, now: Timestamp) {
        if self.rx.ack_due.is_none() {
            self.rx.ack_due = Some(now.plus(self.cfg.ack_delay));
        }
    }

    fn ops_full(&self) -> bool {
        self.ops.len() >= self.cfg.max_queued_ops
    }

    fn on_batch(&mut self, now: Timestamp, first_seq: Seq, items: Vec<Item>) {
        if first_seq == 0 {
            return self.close(CloseReason::Protocol("batch numbered from 0"));
        }
        if items.is_empty() {
            return;
        }
        // A peer numbers its items; it does not get to overflow ours. Checked before anything
        // else so that a batch like that closes the stream in every state.
        let Some(last) = first_seq.checked_add(items.len() as u64 - 1) else {
            return self.close(CloseReason::Protocol("batch numbered past u64::MAX"));
        };
        if self.rx.resume_pending {
            self.rx.resume_pending = false;
        }
        if !self.rx.valid && self.rx.bulk.is_none() {
            // No base to apply onto; the sender is about to start a bulk.
            return;
        }
        let applied = self.rx.applied;
        if last <= applied {
            // A resend of what we have: our ack may have been lost.
            self.schedule_ack(now);
            return;
        }
        if first_seq > applied + 1 {
            if self.rx.nacked_at != Some(applied + 1) {
                self.rx.nacked_at = Some(applied + 1);
                self.rx.nack_pending = Some(applied + 1);
            }
            return;
        }
        if self.ops_full() {
            self.st.backpressure += 1;
            return;
        }
        let skip = (applied + 1 - first_seq) as usize;
        for item in items.into_iter().skip(skip) {
            self.rx.answered(&item);
            self.ops.push_back(Op::Apply(item));
            self.st.items_applied += 1;
            self.learned_from = self.rx.boot;
        }
        self.rx.applied = last;
        self.rx.nacked_at = None;
        self.schedule_ack(now);
        if last - self.rx.acked_sent >= (self.cfg.window_items / 4).max(1) {
            // Do not let the sender's window run dry while we coalesce.
            self.rx.ack_due = Some(now);
        }
    }

    fn on_ack(&mut self, now: Timestamp, seq: Seq) {
        if seq > self.tx.max_sent {
            return self.close(CloseReason::Protocol("ack beyond what was sent"));
        }
        if seq > self.tx.acked {
            self.tx.acked = seq;
            self.tx.last_progress = now;
            if self.tx.next_send <= seq {
                self.tx.next_send = seq + 1;
            }
        }
    }

    fn on_nack(&mut self, now: Timestamp, from: Seq, outbox: &Outbox) {
        if from == 0 || from > self.tx.max_sent + 1 {
            return self.close(CloseReason::Protocol("nack beyond what was sent"));
        }
        self.st.nacks_received += 1;
        if from <= self.tx.acked {
            return; // that gap was repaired, or a bulk covers it
        }
        // Everything before `from` was applied.
        self.on_ack(now, from - 1);
        if self.tx.acked + 1 < outbox.first_seq() {
            return self.start_bulk(now, outbox);
        }
        if self.tx.next_send > self.tx.acked + 1 {
            self.tx.next_send = self.tx.acked + 1;
            self.tx.last_progress = now;
            self.st.retransmits += 1;
        }
    }

    fn on_bulk_start(&mut self, now: Timestamp, id: u64, seq: Seq, estimate: u64) {
        if id <= self.rx.last_bulk_id {
            return; // a repeat, or a replaced bulk's late start
        }
        self.rx.last_bulk_id = id;
        if self.rx.resume_pending && self.rx.valid && !self.rx.requested_by_us {
            // The peer could not resume us: our table misses changes until this bulk is in.
            self.readiness = Readiness::Waiting { since: now };
        }
        self.rx.resume_pending = false;
        self.rx.requested_by_us = false;
        self.rx.valid = false;
        self.rx.applied = self.rx.applied.max(seq);
        self.rx.nacked_at = None;
        self.rx.nack_pending = None;
        self.rx.bulk_nack_pending = None;
        self.rx.bulk = Some(BulkRx {
            id,
            next: 0,
            items: 0,
            estimate,
            nacked_at: None,
        });
        let peer_restarted = self.learned_from.is_some() && self.learned_from != self.rx.boot;
        self.ops.push_back(Op::BulkBegin { peer_restarted });
    }

    /// A chunk or end of a bulk we never saw start: ask for it from the start, once.
    fn missed_bulk_start(&mut self, id: u64) {
        if id > self.rx.last_bulk_id && self.rx.bulk_nack_pending != Some((id, 0)) {
            self.rx.bulk_nack_pending = Some((id, 0));
            self.st.nacks_sent += 1;
        }
    }

    fn bulk_gap(&mut self, id: u64, expected: u32) {
        if let Some(b) = &mut self.rx.bulk {
            if b.nacked_at != Some(expected) {
                b.nacked_at = Some(expected);
                self.rx.bulk_nack_pending = Some((id, expected));
                self.st.nacks_sent += 1;
            }
        }
    }

    fn on_bulk_chunk(&mut self, now: Timestamp, id: u64, index: u32, items: Vec<Item>) {
        let Some(b) = self.rx.bulk.as_ref().filter(|b| b.id == id) else {
            return self.missed_bulk_start(id);
        };
        let expected = b.next;
        if index < expected {
            self.rx.bulk_ack_pending = Some((id, expected - 1));
            self.schedule_ack(now);
            return;
        }
        if index > expected {
            return self.bulk_gap(id, expected);
        }
        if index == u32::MAX {
            // `BulkEnd { chunks: index + 1 }` could not be said.
            return self.close(CloseReason::Protocol("bulk chunk numbered past u32::MAX"));
        }
        if self.ops_full() {
            self.st.backpressure += 1;
            return;
        }
        let mut imported = 0u64;
        for item in items {
            match item {
                Item::Conn(_) | Item::Expect(_) => {
                    self.rx.answered(&item);
                    self.ops.push_back(Op::Import(item));
                    self.learned_from = self.rx.boot;
                    imported += 1;
                }
                _ => self.st.invalid_items += 1,
            }
        }
        self.st.items_imported += imported;
        if let Some(b) = &mut self.rx.bulk {
            b.next += 1;
            b.items += imported;
            b.nacked_at = None;
        }
        self.rx.bulk_ack_pending = Some((id, index));
        self.schedule_ack(now);
    }

    fn on_bulk_end(&mut self, now: Timestamp, id: u64, chunks: u32) {
        let Some(b) = self.rx.bulk.as_ref().filter(|b| b.id == id) else {
            if let Some((done, n)) = self.rx.completed.filter(|c| c.0 == id) {
                // Our ack of the end was lost.
                self.rx.bulk_ack_pending = Some((done, n));
                self.schedule_ack(now);
                return;
            }
            return self.missed_bulk_start(id);
        };
        if b.next < chunks {
            let next = b.next;
            return self.bulk_gap(id, next);
        }
        if b.next > chunks {
            return self.close(CloseReason::Protocol("bulk end before chunks it sent"));
        }
        self.rx.bulk = None;
        self.rx.valid = true;
        self.rx.completed = Some((id, chunks));
        self.rx.bulk_ack_pending = Some((id, chunks));
        self.rx.ack_due = Some(now);
        self.readiness = Readiness::Synced;
        self.st.bulks_received += 1;
        self.ops.push_back(Op::BulkEnd);
    }

    fn on_bulk_ack(&mut self, now: Timestamp, id: u64, index: u32) {
        let Some(b) = self.tx.bulk.as_mut().filter(|b| b.id == id) else {
            return; // a replaced bulk's
        };
        if b.total() == Some(index) {
            // Only a completed bulk makes good items lost before numbering; an abandoned one
            // leaves the peer with a resume we must refuse.
            self.tx.lost_gen = b.lost_gen;
            self.tx.bulk = None;
            self.st.bulks_sent += 1;
            return;
        }
        if index >= b.read_chunks {
            return self.close(CloseReason::Protocol("bulk ack beyond what was sent"));
        }
        b.start_acked = true;
        while b.base <= index {
            b.chunks.pop_front();
            b.base += 1;
            b.last_progress = now;
        }
        b.next_tx = b.next_tx.max(b.base);
        self.maybe_read();
    }

    fn on_bulk_nack(&mut self, now: Timestamp, id: u64, index: u32) {
        let Some(b) = self.tx.bulk.as_mut().filter(|b| b.id == id) else {
            return;
        };
        if index > b.read_chunks {
            return self.close(CloseReason::Protocol("bulk nack beyond what was sent"));
        }
        self.st.nacks_received += 1;
        if index > 0 {
            b.start_acked = true;
            while b.base < index {
                b.chunks.pop_front();
                b.base += 1;
            }
        } else if !b.start_acked {
            b.start_sent = false;
        }
        b.next_tx = b.base;
        b.end_sent = false;
        b.last_progress = now;
        self.st.retransmits += 1;
        self.maybe_read();
    }

    fn on_need(&mut self, mut tuples: Vec<Tuple>) {
        let cap = self.cfg.need_batch.max(1);
        if tuples.len() > cap {
            self.st.needs_dropped += (tuples.len() - cap) as u64;
            tuples.truncate(cap);
        }
        if tuples.is_empty() {
            return;
        }
        if self.tx.lookups.len() >= MAX_LOOKUPS {
            // The peer asks again after a retransmit timeout.
            self.st.needs_dropped += tuples.len() as u64;
            return;
        }
        self.st.lookups += 1;
        self.tx.lookups.push_back(tuples.clone());
        self.ops.push_back(Op::Lookup(tuples));
    }

    /// The next message to send, if any.
    pub fn poll_transmit(&mut self, now: Timestamp, outbox: &Outbox) -> Option<Msg> {
        let msg = self.next_transmit(now, outbox)?;
        self.last_sent = now;
        Some(msg)
    }

    fn next_transmit(&mut self, now: Timestamp, outbox: &Outbox) -> Option<Msg> {
        let Stream::Up { hello_sent, peer } = self.stream else {
            return None;
        };
        self.seen_last_seq = outbox.last_seq();
        if !hello_sent {
            if let Stream::Up { hello_sent, .. } = &mut self.stream {
                *hello_sent = true;
            }
            let resume = match (self.rx.boot, self.rx.valid) {
                (Some(boot_id), true) => Some(Resume {
                    boot_id,
                    seq: self.rx.applied,
                }),
                _ => None,
            };
            return Some(Msg::Hello(Hello {
                version: VERSION,
                node_id: self.node_id,
                boot_id: outbox.boot_id(),
                resume,
            }));
        }
        if peer.is_none() {
            return self.heartbeat(now);
        }
        self.check_outbox(now, outbox);
        if let Some(m) = self.control(now) {
            return Some(m);
        }
        if let Some(m) = self.bulk_transmit(now) {
            return Some(m);
        }
        if let Some(m) = self.live_transmit(now, outbox) {
            return Some(m);
        }
        self.heartbeat(now)
    }

    /// Items the peer still needs are gone, or were lost before numbering: a bulk.
    fn check_outbox(&mut self, now: Timestamp, outbox: &Outbox) {
        if !self.tx.ready {
            return;
        }
        let covered = self
            .tx
            .bulk
            .as_ref()
            .map_or(self.tx.lost_gen, |b| b.lost_gen);
        if covered != outbox.lost_generation() || self.tx.acked + 1 < outbox.first_seq() {
            self.start_bulk(now, outbox);
        }
    }

    fn control(&mut self, now: Timestamp) -> Option<Msg> {
        let rx = &mut self.rx;
        if let Some(from) = rx.nack_pending.take() {
            self.st.nacks_sent += 1;
            return Some(Msg::Nack { from });
        }
        if let Some((id, index)) = rx.bulk_nack_pending.take() {
            return Some(Msg::BulkNack { id, index });
        }
        if rx.ack_due.is_some_and(|t| t <= now) {
            if let Some((id, index)) = rx.bulk_ack_pending.take() {
                return Some(Msg::BulkAck { id, index });
            }
            rx.ack_due = None;
            rx.acked_sent = rx.applied;
            return Some(Msg::Ack { seq: rx.applied });
        }
        let unanswered = &rx.needs_unanswered;
        rx.needs.retain(|t| unanswered.contains(t));
        if !rx.needs.is_empty() {
            let n = rx.needs.len().min(self.cfg.need_batch.max(1));
            let tuples: Vec<Tuple> = rx.needs.drain(..n).collect();
            if rx.needs_due.is_none() {
                rx.needs_due = Some(now.plus(self.cfg.retransmit_timeout));
            }
            self.st.needs_sent += tuples.len() as u64;
            return Some(Msg::Need { tuples });
        }
        if rx.bulk_request_pending {
            rx.bulk_request_pending = false;
            return Some(Msg::BulkRequest);
        }
        None
    }

    fn bulk_transmit(&mut self, now: Timestamp) -> Option<Msg> {
        let window = self.cfg.bulk_window_chunks.max(1) as u32;
        let b = self.tx.bulk.as_mut()?;
        let was_idle = !b.outstanding();
        let msg = if !b.start_sent {
            b.start_sent = true;
            Msg::BulkStart {
                id: b.id,
                seq: b.seq,
                estimate: b.estimate,
            }
        } else if b.next_tx < b.read_chunks && b.next_tx < b.base.saturating_add(window) {
            let chunk = b.chunks.get((b.next_tx - b.base) as usize)?;
            let msg = Msg::BulkChunk {
                id: b.id,
                index: b.next_tx,
                items: chunk.items.clone(),
            };
            b.next_tx += 1;
            msg
        } else if b.total() == Some(b.next_tx) && !b.end_sent {
            b.end_sent = true;
            Msg::BulkEnd {
                id: b.id,
                chunks: b.next_tx,
            }
        } else {
            return None;
        };
        if was_idle {
            b.last_progress = now;
        }
        Some(msg)
    }

    fn live_transmit(&mut self, now: Timestamp, outbox: &Outbox) -> Option<Msg> {
        let tx = &mut self.tx;
        let limit = tx.bulk.as_ref().map_or(Seq::MAX, BulkTx::live_limit);
        let first = tx.next_send;
        let last = outbox
            .last_seq()
            .min(first.saturating_add(self.cfg.batch_items.max(1) as u64 - 1))
            .min(tx.acked.saturating_add(self.cfg.window_items.max(1)))
            .min(limit);
        if first > last || first < outbox.first_seq() {
            return None;
        }
        let mut items = Vec::with_capacity((last - first + 1) as usize);
        for seq in first..=last {
            items.push(outbox.get(seq)?.clone());
        }
        if tx.next_send <= tx.acked + 1 {
            // Nothing was outstanding: the retransmit clock starts now.
            tx.last_progress = now;
        }
        tx.next_send = last + 1;
        tx.max_sent = tx.max_sent.max(last);
        Some(Msg::Batch {
            first_seq: first,
            items,
        })
    }

    fn heartbeat(&mut self, now: Timestamp) -> Option<Msg> {
        (now >= self.last_sent.plus(self.cfg.heartbeat_interval)).then_some(Msg::Heartbeat)
    }

    /// The next table operation for the shell.
    pub fn poll_op(&mut self) -> Option<Op> {
        self.ops.pop_front()
    }

    /// When `handle_timeout` (or `poll_transmit`) has something to do.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let Stream::Up { hello_sent, peer } = self.stream else {
            return None;
        };
        let mut t = self.last_recv.plus(self.cfg.idle_timeout);
        if hello_sent {
            t = t.min(self.last_sent.plus(self.cfg.heartbeat_interval));
        }
        if peer.is_none() {
            return Some(t);
        }
        if let Some(a) = self.rx.ack_due {
            t = t.min(a);
        }
        if let Some(n) = self.rx.needs_due {
            t = t.min(n);
        }
        if self.tx.next_send > self.tx.acked + 1 {
            t = t.min(self.tx.last_progress.plus(self.cfg.retransmit_timeout));
        }
        if let Some(b) = self.tx.bulk.as_ref().filter(|b| b.outstanding()) {
            t = t.min(b.last_progress.plus(self.cfg.retransmit_timeout));
        }
        Some(t)
    }

    pub fn handle_timeout(&mut self, now: Timestamp, outbox: &Outbox) {
        if !matches!(self.stream, Stream::Up { .. }) {
            return;
        }
        self.seen_last_seq = outbox.last_seq();
        if now >= self.last_recv.plus(self.cfg.idle_timeout) {
            return self.close(CloseReason::IdleTimeout);
        }
        if self.rx.needs_due.is_some_and(|t| t <= now) {
            self.rx.needs_due = None;
            self.rx.requeue_needs();
        }
        let rto = self.cfg.retransmit_timeout;
        let tx = &mut self.tx;
        if tx.next_send > tx.acked + 1 && now >= tx.last_progress.plus(rto) {
            // Go-back-N: everything after the last ack again.
            tx.next_send = tx.acked + 1;
            tx.last_progress = now;
            self.st.retransmits += 1;
        }
        if let Some(b) = tx.bulk.as_mut() {
            if b.outstanding() && now >= b.last_progress.plus(rto) {
                b.next_tx = b.base;
                if !b.start_acked {
                    b.start_sent = false;
                }
                b.end_sent = false;
                b.last_progress = now;
                self.st.retransmits += 1;
            }
        }
        self.check_outbox(now, outbox);
    }

    /// The shell could not apply an `Item::Update`: ask the peer for the connection whole.
    pub fn missing(&mut self, tuple: Tuple) {
        if self.rx.needs_unanswered.contains(&tuple) {
            return;
        }
        if self.rx.needs_unanswered.len() >= self.cfg.max_pending_needs {
            self.st.needs_dropped += 1;
            self.rx.bulk_request_pending = true;
            self.rx.requested_by_us = true;
            return;
        }
        self.rx.needs_unanswered.insert(tuple);
        self.rx.needs.push(tuple);
    }

    /// Answer to `Op::Lookup` (in order, one call per op): the connections found go out as new
    /// items of this node's stream, and a `ConnGone` for each asked tuple not found, so that
    /// every need gets an answer the peer can recognise.
    pub fn resend(&mut self, outbox: &mut Outbox, conns: Vec<ConnSnapshot>) {
        let asked = self.tx.lookups.pop_front().unwrap_or_default();
        for t in asked {
            if !conns.iter().any(|c| c.tuple == t) {
                outbox.push(Item::ConnGone(t));
            }
        }
        for c in conns {
            self.st.resent += 1;
            outbox.push(Item::Conn(c));
        }
        self.seen_last_seq = outbox.last_seq();
    }

    /// Answer to `Op::ReadBulk`: the page's entries and the cursor of the next page (`None`: done).
    pub fn bulk_page(&mut self, items: Vec<Item>, next: Option<u64>) {
        let limit = self.seen_last_seq;
        let Some(b) = self.tx.bulk.as_mut().filter(|b| b.read_pending) else {
            return; // the bulk it was read for is gone
        };
        b.read_pending = false;
        if !items.is_empty() {
            b.items_read += items.len() as u64;
            b.chunks.push_back(TxChunk { items, limit });
            b.read_chunks += 1;
        }
        b.cursor = next;
        self.maybe_read();
    }

    /// Operator resync: ask the peer for a bulk (after the handshake, on this stream or the next).
    pub fn request_bulk(&mut self) {
        self.rx.bulk_request_pending = true;
        self.rx.requested_by_us = true;
    }

    /// Ready to take traffic, as far as this peer is concerned.
    pub fn in_sync(&self, now: Timestamp) -> bool {
        match self.readiness {
            Readiness::Synced => true,
            Readiness::Waiting { since } => now >= since.plus(self.cfg.bulk_timeout),
        }
    }

    pub fn stats(&self, outbox: &Outbox) -> SessionStats {
        let mut s = self.st.clone();
        s.connected = self.peer_hello().is_some();
        s.peer_has_table = s.connected
            && self.tx.ready
            && self.tx.bulk.is_none()
            && self.tx.lost_gen == outbox.lost_generation()
            && self.tx.acked + 1 >= outbox.first_seq();
        s.last_seq = outbox.last_seq();
        s.sent = self.tx.max_sent;
        s.acked = self.tx.acked;
        s.lag = outbox.last_seq().saturating_sub(self.tx.acked);
        s.in_flight = self.tx.next_send.saturating_sub(self.tx.acked + 1);
        s.queued_ops = self.ops.len();
        s.pending_needs = self.rx.needs_unanswered.len();
        s.applied = self.rx.applied;
        s.bulk_rx = self.rx.bulk.as_ref().map(|b| BulkProgress {
            id: b.id,
            chunks: b.next,
            items: b.items,
            estimate: b.estimate,
        });
        s.bulk_tx = self.tx.bulk.as_ref().map(|b| BulkProgress {
            id: b.id,
            chunks: b.read_chunks,
            items: b.items_read,
            estimate: b.estimate,
        });
        s
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The highest outbox sequence this peer acked, while it is connected (Hello exchanged);
    /// `None` otherwise. What `defer` waits for.
    pub fn acked_while_up(&self) -> Option<Seq> {
        self.peer_hello().map(|_| self.tx.acked)
    }
}
