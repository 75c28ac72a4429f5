//! One gateway's replication, whole and without I/O: its numbered stream of changes
//! (`Outbox`), one `Session` per peer, the pickup delay, `defer`'s bookkeeping, how long each
//! peer lags, and **the one place where a peer's items are applied to a table**
//! (`Replicator::apply`). The production shell (`sync::shell`), the protocol simulation
//! (`sync::tests`), the `sync_wire` fuzz target and the two-gateway `Pair` harness
//! (`node/tests/pair`) all drive this type; only the shell has sockets.
//!
//! The table is anything that implements [`Replica`]: `Conntrack` in production and in every
//! harness with real tables, a model table in the protocol simulation. The merge rules (what
//! an imported entry does to what the table holds) are the table's (`conntrack::table::peer`);
//! which operation a message turns into, in which order, and what a refusal costs is decided
//! here.
//!
//! Must not touch: sockets, clocks (every call takes `now`), threads, protobuf (`codec`),
//! packets.

use std::collections::VecDeque;

use super::core::{CloseReason, Config, Op, Outbox, Session, SessionStats};
use super::defer::{Gate, Pending};
use super::delay::{DelayStats, PickupDelay};
use super::lag::LagClock;
use super::msg::{Item, Msg, Seq, Skip};
use crate::conntrack::{
    ApplyError, BulkPage, BulkScope, ConnSnapshot, ConnUpdate, Conntrack, Event, ExpectSnapshot,
    Tuple,
};
use crate::time::Timestamp;

/// What replication needs from a connection table. `Conntrack` is the implementation; the
/// contract of each call is that of the `Conntrack` method of the same name.
pub trait Replica {
    /// A whole connection from the peer (a live `Conn` or a bulk entry).
    fn import_conn(&self, now: Timestamp, c: &ConnSnapshot) -> Result<(), ApplyError>;
    /// A compact update; `ApplyError::Missing` when the connection is not here.
    fn apply_update(&self, now: Timestamp, u: &ConnUpdate) -> Result<(), ApplyError>;
    /// The peer's connection ended (only an entry still learned from it goes).
    fn remove_conn(&self, t: &Tuple);
    /// An operator on the peer killed the connection: it goes whoever owns it.
    fn kill_conn(&self, t: &Tuple);
    fn import_expect(&self, now: Timestamp, x: &ExpectSnapshot) -> Result<(), ApplyError>;
    fn remove_expect(&self, x: &ExpectSnapshot);
    /// A bulk from the peer begins: mark what was learned from it as not refreshed (or, when
    /// the peer restarted, as orphaned: kept).
    fn begin_peer_bulk(&self, peer_restarted: bool);
    /// The bulk completed: remove what it did not refresh; how many entries went.
    fn end_peer_bulk(&self) -> u64;
    /// Snapshots of those of `tuples` this table has, each looked up and copied under one lock.
    fn lookup(&self, now: Timestamp, tuples: &[Tuple]) -> Vec<ConnSnapshot>;
    /// One page of this node's table for the peer (see `Conntrack::bulk_page`).
    fn bulk_page(&self, cursor: u64, limit: usize, now: Timestamp, scope: BulkScope) -> BulkPage;
    /// Connections held (the bulk estimate a peer sees).
    fn connections(&self) -> usize;
}

impl Replica for Conntrack {
    fn import_conn(&self, now: Timestamp, c: &ConnSnapshot) -> Result<(), ApplyError> {
        Ok(Conntrack::import_conn(self, now, c)?)
    }
    fn apply_update(&self, now: Timestamp, u: &ConnUpdate) -> Result<(), ApplyError> {
        Conntrack::apply_update(self, now, u)
    }
    fn remove_conn(&self, t: &Tuple) {
        Conntrack::remove_conn(self, t);
    }
    fn kill_conn(&self, t: &Tuple) {
        Conntrack::kill_conn(self, t);
    }
    fn import_expect(&self, now: Timestamp, x: &ExpectSnapshot) -> Result<(), ApplyError> {
        Ok(Conntrack::import_expect(self, now, x)?)
    }
    fn remove_expect(&self, x: &ExpectSnapshot) {
        Conntrack::remove_expect(self, x);
    }
    fn begin_peer_bulk(&self, peer_restarted: bool) {
        Conntrack::begin_peer_bulk(self, peer_restarted);
    }
    fn end_peer_bulk(&self) -> u64 {
        Conntrack::end_peer_bulk(self)
    }
    fn lookup(&self, now: Timestamp, tuples: &[Tuple]) -> Vec<ConnSnapshot> {
        tuples
            .iter()
            .filter_map(|t| {
                let sh = self.lock_tuple(t);
                sh.find(t).and_then(|id| sh.snapshot(id, now))
            })
            .collect()
    }
    fn bulk_page(&self, cursor: u64, limit: usize, now: Timestamp, scope: BulkScope) -> BulkPage {
        Conntrack::bulk_page(self, cursor, limit, now, scope)
    }
    fn connections(&self) -> usize {
        self.len()
    }
}

