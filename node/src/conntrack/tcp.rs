//! TCP state machine and window tracking, after Linux's nf_conntrack_proto_tcp.c.
//!
//! Owns the per-connection TCP state (`TcpConn`): the state-transition table, the per-direction
//! sequence/window bounds (Guido van Rooij's "Real Stateful TCP Packet Filtering"), RST
//! validation and the re-learning of windows for entries picked up mid-stream or learned from a
//! peer. Must not touch the table, timers or I/O: it judges one segment against one connection.

use crate::conntrack::Direction;
use crate::packet::{Tcp, TcpFlags};

/// TCP connection states, numbered as Linux's `tcp_conntrack`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum TcpState {
    None = 0,
    SynSent = 1,
    SynRecv = 2,
    Established = 3,
    FinWait = 4,
    CloseWait = 5,
    LastAck = 6,
    TimeWait = 7,
    Close = 8,
    /// Simultaneous open: a SYN crossed ours.
    SynSent2 = 9,
}

impl TcpState {
    pub const ALL: [TcpState; 10] = [
        TcpState::None,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::Established,
        TcpState::FinWait,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::SynSent2,
    ];
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

    pub fn name(self) -> &'static str {
        match self {
            TcpState::None => "NONE",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait => "FIN_WAIT",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::SynSent2 => "SYN_SENT2",
        }
    }
}

/// Sequence-space view of one direction (the *sender* of that direction's segments).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TcpDir {
    /// Highest sequence number sent + 1 (max of seq + len).
    pub end: u32,
    /// Highest sequence number the peer's window allows (max of ack + window).
    pub maxend: u32,
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

#[inline]
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}
#[inline]
fn after(a: u32, b: u32) -> bool {
    before(b, a)
}

/// End of a segment in sequence space: seq + payload + SYN + FIN.
#[inline]
fn seg_end(t: &Tcp) -> u32 {
    t.seq
        .wrapping_add(t.payload_len)
        .wrapping_add(u32::from(t.flags.syn()))
        .wrapping_add(u32::from(t.flags.fin()))
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
            if let Some(s) = t.options.window_scale {
                d.flags |= DIR_WSCALE;
                d.scale = s.min(MAX_WSCALE);
            }
            Some(c)
        } else if pickup && !f.rst() && !f.syn() && f.ack() {
            // Mid-stream pickup: the state is unknown, assume ESTABLISHED and learn both
            // directions' bounds from the first segments seen.
            c.state.set(TcpState::Established);
            c.dir[0].flags = DIR_RELEARN | DIR_LIBERAL;
            c.dir[1].flags = DIR_RELEARN | DIR_LIBERAL;
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
                if dir == Direction::Reply && !(t.flags.ack() && t.ack == self.dir[0].end) {
                    return TcpVerdict::RstOutOfWindow;
                }
            } else if relearn && self.dir[1 - di].flags & DIR_RELEARN != 0 {
                // Learned from a peer and nothing seen since: its sequence number cannot be
                // checked, and accepting a RST at any number would let anyone close it. The
                // first segment either way tells us where the sender is.
                return TcpVerdict::RstOutOfWindow;
            } else if !liberal && !self.rst_in_window(dir, t) {
                return TcpVerdict::RstOutOfWindow;
            } else if old == TcpState::Established && t.seq != self.dir[di].end {
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
        let lo = s.end.wrapping_sub(r.maxwin.max(1));
        !before(t.seq, lo) && !after(t.seq, s.maxend)
    }

    /// Linux's `tcp_in_window`: check the segment against both directions' bounds and update
    /// them. Returns false (and the caller discards `self`) when out of window.
    fn in_window(&mut self, dir: Direction, t: &Tcp, liberal: bool, reinit: bool) -> bool {
        let di = dir as usize;
        let (sender, receiver) = if di == 0 {
            let (a, b) = self.dir.split_at_mut(1);
            (&mut a[0], &mut b[0])
        } else {
            let (a, b) = self.dir.split_at_mut(1);
            (&mut b[0], &mut a[0])
        };
        let seq = t.seq;
        let end = seg_end(t);
        let mut win = u32::from(t.window);
        let mut ack = t.ack;

        if sender.flags & DIR_RELEARN != 0 {
            // Mid-stream (re)learning: take this segment's view as the truth.
            sender.flags &= !DIR_RELEARN;
            let swin = (win << sender.scale).max(1);
            sender.end = end;
            sender.maxwin = sender.maxwin.max(swin);
            sender.maxend = end.wrapping_add(sender.maxwin);
            if t.flags.ack() {
                if receiver.maxwin == 0 || receiver.flags & DIR_RELEARN != 0 {
                    receiver.end = ack;
                    receiver.maxend = ack;
                } else if after(ack, receiver.end) {
                    receiver.end = ack;
                }
                let m = ack.wrapping_add(swin);
                if after(m, receiver.maxend) {
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
                if let Some(s) = t.options.window_scale {
                    sender.flags |= DIR_WSCALE;
                    sender.scale = s.min(MAX_WSCALE);
                }
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
                sender.maxend = end.wrapping_add(swin);
                if receiver.maxwin == 0 {
                    receiver.end = ack;
                    receiver.maxend = ack;
                }
            }
        } else if reinit && t.flags.syn() && after(end, sender.end) {
            // A retransmitted SYN (or SYN/ACK) with a new initial sequence number: re-initialise.
            sender.end = end;
            sender.maxend = end;
            sender.maxwin = win.max(1);
        }

        if !t.flags.ack() {
            ack = receiver.end;
        } else if t.flags.rst() && ack == 0 {
            ack = receiver.end; // broken stacks send RST/ACK with ack 0
        }

        // Linux's MAXACKWINDOW: an ACK may lag the receiver's end by the sender's largest
        // window, but by at least 66000 bytes (reordered ACKs on small-window connections).
        let maxackwin = sender.maxwin.max(MAX_ACK_WINDOW_FLOOR);
        let in_recv_win = receiver.maxwin == 0
            || after(
                end,
                sender.end.wrapping_sub(receiver.maxwin).wrapping_sub(1),
            );
        let ok = before(seq, sender.maxend.wrapping_add(1))
            && in_recv_win
            && before(ack, receiver.end.wrapping_add(1))
            && after(ack, receiver.end.wrapping_sub(maxackwin).wrapping_sub(1));
        if !ok && !liberal {
            return false;
        }
        if !t.flags.syn() {
            win <<= sender.scale;
        }
        // Update the sender's bounds.
        if sender.maxwin < win {
            sender.maxwin = win;
        }
        if after(end, sender.end) {
            sender.end = end;
            sender.flags |= DIR_UNACKED;
        }
        // Update the receiver's bounds.
        if receiver.maxwin != 0 && after(end, sender.maxend) {
            receiver.maxwin = receiver
                .maxwin
                .wrapping_add(end.wrapping_sub(sender.maxend));
        }
        if after(ack.wrapping_add(win), receiver.maxend.wrapping_sub(1)) {
            receiver.maxend = ack.wrapping_add(win);
            if win == 0 {
                receiver.maxend = receiver.maxend.wrapping_add(1);
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
            d.flags &= DIR_WSCALE | DIR_UNACKED | DIR_RELEARN | DIR_LIBERAL;
        }
        Some(self)
    }

    /// Mark both directions for re-learning (entries learned from a peer, whose bounds are stale).
    pub fn set_relearn(&mut self) {
        self.dir[0].flags |= DIR_RELEARN;
        self.dir[1].flags |= DIR_RELEARN;
    }
}
