//! TCP state machine and window tracking, after Linux's nf_conntrack_proto_tcp.c.
//!
//! Owns the per-connection TCP state (`TcpConn`): the state-transition table, the per-direction
//! sequence/window bounds (Guido van Rooij's "Real Stateful TCP Packet Filtering"), RST
//! validation and the re-learning of windows for entries picked up mid-stream or learned from a
//! peer. Must not touch the table, timers or I/O: it judges one segment against one connection.

use std::ops::{Add, Sub};

use crate::conntrack::Direction;
use crate::label::label_enum;
use crate::packet::{Tcp, TcpFlags};

/// A TCP sequence number (smoltcp's `TcpSeqNumber`, Linux's `before`/`after`): arithmetic
/// wraps modulo 2^32 and order is serial-number order (RFC 1982). That order is not
/// transitive across more than half the space, so the type is deliberately not `PartialOrd`:
/// every comparison says which way it looks.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct SeqNumber(pub u32);

impl SeqNumber {
    /// `self` comes strictly before `other` (Linux's `before`).
    #[inline]
    pub fn before(self, other: SeqNumber) -> bool {
        (self.0.wrapping_sub(other.0) as i32) < 0
    }
    /// `self` comes strictly after `other` (Linux's `after`).
    #[inline]
    pub fn after(self, other: SeqNumber) -> bool {
        other.before(self)
    }
}

impl Add<u32> for SeqNumber {
    type Output = SeqNumber;
    #[inline]
    fn add(self, n: u32) -> SeqNumber {
        SeqNumber(self.0.wrapping_add(n))
    }
}

impl Sub<u32> for SeqNumber {
    type Output = SeqNumber;
    #[inline]
    fn sub(self, n: u32) -> SeqNumber {
        SeqNumber(self.0.wrapping_sub(n))
    }
}

/// The distance from `other` forward to `self`, modulo 2^32.
impl Sub for SeqNumber {
    type Output = u32;
    #[inline]
    fn sub(self, other: SeqNumber) -> u32 {
        self.0.wrapping_sub(other.0)
    }
}

label_enum! {
    /// TCP connection states, numbered as Linux's `tcp_conntrack` (the declaration order).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
    pub enum TcpState {
        None => "NONE",
        SynSent => "SYN_SENT",
        SynRecv => "SYN_RECV",
        Established => "ESTABLISHED",
        FinWait => "FIN_WAIT",
        CloseWait => "CLOSE_WAIT",
        LastAck => "LAST_ACK",
        TimeWait => "TIME_WAIT",
        Close => "CLOSE",
        /// Simultaneous open: a SYN crossed ours.
        SynSent2 => "SYN_SENT2",
    }
}

impl TcpState {
    /// Position in a connection's life, for merging a peer's copy: state never moves to a
    /// lower rank. FIN_WAIT ranks below CLOSE_WAIT because the table only goes FIN_WAIT ->
    /// CLOSE_WAIT (the ACK of the first FIN), never back. SYN_SENT2 (our SYN crossed by the
    /// peer's) comes after SYN_SENT, from which it is reached, and before SYN_RECV, which its
    /// SYN/ACK leads to. A reopen (TIME_WAIT/CLOSE -> SYN_SENT) is a new connection, not a
    /// step back: the tracker replaces the entry for it, and so does an import.
    pub fn rank(self) -> u8 {
        match self {
            TcpState::None => 0,
            TcpState::SynSent => 1,
            TcpState::SynSent2 => 2,
            TcpState::SynRecv => 3,
            TcpState::Established => 4,
            TcpState::FinWait => 5,
            TcpState::CloseWait => 6,
            TcpState::LastAck => 7,
            TcpState::TimeWait => 8,
            TcpState::Close => 9,
        }
    }
}

/// Sequence-space view of one direction (the *sender* of that direction's segments).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TcpDir {
    /// Highest sequence number sent + 1 (max of seq + len).
    pub end: SeqNumber,
    /// Highest sequence number the peer's window allows (max of ack + window).
    pub maxend: SeqNumber,
    /// Largest window seen from this sender (scaled); 0 = nothing seen yet.
    pub maxwin: u32,
    /// Window-scale shift this sender announced.
    pub scale: u8,
    /// `DIR_*` flags.
    pub flags: u8,
}

