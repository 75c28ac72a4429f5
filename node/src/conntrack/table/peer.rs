//! What a shard does with a peer's items: import whole connections and expectations, apply
//! compact updates, remove what the peer removed, sweep what a bulk transfer did not refresh,
//! and serve its own table as bulk pages.
//!
//! Owns the merge rules of state replication (the protocol that carries the items is
//! [`crate::sync`]; why learned entries go into the live table: `docs/design.md`, section 5):
//! every item is validated before it touches the table (its kind must fit its tuple the way
//! the tracker's own entries do); learned entries are marked `FROM_PEER` and
//! re-learn their TCP windows from live packets; TCP state never moves back; nothing done here is
//! announced to peers (no echo). Must not touch packets, locks, clocks or I/O; `Conntrack`
//! routes items to shards.

use super::*;
use crate::conntrack::BulkPage;

/// Where the bulk listing of a shard is: its slot cursor carries the phase in the top bits.
/// Phase 0 lists connections without a master, phase 1 those with one (so a page never
/// lists a RELATED connection before its master), phase 2 the expectations (after every
/// connection, since an expectation needs its master).
const PHASE_SHIFT: u32 = 30;
const SLOT_MASK: u32 = (1 << PHASE_SHIFT) - 1;
const PHASE_EXPECTS: u32 = 2;

impl Shard {
    /// The kind of entry `t` and `proto` describe, if they are a well-formed connection of
    /// this shard. The TCP state is checked and cleaned (`TcpConn::sanitized`). The kind must
    /// be one the tracker itself makes for `t` (what `sync::codec` also checks on the wire): an
    /// ICMP echo only over its own family's ICMP, since ICMP carried over IPv6 (or ICMPv6 over
    /// IPv4) parses as an unknown protocol, and an echo entry for it would meet packets it
    /// cannot judge.
    fn check_conn(&self, t: &Tuple, proto: &ProtoState) -> Result<(Kind, ProtoState), ImportError> {
        use crate::packet::proto::{ICMP, ICMPV6, TCP, UDP};
        if t.family != 4 && t.family != 6 {
            return Err(ImportError::BadFamily);
        }
        let (kind, proto) = match (*proto, t.proto) {
            (ProtoState::Tcp(c), TCP) => (
                Kind::Tcp,
                ProtoState::Tcp(c.sanitized().ok_or(ImportError::BadTcpState)?),
            ),
            (ProtoState::Udp, UDP) => (Kind::Udp, ProtoState::Udp),
            (ProtoState::IcmpEcho, p) if matches!((p, t.family), (ICMP, 4) | (ICMPV6, 6)) => {
                (Kind::Icmp, ProtoState::IcmpEcho)
            }
            (ProtoState::Generic, p) if !matches!(p, TCP | UDP | ICMP | ICMPV6) => {
                (Kind::Generic, ProtoState::Generic)
            }
            _ => return Err(ImportError::ProtoMismatch),
        };
        if *t == t.reverse() {
            return Err(ImportError::SameEndpoints);
        }
        if shard_hash(&t.src, &t.dst, t.proto) as u32 & self.mask != self.id {
            return Err(ImportError::WrongShard);
        }
        Ok((kind, proto))
    }

    /// The live connection whose original direction is `t` (an entry the peer sees the other
    /// way round is a different connection to it).
    fn slot_of(&self, t: &Tuple) -> Option<u32> {
        match self.lookup(t) {
            Some((slot, 0)) => Some(slot),
            _ => None,
        }
    }