/// How a replicator is set up (`sync::shell::SyncConfig::settings` maps the config file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Every peer session's tunables.
    pub session: Config,
    /// Items kept for a peer to resume from.
    pub outbox_items: usize,
    /// `[sync] pickup_delay_ms`.
    pub pickup_delay_ms: u64,
    /// `defer`: the number of workers whose batches are waited for (`None`: off).
    pub defer_workers: Option<usize>,
}

/// What the replicator counted itself (the sessions count the protocol).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Items (or messages) of a kind this build does not know.
    pub skipped_unknown: u64,
    /// Items the codec found malformed.
    pub skipped_invalid: u64,
    /// Items the table refused (validation, limits, a missing master).
    pub apply_refused: u64,
    /// Learned entries removed at the end of a bulk (the peer no longer had them).
    pub swept: u64,
}

/// One peer as `status` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub id: u64,
    pub stats: SessionStats,
    /// How long the first item this peer has not acknowledged has waited (0: none waits).
    pub lag_ms: u64,
    /// Ready to take traffic as far as this peer is concerned (`Session::in_sync`).
    pub in_sync: bool,
}

/// A snapshot of the whole replicator, for `fwctl sync status` and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub peers: Vec<PeerStatus>,
    /// Every peer is in sync: this node may take traffic.
    pub ready: bool,
    pub outbox_items: usize,
    pub last_seq: Seq,
    pub counts: Counts,
    pub delay: DelayStats,
    /// Connections the pickup delay holds now.
    pub delay_held: usize,
}

#[derive(Debug)]
struct Peer {
    id: u64,
    session: Session,
}

/// A gateway's replication core.
///
/// Call order, for the shell and every harness:
/// 1. Feed it what happened: `handle_events` (a worker's batch of tracker events),
///    `handle_lost` (events never reached it), `handle_connected` / `handle_disconnected`
///    (a stream to a peer opened or ended), `handle_msg` (a decoded message from a peer:
///    what it asks of the table is applied at once, through `table`), `handle_undecodable`,
///    `request_bulk` (an operator's resync).
/// 2. `handle_timeout(now, table)`: at `poll_timeout` at the latest; calling it more often is
///    harmless. It releases what the pickup delay held, runs every session's timers and
///    applies what they decide.
/// 3. Drain: `poll_close` until `None` (end those streams; the sessions already count them
///    as down), then `poll_transmit(now, peer)` for each peer while its stream takes more.
/// 4. With `defer`: `release_deferred(gate)` after each round. `status(now, table)` when a
///    snapshot is wanted (it also advances the lag clock).
#[derive(Debug)]
pub struct Replicator {
    outbox: Outbox,
    delay: PickupDelay,
    peers: Vec<Peer>,
    /// `defer`: which outbox sequence ends each worker's batch.
    pending: Option<Pending>,
    lag: LagClock,
    counts: Counts,
    closed: VecDeque<(u64, CloseReason)>,
}

impl Replicator {
    /// Node `node_id`, in its boot `boot_id` (sequence numbers restart with it), replicating
    /// with `peers` (their node ids; each session accepts only its own peer's Hello).
    pub fn new(
        settings: &Settings,
        node_id: u64,
        boot_id: u64,
        peers: &[u64],
        now: Timestamp,
    ) -> Self {
        let peers = peers
            .iter()
            .map(|&id| {
                let mut session = Session::new(settings.session.clone(), node_id, now);
                session.set_expected_peer(Some(id));
                Peer { id, session }
            })
            .collect();
        Replicator {
            outbox: Outbox::new(boot_id, settings.outbox_items),
            // At most as many held connections as the outbox holds items.
            delay: PickupDelay::new(settings.pickup_delay_ms, settings.outbox_items),
            peers,
            pending: settings.defer_workers.map(Pending::new),
            lag: LagClock::default(),
            counts: Counts::default(),
            closed: VecDeque::new(),
        }
    }