/// The sender announced window scaling in its SYN.
pub const DIR_WSCALE: u8 = 0x01;
/// The sender has sent data the peer has not acknowledged yet.
pub const DIR_UNACKED: u8 = 0x02;
/// Re-learn this direction's bounds from its next segment instead of judging it (mid-stream
/// pickup, or an entry learned from a peer whose windows are stale).
pub const DIR_RELEARN: u8 = 0x04;
/// Do not judge this direction's segments by the windows (Linux's `IP_CT_TCP_FLAG_BE_LIBERAL`):
/// set on both directions of a connection picked up mid-stream, whose window scaling was
/// negotiated in SYNs we never saw, so every window we would compute is too small.
pub const DIR_LIBERAL: u8 = 0x08;
/// The sender allowed SACK in its SYN (RFC 2018), so the peer's ACKs may carry SACK blocks
/// that acknowledge beyond the cumulative ACK (Linux's `IP_CT_TCP_FLAG_SACK_PERM`).
pub const DIR_SACK_PERM: u8 = 0x10;
/// Every direction flag; a peer's copy keeps only these.
pub const DIR_ALL: u8 = DIR_WSCALE | DIR_UNACKED | DIR_RELEARN | DIR_LIBERAL | DIR_SACK_PERM;

/// Largest window-scale shift (RFC 7323 section 2.3).
pub const MAX_WSCALE: u8 = 14;

/// Linux's `MAXACKWINCONST`: the least an ACK may lag behind (see `in_window`).
const MAX_ACK_WINDOW_FLOOR: u32 = 66000;

/// Per-connection TCP state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TcpConn {
    pub state: TcpStateRepr,
    /// Indexed by `Direction as usize`.
    pub dir: [TcpDir; 2],
}

/// `TcpState` stored as a byte (keeps `TcpConn: Default`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TcpStateRepr(pub u8);

impl TcpStateRepr {
    /// The state, if the byte names one (input from a peer may not).
    #[inline]
    pub fn checked(self) -> Option<TcpState> {
        TcpState::ALL.get(usize::from(self.0)).copied()
    }
    #[inline]
    pub fn get(self) -> TcpState {
        TcpState::ALL
            .get(usize::from(self.0))
            .copied()
            .unwrap_or(TcpState::Close)
    }
    #[inline]
    pub fn set(&mut self, s: TcpState) {
        self.0 = s as u8;
    }
}

/// Why a segment was judged INVALID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpVerdict {
    /// In state and in window.
    Ok,
    /// Allowed but does not move the state (e.g. a SYN in ESTABLISHED): accept, change nothing.
    Ignored,
    BadTransition,
    OutOfWindow,
    RstOutOfWindow,
}

/// Flag combinations Linux accepts (`tcp_valid_flags`), ignoring PSH, ECE and CWR.
#[inline]
pub fn valid_flags(f: TcpFlags) -> bool {
    const S: u8 = TcpFlags::SYN;
    const A: u8 = TcpFlags::ACK;
    const F: u8 = TcpFlags::FIN;
    const R: u8 = TcpFlags::RST;
    const U: u8 = TcpFlags::URG;
    let core = f.0 & !(TcpFlags::PSH | TcpFlags::ECE | TcpFlags::CWR);
    matches!(
        core,
        x if x == S || x == S | U || x == S | A || x == R || x == R | A || x == F | A
            || x == F | A | U || x == A || x == A | U
    )
}

/// Index of a segment's flags in the transition table.
#[inline]
fn flag_index(f: TcpFlags) -> usize {
    if f.rst() {
        4
    } else if f.syn() {
        if f.ack() {
            1
        } else {
            0
        }
    } else if f.fin() {
        2
    } else if f.ack() {
        3
    } else {
        5
    }
}

// Transition outcomes: a state, or IV (invalid) / IG (ignore).
const IV: u8 = 0xfe;
const IG: u8 = 0xff;
const NO: u8 = 0;
const SS: u8 = 1;
const SR: u8 = 2;
const ES: u8 = 3;
const FW: u8 = 4;
const CW: u8 = 5;
const LA: u8 = 6;
const TW: u8 = 7;
const CL: u8 = 8;
const S2: u8 = 9;