    /// Merge a peer's view into live entry `slot`. Never moves the TCP state back: an older
    /// view only extends the expiry. Status bits only get set; the entry keeps its origin (an
    /// entry used here stays ours), and counts as refreshed for the bulk sweep.
    fn merge(
        &mut self,
        slot: u32,
        now_ms: u64,
        proto: ProtoState,
        bits: u16,
        expires_in_ms: u64,
        helper: Option<&HelperState>,
    ) {
        let e = &mut self.entries[slot as usize];
        let expires = now_ms.saturating_add(expires_in_ms);
        let older = match proto {
            ProtoState::Tcp(c) => c.state().rank() < e.tcp.state().rank(),
            _ => false,
        };
        e.status &= !status::INTERNAL;
        if older {
            e.expires = e.expires.max(expires);
            return;
        }
        if let ProtoState::Tcp(_) = proto {
            e.tcp = relearned(&proto);
        }
        e.expires = expires;
        e.status |= bits & (status::SEEN_REPLY | status::ASSURED);
        if let (Some(mine), Some(theirs)) = (e.helper.as_deref_mut(), helper) {
            merge_helper(mine, theirs);
        } else if e.helper.is_none() {
            e.helper = helper.map(|h| Box::new(h.clone()));
        }
    }

    /// Import a whole connection from a peer (its creation, a helper change, a re-send, a bulk
    /// item). Nothing is announced. What it does to what we hold:
    /// - nothing: a new entry, marked `FROM_PEER`;
    /// - a learned entry (`FROM_PEER`): replaced in place (its expectations and RELATED
    ///   connections stay attached), even to an earlier TCP state. The peer's stream is
    ///   ordered (the sync core never applies a whole copy older than what it applied before
    ///   from that stream), so an earlier state is a new incarnation of the tuple, e.g. after
    ///   the peer restarted, and merging would keep the stale one forever;
    /// - an entry used here: merged, never moving the TCP state back (`merge`): a peer that
    ///   lags, or came back with an old table, cannot rewind a connection we forward;
    /// - a new connection (SYN_SENT) on a finished one (TIME_WAIT/CLOSE), or an entry the
    ///   peer sees the other way round: the old entry is removed (quietly, its expectations
    ///   with it) and the new one inserted, as a local reopen does. A used-here entry seen
    ///   the other way round is kept.
    ///
    /// A RELATED connection's master is found by tuple; if it is not here (yet) the
    /// connection is imported without one (the master only matters to the expectations it
    /// owns, which are refused without it).
    pub fn import_conn(
        &mut self,
        now: Timestamp,
        snap: &ConnSnapshot,
    ) -> Result<ConnId, ImportError> {
        let now_ms = now.as_millis();
        let t = snap.tuple;
        let (kind, proto) = self.check_conn(&t, &snap.proto)?;
        if let Some(h) = &snap.helper {
            let sane = kind == Kind::Tcp && h.dir.iter().all(|d| usize::from(d.len) <= LINE_MAX);
            if !sane {
                return Err(ImportError::BadHelper);
            }
        }
        let expires_in = snap.expires_in_ms.min(self.max_expiry_ms);
        let master = snap
            .master
            .and_then(|m| self.slot_of(&m))
            .map(|s| self.id_of(s));
        if let Some((slot, dir)) = self.lookup(&t) {
            let learned = self.entries[slot as usize].status & status::FROM_PEER != 0;
            match (dir, learned) {
                (0, _) if self.reopens(slot, &proto) => self.destroy_quiet(slot),
                (0, true) => {
                    let e = &mut self.entries[slot as usize];
                    e.tcp = relearned(&proto);
                    e.status = (snap.status & status::REPLICATED) | status::FROM_PEER;
                    e.expires = now_ms.saturating_add(expires_in);
                    e.helper = snap.helper.clone();
                    // Only ever set: `bulk_page` relies on a live entry's master not going
                    // from Some to None (a dead master is harmless, it is looked up live).
                    if master.is_some() {
                        e.master = master;
                    }
                    return Ok(self.id_of(slot));
                }
                (0, false) => {
                    let h = snap.helper.as_deref();
                    self.merge(slot, now_ms, proto, snap.status, expires_in, h);
                    let e = &mut self.entries[slot as usize];
                    if e.master.is_none() {
                        e.master = master;
                    }
                    return Ok(self.id_of(slot));
                }
                (_, true) => self.destroy_quiet(slot),
                (_, false) => return Ok(self.id_of(slot)),
            }
        }
        let Some(slot) = self.alloc(now_ms, &mut no_room) else {
            return Err(ImportError::TableFull);
        };
        let e = &mut self.entries[slot as usize];
        e.tuple = t;
        e.kind = kind;
        e.status = (snap.status & status::REPLICATED) | status::FROM_PEER;
        e.tcp = relearned(&proto);
        e.expires = now_ms.saturating_add(expires_in);
        e.master = master;
        e.helper = snap.helper.clone();
        self.index_insert(slot);
        Ok(self.id_of(slot))
    }