    fn index(&self, peer: u64) -> Option<usize> {
        self.peers.iter().position(|p| p.id == peer)
    }

    /// Batch `batch` of worker `worker`: its events, taken in order (the vector is left empty
    /// for reuse).
    pub fn handle_events(
        &mut self,
        now: Timestamp,
        worker: usize,
        batch: u64,
        events: &mut Vec<Event>,
    ) {
        for ev in events.drain(..) {
            if let Some(item) = self.delay.offer(now, ev) {
                self.outbox.push(item);
            }
        }
        if let Some(p) = &mut self.pending {
            p.pushed(worker, batch, self.outbox.last_seq());
        }
    }

    /// Events were lost on their way here: every peer gets a bulk.
    pub fn handle_lost(&mut self) {
        self.outbox.mark_lost();
    }

    /// Ask every peer for a bulk (`fwctl sync resync`).
    pub fn request_bulk(&mut self) {
        for p in &mut self.peers {
            p.session.request_bulk();
        }
    }

    /// A new stream to `peer` is up (one that was up is replaced). `false`: not a peer of ours.
    #[must_use]
    pub fn handle_connected(&mut self, now: Timestamp, peer: u64) -> bool {
        let Some(i) = self.index(peer) else {
            return false;
        };
        let p = &mut self.peers[i];
        p.session.disconnected(now);
        p.session.connected(now, &self.outbox);
        true
    }

    /// The stream to `peer` ended.
    pub fn handle_disconnected(&mut self, now: Timestamp, peer: u64) {
        if let Some(i) = self.index(peer) {
            self.peers[i].session.disconnected(now);
        }
    }

    /// A message from `peer`'s current stream; what it asks of the table is done before this
    /// returns.
    pub fn handle_msg(&mut self, now: Timestamp, peer: u64, msg: Msg, table: &impl Replica) {
        let Some(i) = self.index(peer) else { return };
        self.peers[i].session.handle(now, msg, &self.outbox);
        self.drain_ops(i, now, table);
    }

    /// A message that did not decode (a newer peer's kind): counted, otherwise ignored.
    pub fn handle_undecodable(&mut self) {
        self.counts.skipped_unknown += 1;
    }

    /// Timers: the pickup delay's releases, every session's (idle, heartbeat, retransmission,
    /// needs), and what they decide for the table.
    pub fn handle_timeout(&mut self, now: Timestamp, table: &impl Replica) {
        while let Some(item) = self.delay.poll(now) {
            self.outbox.push(item);
        }
        for i in 0..self.peers.len() {
            self.peers[i].session.handle_timeout(now, &self.outbox);
            self.drain_ops(i, now, table);
        }
    }