/// `[direction][flags][old state] -> new state`: Linux's `tcp_conntracks` in
/// net/netfilter/nf_conntrack_proto_tcp.c as of v6.6 (the table is the same since v2.6.3x,
/// when SYN_SENT2 was added), cell for cell. IV: the segment is INVALID; IG: accepted but the
/// state does not move (the kernel's "ignore"). Two cells become a reopen in `Shard::update`
/// before this table is read, as the kernel's code around the table does: original SYN in
/// TIME_WAIT/CLOSE and reply SYN in TIME_WAIT destroy the entry and the SYN creates a new one.
/// Columns: NONE, SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT,
/// CLOSE, SYN_SENT2.
#[rustfmt::skip]
const TRANSITIONS: [[[u8; 10]; 6]; 2] = [
    [ // original: segments from the connection's initiator
        /* syn    */ [SS, SS, IG, IG, IG, IG, IG, SS, SS, S2],
        // NONE -> SYN_SENT: a new connection. SYN_SENT -> SYN_SENT: a retransmitted SYN.
        // SYN_RECV..LAST_ACK: ignored (a stale or forged SYN must not reset a live
        // connection; the endpoint answers it with an ACK). TIME_WAIT/CLOSE -> SYN_SENT:
        // reopen. SYN_SENT2 -> SYN_SENT2: our SYN retransmitted during a simultaneous open.
        /* synack */ [IV, IV, SR, IV, IV, IV, IV, IV, IV, SR],
        // The initiator sends SYN/ACK only in a simultaneous open: SYN_RECV stays (its
        // retransmission), SYN_SENT2 -> SYN_RECV (it answers the peer's SYN). Anywhere
        // else it is invalid.
        /* fin    */ [IV, IV, FW, FW, LA, LA, LA, TW, CL, IV],
        // SYN_RECV/ESTABLISHED -> FIN_WAIT: the first FIN. FIN_WAIT/CLOSE_WAIT/LAST_ACK ->
        // LAST_ACK: the second FIN (or a retransmission). TIME_WAIT and CLOSE stay. No FIN
        // before the handshake's SYN/ACK.
        /* ack    */ [ES, IV, ES, ES, CW, CW, TW, TW, CL, IV],
        // NONE -> ESTABLISHED: mid-stream pickup (if enabled). SYN_RECV -> ESTABLISHED: the
        // handshake's third segment. FIN_WAIT -> CLOSE_WAIT: the FIN was acknowledged.
        // LAST_ACK -> TIME_WAIT: the last FIN was acknowledged. An ACK in SYN_SENT or
        // SYN_SENT2 (no SYN/ACK seen) is invalid.
        /* rst    */ [IV, CL, CL, CL, CL, CL, CL, CL, CL, CL],
        // Any state -> CLOSE (subject to the RST checks in `update`: SYN_SENT needs the
        // exact ACK, others the window, RFC 5961's challenge ACK in ESTABLISHED).
        /* none   */ [IV, IV, IV, IV, IV, IV, IV, IV, IV, IV],
        // No SYN, ACK, FIN or RST: never valid.
    ],
    [ // reply: segments from the responder
        /* syn    */ [IV, S2, IV, IV, IV, IV, IV, SS, IV, S2],
        // SYN_SENT -> SYN_SENT2: the responder's SYN crossed ours (simultaneous open).
        // TIME_WAIT -> SYN_SENT: the responder reopens (roles swap). Else invalid.
        /* synack */ [IV, SR, IG, IG, IG, IG, IG, IG, IG, SR],
        // SYN_SENT/SYN_SENT2 -> SYN_RECV: the handshake's second segment. Later: ignored
        // (retransmitted SYN/ACKs, e.g. after a lost third segment).
        /* fin    */ [IV, IV, FW, FW, LA, LA, LA, TW, CL, IV],
        // As in the original direction: first FIN -> FIN_WAIT, second -> LAST_ACK.
        /* ack    */ [IV, IG, SR, ES, CW, CW, TW, TW, CL, IG],
        // SYN_SENT/SYN_SENT2: ignored (an ACK that is not a SYN/ACK, e.g. to an old
        // connection). SYN_RECV stays (simultaneous open), ESTABLISHED stays, FIN_WAIT ->
        // CLOSE_WAIT, LAST_ACK -> TIME_WAIT. NONE: a reply cannot create a connection.
        /* rst    */ [IV, CL, CL, CL, CL, CL, CL, CL, CL, CL],
        // Any state -> CLOSE (the same RST checks as the original direction).
        /* none   */ [IV, IV, IV, IV, IV, IV, IV, IV, IV, IV],
    ],
];
// NO is only a source state; keep the constant for the table's readability.
const _: u8 = NO;