    /// Does a peer's TCP state `proto` for live entry `slot` start a new connection on a
    /// finished one?
    fn reopens(&self, slot: u32, proto: &ProtoState) -> bool {
        let e = &self.entries[slot as usize];
        matches!(proto, ProtoState::Tcp(c) if c.state() == TcpState::SynSent)
            && e.kind == Kind::Tcp
            && matches!(e.tcp.state(), TcpState::TimeWait | TcpState::Close)
    }

    /// Apply a peer's compact update to the connection it names (`merge`: never backwards).
    /// `ApplyError::Missing` when it is not here: the caller asks the peer for it whole.
    pub fn apply_update(&mut self, now: Timestamp, u: &ConnUpdate) -> Result<(), ApplyError> {
        let (_, proto) = self.check_conn(&u.tuple, &u.proto)?;
        let slot = self.slot_of(&u.tuple).ok_or(ApplyError::Missing)?;
        let expires_in = u.expires_in_ms.min(self.max_expiry_ms);
        self.merge(slot, now.as_millis(), proto, u.status, expires_in, None);
        Ok(())
    }

    /// The peer's connection `t` ended: remove our copy if it is still only the peer's
    /// (`FROM_PEER`). An entry used here is ours, and a peer that lags (or came back with an
    /// old table) cannot end it. Nothing is announced. True if an entry was removed.
    pub fn remove_conn(&mut self, t: &Tuple) -> bool {
        match self.lookup(t) {
            Some((slot, _)) if self.entries[slot as usize].status & status::FROM_PEER != 0 => {
                self.destroy_quiet(slot);
                true
            }
            _ => false,
        }
    }

    /// An operator on the peer killed connection `t` (`sync::Item::ConnKilled`): remove our
    /// entry for it, seen either way round, whoever owns it, with its expectations. A learned
    /// entry goes quietly (no echo); one used here goes as a local removal would
    /// (`DestroyReason::Removed`, announced as an ordinary end), so that a copy the peer
    /// learned of it meanwhile (a new incarnation that crossed the kill) goes too. True if an
    /// entry was removed.
    pub fn kill_conn(&mut self, t: &Tuple) -> bool {
        match self.lookup(t) {
            Some((slot, _)) => {
                self.destroy(slot, DestroyReason::Removed);
                true
            }
            None => false,
        }
    }

    /// Import a peer's expectation with its remaining lifetime. Its master must be here
    /// (`NoMaster`); an identical one (same master and template) is refreshed; the
    /// per-master limit evicts the oldest, the global bound refuses (`TableFull`). Nothing
    /// is announced.
    pub fn import_expect(&mut self, now: Timestamp, x: &ExpectSnapshot) -> Result<(), ImportError> {
        use crate::packet::proto::{TCP, UDP};
        let now_ms = now.as_millis();
        if (x.family != 4 && x.family != 6) || x.master.family != x.family {
            return Err(ImportError::BadFamily);
        }
        if !matches!(x.proto, TCP | UDP) {
            return Err(ImportError::ProtoMismatch);
        }
        if shard_hash(&x.src, &x.dst, x.proto) as u32 & self.mask != self.id {
            return Err(ImportError::WrongShard);
        }
        let slot = self.slot_of(&x.master).ok_or(ImportError::NoMaster)?;
        let new = Expect {
            master: self.id_of(slot),
            master_tuple: x.master,
            proto: x.proto,
            family: x.family,
            src: x.src,
            src_port: x.src_port,
            dst: x.dst,
            dst_port: x.dst_port,
            created: now_ms,
            expires: now_ms.saturating_add(x.expires_in_ms.min(self.max_expiry_ms)),
            helper: x.helper,
            from_peer: true,
            stale: false,
            orphan: false,
        };
        self.expire_expectations(now_ms);
        if let Some(old) = self.expects.iter_mut().find(|o| o.same_as(&new)) {
            old.expires = new.expires;
            old.stale = false;
            old.orphan = false;
            return Ok(());
        }
        let owned = self
            .expects
            .iter()
            .filter(|o| o.master == new.master)
            .count();
        if owned >= self.max_expect_per_master {
            let oldest = (0..self.expects.len())
                .filter(|&i| self.expects[i].master == new.master)
                .min_by_key(|&i| self.expects[i].created);
            if let Some(i) = oldest {
                // The new one takes the evicted one's place in the global bound.
                self.expects.swap_remove(i);
                self.expects.push(new);
                return Ok(());
            }
        }
        if !self.limit.expects.reserve() {
            return Err(ImportError::TableFull);
        }
        self.expects.push(new);
        Ok(())
    }