    /// The next message for `peer`'s stream.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Timestamp, peer: u64) -> Option<Msg> {
        let i = self.index(peer)?;
        self.peers[i].session.poll_transmit(now, &self.outbox)
    }

    /// A stream the protocol gave up on (a peer's error, an idle timeout): end it; the dialler
    /// opens a new one.
    #[must_use]
    pub fn poll_close(&mut self) -> Option<(u64, CloseReason)> {
        self.closed.pop_front()
    }

    /// When `handle_timeout` has something to do.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.peers
            .iter()
            .filter_map(|p| p.session.poll_timeout())
            .chain(self.delay.poll_timeout())
            .min()
    }

    /// `defer`: tell the workers which of their batches every connected peer now has.
    pub fn release_deferred(&mut self, gate: &Gate) {
        // What every connected peer has; `None` (nobody connected) waits for no one.
        let acked = self
            .peers
            .iter()
            .filter_map(|p| p.session.acked_while_up())
            .min();
        if let Some(p) = &mut self.pending {
            p.acked(gate, acked);
        }
    }

    /// Every peer is in sync (`Session::in_sync`): this node may take traffic.
    pub fn ready(&self, now: Timestamp) -> bool {
        self.peers.iter().all(|p| p.session.in_sync(now))
    }

    /// A snapshot for status readers; marks the lag clock (call it at a steady rhythm: the
    /// lag's resolution is the interval between calls).
    pub fn status(&mut self, now: Timestamp, table: &impl Replica) -> Status {
        self.outbox.set_table_estimate(table.connections() as u64);
        self.lag.mark(self.outbox.last_seq(), now);
        let peers: Vec<PeerStatus> = self
            .peers
            .iter()
            .map(|p| {
                let stats = p.session.stats(&self.outbox);
                let lag_ms = if stats.lag == 0 {
                    0
                } else {
                    self.lag.age(stats.acked, now).as_millis() as u64
                };
                PeerStatus {
                    id: p.id,
                    in_sync: p.session.in_sync(now),
                    lag_ms,
                    stats,
                }
            })
            .collect();
        if let Some(acked) = peers.iter().map(|p| p.stats.acked).min() {
            self.lag.forget_through(acked);
        }
        Status {
            ready: peers.iter().all(|p| p.in_sync),
            peers,
            outbox_items: self.outbox.len(),
            last_seq: self.outbox.last_seq(),
            counts: self.counts,
            delay: self.delay.stats(),
            delay_held: self.delay.len(),
        }
    }

    /// This node's stream (tests read what was pushed).
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// `peer`'s session counters.
    pub fn session_stats(&self, peer: u64) -> Option<SessionStats> {
        let i = self.index(peer)?;
        Some(self.peers[i].session.stats(&self.outbox))
    }

    /// `peer`'s session (tests look at its timers and readiness).
    pub fn session(&self, peer: u64) -> Option<&Session> {
        self.index(peer).map(|i| &self.peers[i].session)
    }

    /// `peer`'s session, to drive it by hand.
    #[cfg(test)]
    pub(crate) fn session_mut(&mut self, peer: u64) -> Option<&mut Session> {
        let i = self.index(peer)?;
        Some(&mut self.peers[i].session)
    }

    fn drain_ops(&mut self, i: usize, now: Timestamp, table: &impl Replica) {
        while let Some(op) = self.peers[i].session.poll_op() {
            self.apply(i, now, op, table);
        }
    }

    /// One operation of peer `i`'s session on the table.
    fn apply(&mut self, i: usize, now: Timestamp, op: Op, table: &impl Replica) {
        match op {
            // A whole connection replaces in both (the core orders them so that it is never
            // older than what this stream applied); an update merges without moving TCP state
            // backwards (the table's rule).
            Op::Apply(item) | Op::Import(item) => self.apply_item(i, now, &item, table),
            Op::BulkBegin { peer_restarted } => table.begin_peer_bulk(peer_restarted),
            Op::BulkEnd => self.counts.swept += table.end_peer_bulk(),
            Op::Lookup(tuples) => {
                // Looked up and pushed before anything else reaches the outbox, so no change
                // of these connections is ordered behind an older copy.
                let snaps = table.lookup(now, &tuples);
                self.peers[i].session.resend(&mut self.outbox, snaps);
            }
            Op::ReadBulk { cursor } => {
                let s = &mut self.peers[i].session;
                let limit = s.config().bulk_chunk_items;
                let page = table.bulk_page(cursor, limit, now, s.bulk_scope());
                let mut items: Vec<Item> = page.conns.into_iter().map(Item::Conn).collect();
                items.extend(page.expects.into_iter().map(Item::Expect));
                s.bulk_page(items, page.next);
            }
            Op::Close(why) => {
                let p = &mut self.peers[i];
                p.session.disconnected(now);
                self.closed.push_back((p.id, why));
            }
        }
    }

    /// One item from peer `i` into the table.
    fn apply_item(&mut self, i: usize, now: Timestamp, item: &Item, table: &impl Replica) {
        let r = match item {
            Item::Conn(s) => table.import_conn(now, s),
            Item::Update(u) => match table.apply_update(now, u) {
                Err(ApplyError::Missing) => {
                    self.peers[i].session.missing(u.tuple);
                    Ok(())
                }
                r => r,
            },
            Item::ConnGone(t) => {
                table.remove_conn(t);
                Ok(())
            }
            Item::ConnKilled(t) => {
                table.kill_conn(t);
                Ok(())
            }
            Item::Expect(x) => table.import_expect(now, x),
            Item::ExpectGone(x) => {
                table.remove_expect(x);
                Ok(())
            }
            Item::Skipped(Skip::UnknownKind) => {
                self.counts.skipped_unknown += 1;
                Ok(())
            }
            Item::Skipped(Skip::Invalid) => {
                self.counts.skipped_invalid += 1;
                Ok(())
            }
        };
        if let Err(e) = r {
            self.counts.apply_refused += 1;
            tracing::debug!(error = %e, "replicated item refused");
        }
    }
}