/// End of a segment in sequence space: seq + payload + SYN + FIN.
#[inline]
fn seg_end(t: &Tcp) -> SeqNumber {
    SeqNumber(t.seq) + t.payload_len + u32::from(t.flags.syn()) + u32::from(t.flags.fin())
}

/// The options a SYN announces for its sender's direction (Linux's `tcp_options`): window
/// scale (clamped to RFC 7323's 14) and SACK permitted. Earlier options are forgotten.
fn syn_options(d: &mut TcpDir, t: &Tcp) {
    d.flags &= DIR_LIBERAL;
    d.scale = 0;
    if let Some(s) = t.options.window_scale {
        d.flags |= DIR_WSCALE;
        d.scale = s.min(MAX_WSCALE);
    }
    if t.options.sack_permitted {
        d.flags |= DIR_SACK_PERM;
    }
}

/// The highest right edge of the segment's SACK blocks (RFC 2018) that lies after `ack`, else
/// `ack` (Linux's `tcp_sack`). Only the first SACK option counts; a malformed option list
/// ends the scan (it cannot move the edge). Hand-written: it runs on the packet path for
/// every ACK to a SACK-permitting receiver, and must neither allocate nor index past the end.
fn sack_edge(opts: &[u8], ack: SeqNumber) -> SeqNumber {
    // The common case on every segment: only timestamps (NOP, NOP, TS).
    if opts.len() == 12 && opts.starts_with(&[1, 1, 8, 10]) {
        return ack;
    }
    let mut sack = ack;
    let mut o = opts;
    while let Some((&kind, rest)) = o.split_first() {
        match kind {
            0 => break,
            1 => o = rest,
            _ => {
                let Some(&len) = rest.first() else { break };
                let len = usize::from(len);
                let Some(option) = o.get(..len).filter(|_| len >= 2) else {
                    break;
                };
                if kind == 5 && len >= 10 && (len - 2) % 8 == 0 {
                    for block in option[2..].chunks_exact(8) {
                        let right =
                            SeqNumber(u32::from_be_bytes([block[4], block[5], block[6], block[7]]));
                        if right.after(sack) {
                            sack = right;
                        }
                    }
                    break;
                }
                o = &o[len..];
            }
        }
    }
    sack
}

impl TcpConn {
    pub fn state(&self) -> TcpState {
        self.state.get()
    }

    /// Start tracking from a first segment in the original direction. Returns `None` if this
    /// segment may not create a connection (`pickup` allows any non-RST, non-SYN/ACK segment).
    pub fn new_from(t: &Tcp, pickup: bool) -> Option<TcpConn> {
        let f = t.flags;
        let mut c = TcpConn::default();
        if f.syn() && !f.ack() {
            c.state.set(TcpState::SynSent);
            let d = &mut c.dir[0];
            d.end = seg_end(t);
            d.maxend = d.end;
            d.maxwin = u32::from(t.window).max(1);
            syn_options(d, t);
            Some(c)
        } else if pickup && !f.rst() && !f.syn() && f.ack() {
            // Mid-stream pickup: the state is unknown, assume ESTABLISHED and learn both
            // directions' bounds from the first segments seen. SACK is assumed permitted
            // both ways, as Linux does: the SYNs that said so were never seen.
            c.state.set(TcpState::Established);
            c.dir[0].flags = DIR_RELEARN | DIR_LIBERAL | DIR_SACK_PERM;
            c.dir[1].flags = DIR_RELEARN | DIR_LIBERAL | DIR_SACK_PERM;
            c.in_window(Direction::Original, t, true, false);
            Some(c)
        } else {
            None
        }
    }