    /// The peer's expectation `x` ended (matched, expired, evicted): remove our copy if it was
    /// learned. True if one was removed. Nothing is announced.
    pub fn remove_expect(&mut self, x: &ExpectSnapshot) -> bool {
        let found = self.expects.iter().position(|o| {
            o.from_peer
                && o.master_tuple == x.master
                && o.proto == x.proto
                && o.family == x.family
                && o.src == x.src
                && o.src_port == x.src_port
                && o.dst == x.dst
                && o.dst_port == x.dst_port
        });
        match found {
            Some(i) => {
                self.take_expect(i);
                true
            }
            None => false,
        }
    }

    /// A bulk transfer from the peer starts: every learned entry and expectation counts as
    /// not refreshed until the transfer (or a live item) brings it again, and the sweep at
    /// its end removes what it did not bring. Except when `peer_restarted` (the bulk comes
    /// from a new boot of the peer, and what we learned came from an earlier one): then the
    /// peer did not end those connections, it lost them, and our copy is the only one left
    /// (the peer gets it back in our bulk, `BulkScope::OwnAndLearned`). They become orphans
    /// (`status::PEER_ORPHAN`), which no sweep removes; their timers, a `ConnGone`, or a
    /// local packet end that. Without this, the active gateway that took over from a
    /// crashed peer swept every learned connection that had been idle since the takeover as
    /// soon as the peer came back empty (found by the `Pair` harness's property test).
    pub fn begin_peer_bulk(&mut self, peer_restarted: bool) {
        for e in self.entries.iter_mut() {
            if e.kind == Kind::Free || e.status & status::FROM_PEER == 0 {
                continue;
            }
            if peer_restarted {
                e.status = (e.status & !status::PEER_STALE) | status::PEER_ORPHAN;
            } else if e.status & status::PEER_ORPHAN == 0 {
                e.status |= status::PEER_STALE;
            }
        }
        for x in self.expects.iter_mut().filter(|x| x.from_peer) {
            if peer_restarted {
                x.orphan = true;
                x.stale = false;
            } else if !x.orphan {
                x.stale = true;
            }
        }
    }

    /// Every TCP connection re-learns its bounds from its next segments, and window checks
    /// are liberal until `until_ms` (`Conntrack::handover`). Returns how many were
    /// marked.
    pub fn handover(&mut self, until_ms: u64) -> u64 {
        self.liberal_until_ms = self.liberal_until_ms.max(until_ms);
        let mut n = 0;
        for e in self.entries.iter_mut().filter(|e| e.kind == Kind::Tcp) {
            e.tcp.set_relearn();
            n += 1;
        }
        n
    }

    /// The bulk transfer ended: remove the learned entries and expectations it did not
    /// refresh (the peer no longer has them). Entries used here since are ours and stay.
    /// Returns how many connections and expectations were removed. Nothing is announced.
    pub fn end_peer_bulk(&mut self) -> u64 {
        let mut n = 0;
        for slot in 0..self.entries.len() as u32 {
            let e = &self.entries[slot as usize];
            let stale = status::FROM_PEER | status::PEER_STALE;
            if e.kind != Kind::Free && e.status & stale == stale {
                self.destroy_quiet(slot);
                n += 1;
            }
        }
        let mut i = 0;
        while i < self.expects.len() {
            if self.expects[i].stale {
                self.take_expect(i);
                n += 1;
            } else {
                i += 1;
            }
        }
        n
    }