    /// Judge and apply one segment of an existing connection. `liberal` skips window checks.
    /// On `Ok`/`Ignored` the state and bounds are updated; on any error nothing changes.
    pub fn update(&mut self, dir: Direction, t: &Tcp, liberal: bool) -> TcpVerdict {
        let di = dir as usize;
        let old = self.state();
        let relearn = self.dir[di].flags & DIR_RELEARN != 0;
        let liberal = liberal || self.dir[di].flags & DIR_LIBERAL != 0;
        let new = TRANSITIONS[di][flag_index(t.flags)][old as usize];
        let new = match new {
            IV if relearn => old, // learning a stale entry: judge the window, not the transition
            IV => return TcpVerdict::BadTransition,
            IG => return TcpVerdict::Ignored,
            s => TcpState::ALL[usize::from(s)],
        };
        if t.flags.rst() {
            if old == TcpState::SynSent {
                // RST while SYN_SENT must acknowledge our SYN exactly (RFC 793/5961).
                if dir == Direction::Reply
                    && !(t.flags.ack() && SeqNumber(t.ack) == self.dir[0].end)
                {
                    return TcpVerdict::RstOutOfWindow;
                }
            } else if relearn && self.dir[1 - di].flags & DIR_RELEARN != 0 {
                // Learned from a peer and nothing seen since: its sequence number cannot be
                // checked, and accepting a RST at any number would let anyone close it. The
                // first segment either way tells us where the sender is.
                return TcpVerdict::RstOutOfWindow;
            } else if !liberal && !self.rst_in_window(dir, t) {
                return TcpVerdict::RstOutOfWindow;
            } else if old == TcpState::Established && SeqNumber(t.seq) != self.dir[di].end {
                // RFC 5961 3.2, as Linux: in window but not the exact next sequence number.
                // The receiver answers with a challenge ACK and keeps the connection; so do
                // we, or that ACK would meet a closed entry. Nothing changes (its sequence
                // number must not become the sender's end either); the exact RST that
                // answers the challenge closes.
                return TcpVerdict::Ok;
            }
        }
        // A retransmitted SYN may restart the sender's bounds only while the handshake is
        // still open in its direction (Linux's tcp_in_window).
        let reinit = matches!(
            (old, dir),
            (TcpState::SynSent, Direction::Original) | (TcpState::SynRecv, Direction::Reply)
        );
        let mut next = *self;
        if !next.in_window(dir, t, liberal, reinit) {
            return TcpVerdict::OutOfWindow;
        }
        // A SYN in TIME_WAIT (either direction) or CLOSE (original) reopens: the caller
        // replaces the entry before it gets here.
        next.state.set(new);
        *self = next;
        TcpVerdict::Ok
    }

    /// RST is accepted only when its sequence number lies in the window the receiver advertised.
    fn rst_in_window(&self, dir: Direction, t: &Tcp) -> bool {
        let s = &self.dir[dir as usize];
        let r = &self.dir[1 - dir as usize];
        if r.maxwin == 0 && s.maxwin == 0 {
            return true;
        }
        // [sender.end - receiver.maxwin, sender.maxend]: the receive window of the peer.
        let seq = SeqNumber(t.seq);
        !seq.before(s.end - r.maxwin.max(1)) && !seq.after(s.maxend)
    }