    /// One step of a bulk listing (`Conntrack::bulk_page`): from cursor `from` (0 = start of
    /// the shard), append this node's own unexpired connections to `out.conns` (those without
    /// a master first, then those created with one, whether that master still lives or not)
    /// and then the shard's own expectations to `out.expects`, until the two hold `limit` items
    /// or `scan` slots were examined. The
    /// expectations come in one go (they are few: `Config::max_expectations` over all shards),
    /// so a page may exceed `limit` by them. Returns where to resume, or `None` at the end of
    /// the shard.
    ///
    /// Learned entries (`FROM_PEER`) and expectations are listed only with `learned` (a peer
    /// that restarted and lost them; `sync::core::Session::bulk_scope`): a node
    /// replicates what it tracks, and its peer is the source of what it learned. Echoing them back (found by
    /// the `sync_wire` fuzz target) let bulks that cross, or that race a removal, hand the peer
    /// its own connections in an older state: a connection the peer had just reset came back
    /// to it as a learned SYN_SENT entry (the import's reopen rule replaced its own CLOSE
    /// entry), one it had destroyed came back as a learned ghost, and two learned copies kept
    /// each other alive through the sweep after each bulk.
    pub fn bulk_page(
        &self,
        from: u32,
        limit: usize,
        scan: usize,
        now: Timestamp,
        learned: bool,
        out: &mut BulkPage,
    ) -> Option<u32> {
        let BulkPage { conns, expects, .. } = out;
        let now_ms = now.as_millis();
        let (mut phase, mut slot) = (from >> PHASE_SHIFT, from & SLOT_MASK);
        let full = |c: &Vec<ConnSnapshot>, x: &Vec<ExpectSnapshot>| c.len() + x.len() >= limit;
        let mut scanned = 0;
        while phase < PHASE_EXPECTS {
            let end = (self.entries.len() as u32).min(SLOT_MASK);
            while slot < end {
                if full(conns, expects) || scanned >= scan {
                    return Some(phase << PHASE_SHIFT | slot);
                }
                let e = &self.entries[slot as usize];
                // Whether it *had* a master, not whether that master still lives: a live
                // entry's `master` never changes from Some to None, so an entry is never
                // skipped by both phases (the sweep after a bulk would remove it).
                let has_master = e.master.is_some();
                let listed = learned || e.status & status::FROM_PEER == 0;
                if e.kind != Kind::Free
                    && listed
                    && e.expires > now_ms
                    && has_master == (phase == 1)
                {
                    conns.push(self.peer_snapshot_slot(slot, now_ms));
                }
                slot += 1;
                scanned += 1;
            }
            phase += 1;
            slot = 0;
        }
        if phase == PHASE_EXPECTS && !self.expects.is_empty() {
            if full(conns, expects) {
                return Some(PHASE_EXPECTS << PHASE_SHIFT);
            }
            expects.extend(
                self.expects
                    .iter()
                    .filter(|x| (learned || !x.from_peer) && x.expires > now_ms)
                    .map(|x| expect_snapshot(x, now_ms)),
            );
        }
        None
    }
}

/// The TCP state to store for a peer's `proto`: its windows are stale by the time a packet
/// arrives here, so both directions re-learn them from their next segment.
fn relearned(proto: &ProtoState) -> TcpConn {
    match *proto {
        ProtoState::Tcp(mut c) => {
            c.set_relearn();
            c
        }
        _ => TcpConn::default(),
    }
}

/// Take the peer's parse state of each direction unless ours is further on (an older copy
/// must not rewind the helper: it would see the next line as beyond a gap and skip it).
fn merge_helper(mine: &mut HelperState, theirs: &HelperState) {
    for (m, t) in mine.dir.iter_mut().zip(theirs.dir.iter()) {
        let newer = match (m.next_seq, t.next_seq) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(a), Some(b)) => (b.wrapping_sub(a) as i32) >= 0,
        };
        if newer {
            m.clone_from(t);
        }
    }
}