    /// Linux's `tcp_in_window` (v6.6): check the segment against both directions' bounds and
    /// update them. Returns false (and the caller discards `self`) when out of window; a
    /// liberal direction's out-of-window segment passes but moves no bound, as in Linux.
    fn in_window(&mut self, dir: Direction, t: &Tcp, liberal: bool, reinit: bool) -> bool {
        let state = self.state();
        let di = dir as usize;
        let (sender, receiver) = if di == 0 {
            let (a, b) = self.dir.split_at_mut(1);
            (&mut a[0], &mut b[0])
        } else {
            let (a, b) = self.dir.split_at_mut(1);
            (&mut b[0], &mut a[0])
        };
        let mut seq = SeqNumber(t.seq);
        let mut end = seg_end(t);
        let mut win = u32::from(t.window);
        let mut ack = SeqNumber(t.ack);
        // SACK blocks acknowledge beyond the cumulative ACK; they count for the ACK bounds
        // only if the receiver of this segment allowed SACK.
        let mut sack = if t.flags.ack() && receiver.flags & DIR_SACK_PERM != 0 {
            sack_edge(t.opts, ack)
        } else {
            ack
        };

        if sender.flags & DIR_RELEARN != 0 {
            // Mid-stream (re)learning: take this segment's view as the truth.
            sender.flags &= !DIR_RELEARN;
            let swin = (win << sender.scale).max(1);
            sender.end = end;
            sender.maxwin = sender.maxwin.max(swin);
            // How far the sender may go before the receiver's next ACK says: the largest
            // window the receiver was seen to offer (the copy's), or the sender's own where
            // none is known (a mid-stream pickup); a bulk sender's own window is small and its
            // trains run past it. And never lower than what a receiver that re-learned first
            // has just set from its real window: that left a stream beyond its bounds for
            // good when the handover grace ended (found by the takeover nudge's end-to-end
            // test, where the probes' answers reach the gateway first).
            let guess = end + sender.maxwin.max(receiver.maxwin);
            if receiver.flags & DIR_RELEARN != 0 || guess.after(sender.maxend) {
                sender.maxend = guess;
            }
            if t.flags.ack() {
                if receiver.maxwin == 0 || receiver.flags & DIR_RELEARN != 0 {
                    receiver.end = ack;
                    receiver.maxend = ack;
                } else if ack.after(receiver.end) {
                    receiver.end = ack;
                }
                let m = ack + swin;
                if m.after(receiver.maxend) {
                    receiver.maxend = m;
                }
            }
            return true;
        }

        if sender.maxwin == 0 {
            // First segment in this direction.
            if t.flags.syn() {
                sender.end = end;
                sender.maxend = end;
                sender.maxwin = win.max(1);
                syn_options(sender, t);
                if !(sender.flags & DIR_WSCALE != 0 && receiver.flags & DIR_WSCALE != 0) {
                    sender.scale = 0;
                    receiver.scale = 0;
                }
                if !t.flags.ack() {
                    return true; // simultaneous open
                }
            } else {
                sender.end = end;
                let swin = (win << sender.scale).max(1);
                sender.maxwin = swin;
                sender.maxend = end + swin;
                if receiver.maxwin == 0 {
                    receiver.end = sack;
                    receiver.maxend = sack;
                }
            }
        } else if reinit && t.flags.syn() && end.after(sender.end) {
            // A retransmitted SYN (or SYN/ACK) with a new initial sequence number: re-initialise.
            sender.end = end;
            sender.maxend = end;
            sender.maxwin = win.max(1);
            syn_options(sender, t);
        }

        if !t.flags.ack() {
            ack = receiver.end;
            sack = ack;
        } else if t.flags.rst() && ack.0 == 0 {
            ack = receiver.end; // broken stacks send RST/ACK with ack 0
            sack = ack;
        }
        // A segment without data or SYN/FIN (a pure ACK, a window update, a keep-alive) is
        // judged at the sender's end, whatever its sequence number says.
        if seq == end && (!t.flags.rst() || (seq.0 == 0 && state == TcpState::SynSent)) {
            seq = sender.end;
            end = sender.end;
        }

        // Linux's MAXACKWINDOW: an ACK may lag the receiver's end by the sender's largest
        // window, but by at least 66000 bytes (reordered ACKs on small-window connections).
        let maxackwin = sender.maxwin.max(MAX_ACK_WINDOW_FLOOR);
        let in_recv_win = receiver.maxwin == 0 || end.after(sender.end - receiver.maxwin - 1);
        let ok = seq.before(sender.maxend + 1)
            && in_recv_win
            && sack.before(receiver.end + 1)
            && sack.after(receiver.end - maxackwin - 1);
        if !ok {
            return liberal;
        }
        if !t.flags.syn() {
            win <<= sender.scale;
        }
        // Update the sender's bounds. SACKed data counts as acknowledged window.
        let swin = win.wrapping_add(sack - ack);
        if sender.maxwin < swin {
            sender.maxwin = swin;
        }
        if end.after(sender.end) {
            sender.end = end;
            sender.flags |= DIR_UNACKED;
        }
        // Update the receiver's bounds.
        if receiver.maxwin != 0 && end.after(sender.maxend) {
            receiver.maxwin = receiver.maxwin.wrapping_add(end - sender.maxend);
        }
        if (sack + win).after(receiver.maxend - 1) {
            receiver.maxend = sack + win;
            if win == 0 {
                receiver.maxend = receiver.maxend + 1;
            }
        }
        if ack == receiver.end {
            receiver.flags &= !DIR_UNACKED;
        }
        true
    }

    /// Either direction has data in flight the peer has not acknowledged.
    pub fn unacked(&self) -> bool {
        (self.dir[0].flags | self.dir[1].flags) & DIR_UNACKED != 0
    }

    /// Check a copy from a peer: a state a live connection can be in (not NONE, in range) and
    /// window-scale shifts RFC 7323 allows; unknown direction flags are dropped. `None`: refuse.
    pub fn sanitized(mut self) -> Option<TcpConn> {
        if matches!(self.state.checked(), None | Some(TcpState::None)) {
            return None;
        }
        for d in &mut self.dir {
            if d.scale > MAX_WSCALE {
                return None;
            }
            d.flags &= DIR_ALL;
        }
        Some(self)
    }

    /// Mark both directions for re-learning (entries learned from a peer, whose bounds are stale).
    pub fn set_relearn(&mut self) {
        self.dir[0].flags |= DIR_RELEARN;
        self.dir[1].flags |= DIR_RELEARN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_order_wraps() {
        let a = SeqNumber(u32::MAX - 10);
        let b = a + 20; // wrapped past zero
        assert_eq!(b, SeqNumber(9));
        assert!(a.before(b) && b.after(a));
        assert!(!a.before(a) && !a.after(a));
        assert_eq!(b - a, 20);
        assert_eq!(b - 20, a);
        // Half the space away, the order flips: that is why there is no PartialOrd.
        assert!(SeqNumber(0).before(SeqNumber(0x7fff_ffff)));
        assert!(SeqNumber(0).after(SeqNumber(0x8000_0001)));
    }

    fn sack_opt(blocks: &[(u32, u32)]) -> Vec<u8> {
        let mut o = vec![1, 1, 5, (2 + 8 * blocks.len()) as u8];
        for (l, r) in blocks {
            o.extend_from_slice(&l.to_be_bytes());
            o.extend_from_slice(&r.to_be_bytes());
        }
        o
    }

    #[test]
    fn sack_edge_takes_the_highest_right_edge_after_the_ack() {
        let ack = SeqNumber(1000);
        assert_eq!(sack_edge(&[], ack), ack);
        assert_eq!(sack_edge(&sack_opt(&[(2000, 3000)]), ack), SeqNumber(3000));
        let three = sack_opt(&[(2000, 3000), (5000, 6000), (4000, 4500)]);
        assert_eq!(sack_edge(&three, ack), SeqNumber(6000));
        // Edges before the ACK (D-SACK of old data) do not move it back.
        assert_eq!(sack_edge(&sack_opt(&[(100, 900)]), ack), ack);
        // Across the wrap.
        let high = SeqNumber(u32::MAX - 5);
        assert_eq!(sack_edge(&sack_opt(&[(2, 10)]), high), SeqNumber(10));
        // After timestamps (the fast path is only for timestamps alone).
        let mut ts_then_sack = vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        ts_then_sack.extend(sack_opt(&[(2000, 2500)]));
        assert_eq!(sack_edge(&ts_then_sack, ack), SeqNumber(2500));
        assert_eq!(sack_edge(&ts_then_sack[..12], ack), ack);
    }

    #[test]
    fn malformed_sack_options_never_move_the_edge_nor_panic() {
        let ack = SeqNumber(1000);
        let good = sack_opt(&[(2000, 3000)]);
        // Cut at every length, and lengths that do not fit a whole number of blocks.
        for cut in 0..good.len() {
            assert_eq!(sack_edge(&good[..cut], ack), ack, "cut at {cut}");
        }
        for bad_len in [0u8, 1, 2, 9, 11, 17, 255] {
            let mut o = good.clone();
            o[3] = bad_len;
            assert_eq!(sack_edge(&o, ack), ack, "length {bad_len}");
        }
        // End-of-list stops the scan.
        let mut eol = vec![0];
        eol.extend(&good);
        assert_eq!(sack_edge(&eol, ack), ack);
    }
}
