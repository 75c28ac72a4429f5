//! Unit tests of the tracker: packets are built as bytes and parsed, so the tests also pin the
//! parser's contract with the tracker.

use std::net::IpAddr;
use std::time::Duration;

use proptest::prelude::*;

use super::event::{status, DestroyReason, ExpectEnd};
use super::tcp::TcpState;
use super::*;
use crate::packet::build::{self, TcpSpec};
use crate::packet::{proto, TcpFlags};

const S: u8 = TcpFlags::SYN;
const A: u8 = TcpFlags::ACK;
const F: u8 = TcpFlags::FIN;
const R: u8 = TcpFlags::RST;
const P: u8 = TcpFlags::PSH;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn t(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms)
}

fn cfg() -> Config {
    Config {
        shards: 1,
        max_entries: 1024,
        ..Config::default()
    }
}

/// A TCP conversation between a client and a server with real sequence numbers.
struct Flow {
    c: IpAddr,
    s: IpAddr,
    cp: u16,
    sp: u16,
    cseq: u32,
    sseq: u32,
    wscale: Option<u8>,
    window: u16,
}

impl Flow {
    fn v4() -> Self {
        Flow {
            c: ip("198.51.100.10"),
            s: ip("203.0.113.10"),
            cp: 40000,
            sp: 80,
            cseq: 1000,
            sseq: 5000,
            wscale: None,
            window: 64000,
        }
    }
    fn v6() -> Self {
        Flow {
            c: ip("2001:db8:1::10"),
            s: ip("2001:db8:2::10"),
            ..Flow::v4()
        }
    }
    /// A segment from the client (`from_client`) or server; advances that side's sequence.
    fn seg(&mut self, from_client: bool, flags: u8, len: usize) -> Vec<u8> {
        let (src, dst, sp, dp) = if from_client {
            (self.c, self.s, self.cp, self.sp)
        } else {
            (self.s, self.c, self.sp, self.cp)
        };
        let mut spec = TcpSpec::new(sp, dp, flags);
        let (seq, ack) = if from_client {
            (self.cseq, self.sseq)
        } else {
            (self.sseq, self.cseq)
        };
        spec.seq = seq;
        spec.ack = if flags & A != 0 { ack } else { 0 };
        spec.window = self.window;
        spec.wscale = self.wscale;
        spec.payload = vec![b'x'; len];
        let adv = len as u32 + u32::from(flags & S != 0) + u32::from(flags & F != 0);
        if from_client {
            self.cseq = self.cseq.wrapping_add(adv);
        } else {
            self.sseq = self.sseq.wrapping_add(adv);
        }
        build::tcp(src, dst, &spec)
    }
}

fn track(ct: &Conntrack, now: u64, bytes: &[u8]) -> Outcome {
    let p = Packet::parse(bytes).unwrap();
    ct.track(t(now), &p)
}

fn tcp_state(ct: &Conntrack, o: &Outcome) -> TcpState {
    let shard = ct.lock(0);
    match shard.conn(o.conn.unwrap()).unwrap().proto {
        ProtoState::Tcp(c) => c.state(),
        other => panic!("not tcp: {other:?}"),
    }
}

fn handshake(ct: &Conntrack, f: &mut Flow) -> Outcome {
    let o = track(ct, 0, &f.seg(true, S, 0));
    assert_eq!((o.state, o.created), (CtState::New, true));
    assert_eq!(tcp_state(ct, &o), TcpState::SynSent);
    let o = track(ct, 1, &f.seg(false, S | A, 0));
    assert_eq!((o.state, o.dir), (CtState::Established, Direction::Reply));
    assert_eq!(tcp_state(ct, &o), TcpState::SynRecv);
    let o = track(ct, 2, &f.seg(true, A, 0));
    assert_eq!(o.state, CtState::Established);
    assert_eq!(tcp_state(ct, &o), TcpState::Established);
    o
}

fn invalid(o: &Outcome, r: InvalidReason) {
    assert_eq!(o.state, CtState::Invalid, "{o:?}");
    assert_eq!(o.invalid, Some(r), "{o:?}");
}

#[test]
fn three_way_handshake_data_and_close() {
    for mut f in [Flow::v4(), Flow::v6()] {
        let ct = Conntrack::new(&cfg());
        let o = handshake(&ct, &mut f);
        let id = o.conn.unwrap();
        assert!(ct.lock(0).conn(id).unwrap().status & status::ASSURED != 0);
        assert_eq!(
            track(&ct, 3, &f.seg(true, A | P, 100)).state,
            CtState::Established
        );
        assert_eq!(
            track(&ct, 4, &f.seg(false, A | P, 1000)).state,
            CtState::Established
        );
        assert_eq!(track(&ct, 5, &f.seg(true, A, 0)).conn, Some(id));
        let o = track(&ct, 6, &f.seg(true, F | A, 0));
        assert_eq!(tcp_state(&ct, &o), TcpState::FinWait);
        let o = track(&ct, 7, &f.seg(false, A, 0));
        assert_eq!(tcp_state(&ct, &o), TcpState::CloseWait);
        let o = track(&ct, 8, &f.seg(false, F | A, 0));
        assert_eq!(tcp_state(&ct, &o), TcpState::LastAck);
        let o = track(&ct, 9, &f.seg(true, A, 0));
        assert_eq!(tcp_state(&ct, &o), TcpState::TimeWait);
        // TIME_WAIT lasts 120 s by default.
        let exp = ct.lock(0).conn(id).unwrap().expires;
        assert_eq!(exp, t(9 + 120_000));
        ct.lock(0).check_invariants().unwrap();
    }
}

#[test]
fn simultaneous_open() {
    let ct = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    let o = track(&ct, 0, &f.seg(true, S, 0));
    // The server's SYN crosses ours.
    let o2 = track(&ct, 1, &f.seg(false, S, 0));
    assert_eq!(o2.conn, o.conn);
    assert_eq!(tcp_state(&ct, &o2), TcpState::SynSent2);
    // The server acknowledges our SYN with a SYN/ACK repeating its own SYN -> SYN_RECV.
    f.sseq -= 1;
    let o3 = track(&ct, 2, &f.seg(false, S | A, 0));
    assert_eq!(tcp_state(&ct, &o3), TcpState::SynRecv);
    let o4 = track(&ct, 3, &f.seg(true, A, 0));
    assert_eq!(tcp_state(&ct, &o4), TcpState::Established);
}

#[test]
fn retransmitted_syn_is_tolerated_and_still_new() {
    let ct = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    let o = track(&ct, 0, &f.seg(true, S, 0));
    f.cseq -= 1;
    let o2 = track(&ct, 1000, &f.seg(true, S, 0));
    assert_eq!(o2.conn, o.conn);
    assert_eq!((o2.state, o2.created), (CtState::New, false));
    assert_eq!(ct.len(), 1);
}

#[test]
fn rst_in_and_out_of_window() {
    let ct = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    let o = handshake(&ct, &mut f);
    // Out of window: a sequence number far from anything seen.
    let mut bad = TcpSpec::new(f.sp, f.cp, R);
    bad.seq = f.sseq.wrapping_add(10_000_000);
    let ob = track(&ct, 3, &build::tcp(f.s, f.c, &bad));
    invalid(&ob, InvalidReason::TcpRstOutOfWindow);
    assert_eq!(tcp_state(&ct, &o), TcpState::Established);
    // In window: accepted, connection goes to CLOSE.
    let ok = track(&ct, 4, &f.seg(false, R | A, 0));
    assert_eq!(ok.state, CtState::Established);
    assert_eq!(tcp_state(&ct, &o), TcpState::Close);
    let exp = ct.lock(0).conn(o.conn.unwrap()).unwrap().expires;
    assert_eq!(exp, t(4 + 10_000));
}

#[test]
fn rst_answering_syn_must_ack_it() {
    let ct = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    let o = track(&ct, 0, &f.seg(true, S, 0));
    let mut wrong = TcpSpec::new(f.sp, f.cp, R | A);
    wrong.ack = f.cseq.wrapping_add(5);
    invalid(
        &track(&ct, 1, &build::tcp(f.s, f.c, &wrong)),
        InvalidReason::TcpRstOutOfWindow,
    );
    let mut right = TcpSpec::new(f.sp, f.cp, R | A);
    right.ack = f.cseq;
    assert_eq!(
        track(&ct, 2, &build::tcp(f.s, f.c, &right)).state,
        CtState::Established
    );
    assert_eq!(tcp_state(&ct, &o), TcpState::Close);
}

#[test]
fn out_of_window_data_is_invalid() {
    let ct = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    handshake(&ct, &mut f);
    let mut spec = TcpSpec::new(f.cp, f.sp, A | P);
    spec.seq = f.cseq.wrapping_add(1_000_000); // far beyond the server's window
    spec.ack = f.sseq;
    spec.payload = vec![0; 10];
    invalid(
        &track(&ct, 3, &build::tcp(f.c, f.s, &spec)),
        InvalidReason::TcpOutOfWindow,
    );
    // An ACK for data never sent.
    let mut spec = TcpSpec::new(f.cp, f.sp, A);
    spec.seq = f.cseq;
    spec.ack = f.sseq.wrapping_add(1_000_000);
    invalid(
        &track(&ct, 4, &build::tcp(f.c, f.s, &spec)),
        InvalidReason::TcpOutOfWindow,
    );
    // A retransmission of old data is fine.
    let mut spec = TcpSpec::new(f.cp, f.sp, A | P);
    spec.seq = f.cseq.wrapping_sub(1);
    spec.ack = f.sseq;
    spec.payload = vec![0; 1];
    assert_eq!(
        track(&ct, 5, &build::tcp(f.c, f.s, &spec)).state,
        CtState::Established
    );
    // Liberal mode lets the out-of-window segment through.
    let ct = Conntrack::new(&Config {
        tcp_liberal: true,
        ..cfg()
    });
    let mut f = Flow::v4();
    handshake(&ct, &mut f);
    let mut spec = TcpSpec::new(f.cp, f.sp, A | P);
    spec.seq = f.cseq.wrapping_add(1_000_000);
    spec.ack = f.sseq;
    assert_eq!(
        track(&ct, 3, &build::tcp(f.c, f.s, &spec)).state,
        CtState::Established
    );
}

#[test]
fn window_scaling_extends_the_window() {
    let ct = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    f.wscale = Some(7);
    handshake(&ct, &mut f);
    // The server's first scaled window: 64000 << 7 bytes. Then 1 MB ahead is inside it.
    track(&ct, 3, &f.seg(false, A, 0));
    let mut spec = TcpSpec::new(f.cp, f.sp, A | P);
    spec.seq = f.cseq.wrapping_add(1_000_000);
    spec.ack = f.sseq;
    spec.window = 64000;
    assert_eq!(
        track(&ct, 3, &build::tcp(f.c, f.s, &spec)).state,
        CtState::Established
    );
}

#[test]
fn bad_flags_and_no_connection() {
    let ct = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    invalid(
        &track(&ct, 0, &f.seg(true, S | F, 0)),
        InvalidReason::TcpBadFlags,
    );
    invalid(
        &track(&ct, 0, &f.seg(true, 0, 0)),
        InvalidReason::TcpBadFlags,
    );
    invalid(
        &track(&ct, 0, &f.seg(true, F | S | R | P | TcpFlags::URG, 0)),
        InvalidReason::TcpBadFlags,
    );
    invalid(
        &track(&ct, 0, &f.seg(true, A, 0)),
        InvalidReason::TcpNoConnection,
    );
    invalid(
        &track(&ct, 0, &f.seg(false, S | A, 0)),
        InvalidReason::TcpNoConnection,
    );
    assert_eq!(ct.len(), 0);
    let c = ct.counters();
    assert_eq!(c.invalid[InvalidReason::TcpBadFlags as usize], 3);
    assert_eq!(c.invalid[InvalidReason::TcpNoConnection as usize], 2);
}

#[test]
fn syn_ack_in_wrong_direction_is_invalid() {
    let ct = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    track(&ct, 0, &f.seg(true, S, 0));
    // The initiator cannot answer its own SYN.
    invalid(
        &track(&ct, 1, &f.seg(true, S | A, 0)),
        InvalidReason::TcpBadTransition,
    );
}

#[test]
fn reopen_from_time_wait() {
    let ct = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    let o = handshake(&ct, &mut f);
    track(&ct, 3, &f.seg(true, F | A, 0));
    track(&ct, 4, &f.seg(false, F | A, 0));
    let tw = track(&ct, 5, &f.seg(true, A, 0));
    assert_eq!(tcp_state(&ct, &tw), TcpState::TimeWait);
    f.cseq = f.cseq.wrapping_add(100_000);
    let n = track(&ct, 6, &f.seg(true, S, 0));
    assert!(n.created);
    assert_ne!(n.conn, o.conn);
    assert_eq!(tcp_state(&ct, &n), TcpState::SynSent);
    assert_eq!(ct.len(), 1);
}

#[test]
fn pickup_learns_windows_mid_stream() {
    let mut f = Flow::v4();
    let ct = Conntrack::new(&cfg());
    invalid(
        &track(&ct, 0, &f.seg(true, A | P, 10)),
        InvalidReason::TcpNoConnection,
    );
    let ct = Conntrack::new(&Config {
        tcp_pickup: true,
        ..cfg()
    });
    let o = track(&ct, 0, &f.seg(true, A | P, 10));
    assert_eq!((o.state, o.created), (CtState::New, true));
    assert_eq!(tcp_state(&ct, &o), TcpState::Established);
    assert_eq!(
        track(&ct, 1, &f.seg(false, A | P, 10)).state,
        CtState::Established
    );
    // Picked up, the window scale is unknown: like Linux (tcp_new sets BE_LIBERAL on both
    // directions), windows are not enforced for this connection; the state machine still is.
    let mut spec = TcpSpec::new(f.cp, f.sp, A | P);
    spec.seq = f.cseq.wrapping_add(50_000_000);
    spec.ack = f.sseq;
    assert_eq!(
        track(&ct, 2, &build::tcp(f.c, f.s, &spec)).state,
        CtState::Established
    );
    invalid(
        &track(&ct, 3, &f.seg(true, S | A, 0)),
        InvalidReason::TcpBadTransition,
    );
}

/// A learned entry (or one after `handover`) re-learns the sender's bounds from its first
/// segment; until the receiver's next ACK, the sender may go as far as the receiver's window
/// (known from the copy), not just its own: a bulk sender with a small window of its own sends
/// trains longer than that (found in the HA lab at 0.02 s adverts: a 64 KB GSO train dropped as
/// out of window before keepalived's notify reached fwnode, while no grace applied).
#[test]
fn a_relearning_sender_may_fill_its_receivers_known_window() {
    let a = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    f.window = 1000;
    handshake(&a, &mut f);
    // The receiver (the server) announced a large window while the copy was made.
    f.window = 64000;
    track(&a, 3, &f.seg(false, A, 0));
    f.cseq = f.cseq.wrapping_add(10_000_000);
    f.sseq = f.sseq.wrapping_add(10_000_000);
    assert_eq!(a.handover(t(5)), 1);
    // After the grace: nothing is liberal any more; the sender (client, window 1000) goes
    // first with 20 segments, 29 KB, before the server's next ACK.
    let after = 5 + HANDOVER_LIBERAL.as_millis() as u64 + 10;
    f.window = 1000;
    for i in 0..20 {
        let o = track(&a, after + i, &f.seg(true, A, 1448));
        assert_eq!(o.state, CtState::Established, "segment {i}");
    }
}

/// Found by the takeover nudge's end-to-end test (a download died 2 s after the takeover):
/// after `handover` the receiver's ACK came first and set the sender's `maxend` from its large
/// window; then the sender's first segment re-learned its bounds and lowered `maxend` to its
/// own small window. Its next segments ran past it and the grace let them pass without moving
/// a bound (as Linux's be_liberal), the receiver's ACKs then acknowledged beyond the sender's
/// `end` and passed the same way, and when the grace ended every segment either way was out of
/// window for good.
#[test]
fn a_relearning_sender_keeps_the_window_its_receiver_just_announced() {
    let a = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    f.window = 1000;
    let o = handshake(&a, &mut f);
    track(&a, 3, &f.seg(true, A | P, 500));
    f.cseq = f.cseq.wrapping_add(10_000_000);
    f.sseq = f.sseq.wrapping_add(10_000_000);
    assert_eq!(a.handover(t(5)), 1);
    // A bulk sender (the client) with a small receive window of its own, a receiver with a
    // large one, whose ACK comes first (a probe's answer, or a delayed ACK).
    f.window = 64000;
    assert_eq!(
        track(&a, 5, &f.seg(false, A, 0)).state,
        CtState::Established
    );
    for i in 0..20 {
        f.window = 1000;
        assert_eq!(
            track(&a, 6 + i, &f.seg(true, A, 1448)).state,
            CtState::Established
        );
    }
    f.window = 64000;
    assert_eq!(
        track(&a, 30, &f.seg(false, A, 0)).state,
        CtState::Established
    );
    // After the grace, the stream goes on either way.
    let after = 5 + HANDOVER_LIBERAL.as_millis() as u64 + 10;
    for i in 0..3 {
        f.window = 1000;
        let o1 = track(&a, after + i, &f.seg(true, A, 1448));
        assert_eq!(
            (o1.state, o1.conn),
            (CtState::Established, o.conn),
            "data {i}"
        );
        f.window = 64000;
        let o2 = track(&a, after + i, &f.seg(false, A, 0));
        assert_eq!(o2.state, CtState::Established, "ack {i}");
    }
}

/// A connection this node forwarded, then its peer (a switchover), then this node again (the
/// failback): its own bounds are stale by the time it forwards again. Without the re-learn
/// the stream is out of window; after `handover` it carries on, a RST still needs a
/// segment each way first, and segments out of order pass during the grace period only.
#[test]
fn a_node_taking_over_again_relearns_its_own_stale_bounds() {
    let a = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    let o = handshake(&a, &mut f);
    track(&a, 3, &f.seg(true, A | P, 500));
    // The peer forwarded 10 MB each way meanwhile.
    f.cseq = f.cseq.wrapping_add(10_000_000);
    f.sseq = f.sseq.wrapping_add(10_000_000);
    invalid(
        &track(&a, 4, &f.seg(true, A | P, 100)),
        InvalidReason::TcpOutOfWindow,
    );
    assert_eq!(a.handover(t(5)), 1);
    let mut rst = TcpSpec::new(f.sp, f.cp, R | A);
    rst.seq = f.sseq.wrapping_add(77);
    invalid(
        &track(&a, 5, &build::tcp(f.s, f.c, &rst)),
        InvalidReason::TcpRstOutOfWindow,
    );
    let o1 = track(&a, 5, &f.seg(true, A | P, 100));
    assert_eq!((o1.state, o1.conn), (CtState::Established, o.conn));
    let o2 = track(&a, 6, &f.seg(false, A | P, 100));
    assert_eq!(o2.state, CtState::Established);
    // A segment from far behind (it crossed the other gateway) passes in the grace period...
    let behind = |f: &Flow| {
        let mut spec = TcpSpec::new(f.cp, f.sp, A | P);
        spec.seq = f.cseq.wrapping_sub(5_000_000);
        spec.ack = f.sseq;
        spec.payload = vec![b'x'; 10];
        build::tcp(f.c, f.s, &spec)
    };
    let liberal_ms = HANDOVER_LIBERAL.as_millis() as u64;
    assert_eq!(
        track(&a, 5 + liberal_ms - 1, &behind(&f)).state,
        CtState::Established
    );
    // ...and not after it.
    invalid(
        &track(&a, 5 + liberal_ms, &behind(&f)),
        InvalidReason::TcpOutOfWindow,
    );
}

#[test]
fn snapshot_round_trip_and_from_peer_relearns_windows() {
    let a = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    let o = handshake(&a, &mut f);
    track(&a, 3, &f.seg(true, A | P, 500));
    let snap = a.lock(0).snapshot(o.conn.unwrap(), t(3)).unwrap();

    let b = Conntrack::new(&cfg());
    let id = b.lock(0).import_conn(t(10), &snap).unwrap();
    let info = b.lock(0).conn(id).unwrap();
    assert!(info.status & status::FROM_PEER != 0);
    assert_eq!(info.tuple, snap.tuple);
    // The peer's copy lags: the stream moved on 10 MB meanwhile. Without re-learning this
    // would be out of window; a FROM_PEER entry learns it and carries on.
    f.cseq = f.cseq.wrapping_add(10_000_000);
    f.sseq = f.sseq.wrapping_add(10_000_000);
    let o1 = track(&b, 11, &f.seg(true, A | P, 100));
    assert_eq!((o1.state, o1.conn), (CtState::Established, Some(id)));
    let o2 = track(&b, 12, &f.seg(false, A | P, 100));
    assert_eq!(o2.state, CtState::Established);
    // Then it is judged like any other connection (data: a pure ACK is judged at the
    // sender's end whatever its sequence number, as in Linux).
    let mut spec = TcpSpec::new(f.cp, f.sp, A | P);
    spec.seq = f.cseq.wrapping_add(50_000_000);
    spec.ack = f.sseq;
    spec.payload = vec![b'x'; 10];
    invalid(
        &track(&b, 13, &build::tcp(f.c, f.s, &spec)),
        InvalidReason::TcpOutOfWindow,
    );

    // A snapshot whose protocol state contradicts its tuple is refused, state untouched.
    let mut bad = snap.clone();
    bad.proto = ProtoState::Udp;
    assert!(b.lock(0).import_conn(t(14), &bad).is_err());
    assert_eq!(b.len(), 1);
    b.lock(0).check_invariants().unwrap();
}

#[test]
fn udp_life_cycle() {
    let ct = Conntrack::new(&cfg());
    let (c, s) = (ip("198.51.100.10"), ip("203.0.113.10"));
    let q = build::udp(c, s, 5353, 53, b"q");
    let r = build::udp(s, c, 53, 5353, b"r");
    let o = track(&ct, 0, &q);
    assert_eq!((o.state, o.created), (CtState::New, true));
    let id = o.conn.unwrap();
    assert_eq!(ct.lock(0).conn(id).unwrap().expires, t(30_000));
    assert_eq!(track(&ct, 1, &q).state, CtState::New);
    let o = track(&ct, 2, &r);
    assert_eq!((o.state, o.dir), (CtState::Established, Direction::Reply));
    assert_eq!(ct.lock(0).conn(id).unwrap().expires, t(2 + 120_000));
    assert_eq!(track(&ct, 3, &q).state, CtState::Established);
    assert!(ct.lock(0).conn(id).unwrap().status & status::ASSURED != 0);
    // Expiry: after the timeout a new packet starts a new connection.
    let o = track(&ct, 3 + 120_001, &q);
    assert!(o.created);
    assert_ne!(o.conn, Some(id));
}

#[test]
fn icmp_echo_v4_and_v6() {
    for (c, s) in [
        ("198.51.100.10", "203.0.113.10"),
        ("2001:db8:1::10", "2001:db8:2::10"),
    ] {
        let ct = Conntrack::new(&cfg());
        let (c, s) = (ip(c), ip(s));
        invalid(
            &track(&ct, 0, &build::echo(s, c, true, 9, 1)),
            InvalidReason::IcmpEchoMismatch,
        );
        let o = track(&ct, 0, &build::echo(c, s, false, 9, 1));
        assert_eq!(o.state, CtState::New);
        let r = track(&ct, 1, &build::echo(s, c, true, 9, 1));
        assert_eq!((r.state, r.conn), (CtState::Established, o.conn));
        // A request coming back from the server with the same id is not a reply.
        invalid(
            &track(&ct, 2, &build::echo(s, c, false, 9, 2)),
            InvalidReason::IcmpEchoMismatch,
        );
        // Another identifier is another connection.
        assert!(track(&ct, 3, &build::echo(c, s, false, 10, 1)).created);
        assert_eq!(ct.len(), 2);
    }
}

#[test]
fn icmp_errors_v4_and_v6_are_related_only_when_matching() {
    for (c, s, r, unreach) in [
        ("198.51.100.10", "203.0.113.10", "203.0.113.1", 3u8),
        ("2001:db8:1::10", "2001:db8:2::10", "2001:db8:2::1", 1u8),
    ] {
        let ct = Conntrack::new(&Config { shards: 8, ..cfg() });
        let (c, s, r) = (ip(c), ip(s), ip(r));
        let q = build::udp(c, s, 5353, 53, b"q");
        let o = track(&ct, 0, &q);
        // Port unreachable from the server, and from a router on the way: both RELATED.
        for from in [s, r] {
            let err = build::icmp_error(from, c, unreach, 3, &q);
            let p = Packet::parse(&err).unwrap();
            let e = ct.track(t(1), &p);
            assert_eq!(
                (e.state, e.conn, e.dir),
                (CtState::Related, o.conn, Direction::Reply)
            );
        }
        // An error about a connection that does not exist.
        let other = build::udp(c, s, 5354, 53, b"q");
        let err = build::icmp_error(s, c, unreach, 3, &other);
        invalid(&track(&ct, 2, &err), InvalidReason::IcmpErrorUnmatched);
        // An error sent toward the wrong host.
        let err = build::icmp_error(c, s, unreach, 3, &q);
        invalid(&track(&ct, 3, &err), InvalidReason::IcmpErrorUnmatched);
        // Errors never create entries.
        assert_eq!(ct.len(), 1);
    }
}

fn ftp_master(ct: &Conntrack) -> (Flow, ConnId) {
    let mut f = Flow {
        sp: 21,
        ..Flow::v4()
    };
    let o = handshake(ct, &mut f);
    assert_eq!(o.helper, Some(helper_state::HelperKind::Ftp));
    (f, o.conn.unwrap())
}

fn data_expect(master: ConnId, f: &Flow, port: u16) -> Expectation {
    Expectation {
        master,
        proto: proto::TCP,
        src: f.s,
        src_port: None,
        dst: f.c,
        dst_port: port,
        timeout: Duration::from_secs(300),
        helper: None,
    }
}

#[test]
fn expectation_match_creates_related_connection() {
    let ct = Conntrack::new(&cfg());
    let (f, m) = ftp_master(&ct);
    assert_eq!(
        ct.lock(0).expect(t(10), data_expect(m, &f, 50000)),
        Ok(ExpectOutcome::Created)
    );
    assert_eq!(ct.lock(0).expectations(t(10)).count(), 1);
    // Active FTP: the server connects from port 20 to the announced client port.
    let mut d = Flow {
        c: f.s,
        s: f.c,
        cp: 20,
        sp: 50000,
        ..Flow::v4()
    };
    let o = track(&ct, 11, &d.seg(true, S, 0));
    assert_eq!((o.state, o.created), (CtState::Related, true));
    assert_eq!(ct.lock(0).conn(o.conn.unwrap()).unwrap().master, Some(m));
    assert_eq!(ct.lock(0).expectation_count(), 0, "consumed");
    let r = track(&ct, 12, &d.seg(false, S | A, 0));
    assert_eq!(r.state, CtState::Established);
    assert_eq!(
        track(&ct, 13, &d.seg(true, A, 0)).state,
        CtState::Established
    );
    // A second connection to the same port is not related any more.
    let mut d2 = Flow {
        c: f.s,
        s: f.c,
        cp: 21000,
        sp: 50000,
        ..Flow::v4()
    };
    assert_eq!(track(&ct, 14, &d2.seg(true, S, 0)).state, CtState::New);
}

#[test]
fn expectation_refresh_eviction_expiry_and_master_death() {
    let ct = Conntrack::new(&Config {
        max_expect_per_master: 2,
        ..cfg()
    });
    let (f, m) = ftp_master(&ct);
    let mut sh = ct.lock(0);
    assert_eq!(
        sh.expect(t(10), data_expect(m, &f, 50000)),
        Ok(ExpectOutcome::Created)
    );
    // A retransmitted announcement refreshes, it does not duplicate.
    assert_eq!(
        sh.expect(t(20), data_expect(m, &f, 50000)),
        Ok(ExpectOutcome::Refreshed)
    );
    assert_eq!(sh.expectation_count(), 1);
    sh.expect(t(30), data_expect(m, &f, 50001)).unwrap();
    sh.expect(t(40), data_expect(m, &f, 50002)).unwrap();
    // Per-master limit 2: the oldest (50000) was evicted.
    let ports: Vec<u16> = sh.expectations(t(40)).map(|x| x.dst_port).collect();
    assert_eq!(ports.len(), 2);
    assert!(!ports.contains(&50000));
    assert_eq!(sh.counters.expect_evicted, 1);
    // Expiry.
    sh.handle_timeout(t(30 + 300_000), 10);
    assert_eq!(sh.expectation_count(), 1);
    // Master death takes the rest.
    while sh.poll_event().is_some() {}
    assert!(sh.remove(m));
    assert_eq!(sh.expectation_count(), 0);
    let evs: Vec<_> = std::iter::from_fn(|| sh.poll_event()).collect();
    assert!(evs.iter().any(|e| matches!(
        e,
        Event::ExpectDestroyed {
            reason: ExpectEnd::MasterGone,
            ..
        }
    )));
    // A dead master cannot expect.
    assert_eq!(
        sh.expect(t(50), data_expect(m, &f, 50003)),
        Err(ExpectError::NoMaster)
    );
}

#[test]
fn expectation_in_another_shard_is_refused() {
    let ct = Conntrack::new(&Config {
        shards: 64,
        ..cfg()
    });
    let mut f = Flow {
        sp: 21,
        ..Flow::v4()
    };
    let syn = f.seg(true, S, 0);
    let p = Packet::parse(&syn).unwrap();
    let mut sh = ct.lock_for(&p);
    let m = sh.track(t(0), &p).conn.unwrap();
    // Find an address whose pair with the client hashes elsewhere (a bounce target).
    let other = (1..=254u8)
        .map(|i| ip(&format!("203.0.113.{i}")))
        .find(|a| {
            let q = build::udp(*a, f.c, 1, 2, b"");
            ct.shard_of(&Packet::parse(&q).unwrap()) != ct.shard_of(&p)
        })
        .unwrap();
    let mut x = data_expect(m, &f, 50000);
    x.src = other;
    assert_eq!(sh.expect(t(1), x), Err(ExpectError::WrongShard));
}

#[test]
fn table_full_early_drops_unassured_then_refuses() {
    let ct = Conntrack::new(&Config {
        shards: 1,
        max_entries: 4,
        ..Config::default()
    });
    let c = ip("198.51.100.10");
    let s = ip("203.0.113.10");
    // Four unreplied UDP flows fill the table.
    for port in 0..4 {
        assert!(track(&ct, port, &build::udp(c, s, 1000 + port as u16, 53, b"")).created);
    }
    // A fifth evicts the unassured flow closest to expiry (the oldest).
    let o = track(&ct, 10, &build::udp(c, s, 2000, 53, b""));
    assert!(o.created);
    assert_eq!(ct.len(), 4);
    assert_eq!(ct.counters().early_drops, 1);
    // Make everything assured: then a new flow is refused.
    let ct = Conntrack::new(&Config {
        shards: 1,
        max_entries: 2,
        ..Config::default()
    });
    for port in 0..2u16 {
        track(&ct, 0, &build::udp(c, s, 1000 + port, 53, b""));
        track(&ct, 1, &build::udp(s, c, 53, 1000 + port, b""));
        track(&ct, 2, &build::udp(c, s, 1000 + port, 53, b""));
    }
    invalid(
        &track(&ct, 3, &build::udp(c, s, 3000, 53, b"")),
        InvalidReason::TableFull,
    );
    assert_eq!(ct.len(), 2);
    ct.lock(0).check_invariants().unwrap();
}

#[test]
fn timeouts_reap_incrementally() {
    let ct = Conntrack::new(&cfg());
    let c = ip("198.51.100.10");
    let s = ip("203.0.113.10");
    for port in 0..100u16 {
        track(&ct, 0, &build::udp(c, s, 1000 + port, 53, b""));
    }
    let mut sh = ct.lock(0);
    assert_eq!(sh.poll_timeout(), Some(t(30_000)));
    assert_eq!(sh.handle_timeout(t(29_999), 1000), 0);
    // A bounded budget reaps a bounded number.
    assert_eq!(sh.handle_timeout(t(30_000), 10), 10);
    assert_eq!(sh.len(), 90);
    assert_eq!(sh.handle_timeout(t(30_000), 1000), 90);
    assert!(sh.is_empty());
    sh.check_invariants().unwrap();
}

#[test]
fn events_describe_life_cycle_and_overflow_is_flagged() {
    let ct = Conntrack::new(&Config {
        event_queue: 3,
        ..cfg()
    });
    let mut f = Flow::v4();
    handshake(&ct, &mut f);
    let mut sh = ct.lock(0);
    let evs: Vec<_> = std::iter::from_fn(|| sh.poll_event()).collect();
    assert!(matches!(evs[0], Event::ConnCreated(_)));
    assert!(evs[1..].iter().all(|e| matches!(e, Event::ConnUpdated(_))));
    assert_eq!(evs.len(), 3); // created, SYN_RECV (+seen reply), ESTABLISHED
    assert!(!sh.take_resync_needed());
    drop(sh);
    for port in 0..5u16 {
        track(&ct, 10, &build::udp(f.c, f.s, port + 1, 53, b""));
    }
    let mut sh = ct.lock(0);
    assert_eq!(sh.counters.events_dropped, 2);
    assert!(sh.take_resync_needed());
}

#[test]
fn removed_new_connection_leaves_no_events() {
    let ct = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    let o = track(&ct, 0, &f.seg(true, S, 0));
    let mut sh = ct.lock(0);
    assert!(sh.remove(o.conn.unwrap()));
    assert!(sh.poll_event().is_none());
    assert!(sh.is_empty());
    assert!(!sh.remove(o.conn.unwrap()), "stale handle");
}

#[test]
fn fragments_and_untracked_icmp_are_invalid() {
    let ct = Conntrack::new(&cfg());
    let mut b = build::udp(ip("198.51.100.10"), ip("203.0.113.10"), 5, 6, &[0; 64]);
    b[6] = 0x20;
    invalid(&track(&ct, 0, &b), InvalidReason::Fragment);
    let ts = build::icmp(
        ip("198.51.100.10"),
        ip("203.0.113.10"),
        13,
        0,
        [0; 4],
        &[0; 12],
    );
    invalid(&track(&ct, 0, &ts), InvalidReason::IcmpUntracked);
}

// ---- property test ------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Tcp {
        from_client: bool,
        flow: u8,
        flags: u8,
        seq: u32,
        ack: u32,
        len: u8,
    },
    Udp {
        from_client: bool,
        flow: u8,
    },
    Echo {
        from_client: bool,
        flow: u8,
        reply: bool,
    },
    IcmpErr {
        flow: u8,
    },
    Expect {
        port: u16,
    },
    Tick {
        ms: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<bool>(), 0u8..4, any::<u8>(), 0u32..4000, 0u32..4000, 0u8..3)
            .prop_map(|(from_client, flow, flags, seq, ack, len)| Op::Tcp { from_client, flow, flags, seq, ack, len }),
        2 => (any::<bool>(), 0u8..4).prop_map(|(from_client, flow)| Op::Udp { from_client, flow }),
        1 => (any::<bool>(), 0u8..4, any::<bool>()).prop_map(|(from_client, flow, reply)| Op::Echo { from_client, flow, reply }),
        1 => (0u8..4).prop_map(|flow| Op::IcmpErr { flow }),
        1 => (50000u16..50004).prop_map(|port| Op::Expect { port }),
        1 => (0u32..200_000).prop_map(|ms| Op::Tick { ms }),
    ]
}

proptest! {
    #[test]
    fn random_sequences_keep_invariants(ops in proptest::collection::vec(op(), 1..120), v6 in any::<bool>()) {
        let ct = Conntrack::new(&Config { shards: 4, max_entries: 8, max_expect_per_master: 2, event_queue: 16, ..Config::default() });
        let (c, s) = if v6 { (ip("2001:db8:1::10"), ip("2001:db8:2::10")) } else { (ip("198.51.100.10"), ip("203.0.113.10")) };
        let mut now = 0u64;
        let mut last_tcp: Option<ConnId> = None;
        for op in ops {
            match op {
                Op::Tcp { from_client, flow, flags, seq, ack, len } => {
                    let (src, dst, sp, dp) = if from_client { (c, s, 1000 + u16::from(flow), 21) } else { (s, c, 21, 1000 + u16::from(flow)) };
                    let mut spec = TcpSpec::new(sp, dp, flags);
                    spec.seq = seq;
                    spec.ack = ack;
                    spec.payload = vec![0; usize::from(len)];
                    let b = build::tcp(src, dst, &spec);
                    let o = track(&ct, now, &b);
                    if o.conn.is_some() { last_tcp = o.conn; }
                    prop_assert_eq!(o.state == CtState::Invalid, o.invalid.is_some());
                }
                Op::Udp { from_client, flow } => {
                    let (src, dst, sp, dp) = if from_client { (c, s, 2000 + u16::from(flow), 53) } else { (s, c, 53, 2000 + u16::from(flow)) };
                    track(&ct, now, &build::udp(src, dst, sp, dp, b""));
                }
                Op::Echo { from_client, flow, reply } => {
                    let (src, dst) = if from_client { (c, s) } else { (s, c) };
                    track(&ct, now, &build::echo(src, dst, reply, u16::from(flow), 0));
                }
                Op::IcmpErr { flow } => {
                    let q = build::udp(c, s, 2000 + u16::from(flow), 53, b"");
                    track(&ct, now, &build::icmp_error(s, c, if v6 { 1 } else { 3 }, 3, &q));
                }
                Op::Expect { port } => {
                    if let Some(m) = last_tcp {
                        let probe = build::udp(c, s, 1, 2, b"");
                        let p = Packet::parse(&probe).unwrap();
                        let mut sh = ct.lock(ct.shard_of(&p));
                        let _ = sh.expect(t(now), Expectation { master: m, proto: proto::TCP, src: s, src_port: None, dst: c, dst_port: port, timeout: Duration::from_secs(5), helper: None });
                    }
                }
                Op::Tick { ms } => {
                    now += u64::from(ms);
                    ct.handle_timeout(t(now), 0, 1, 3);
                }
            }
            if let Err(e) = ct.check_invariants() {
                return Err(TestCaseError::fail(e));
            }
        }
    }
}

#[test]
fn destroy_reasons_are_reported() {
    let ct = Conntrack::new(&cfg());
    let q = build::udp(ip("198.51.100.10"), ip("203.0.113.10"), 1, 2, b"");
    track(&ct, 0, &q);
    let mut sh = ct.lock(0);
    while sh.poll_event().is_some() {}
    sh.handle_timeout(t(60_000), 10);
    assert!(matches!(
        sh.poll_event(),
        Some(Event::ConnDestroyed {
            reason: DestroyReason::Timeout,
            ..
        })
    ));
}

#[test]
fn bound_is_global_so_one_host_pair_can_use_the_whole_table() {
    // 64 shards, 100 entries: one client/server pair (one shard) may hold all 100.
    let ct = Conntrack::new(&Config {
        shards: 64,
        max_entries: 100,
        ..Config::default()
    });
    let (c, s) = (ip("198.51.100.10"), ip("203.0.113.10"));
    for port in 0..100u16 {
        assert!(
            track(&ct, 0, &build::udp(c, s, 1000 + port, 53, b"")).created,
            "entry {port}"
        );
    }
    assert_eq!(ct.len(), 100);
    // Full: the next one early-drops an unreplied flow instead of growing the table.
    assert!(track(&ct, 1, &build::udp(c, s, 3000, 53, b"")).created);
    assert_eq!(ct.len(), 100);
}

#[test]
fn closing_tcp_connections_are_early_drop_victims() {
    // Two reset (CLOSE, assured) connections fill the table; a new SYN replaces one of them.
    let ct = Conntrack::new(&Config {
        shards: 1,
        max_entries: 2,
        ..Config::default()
    });
    for cp in [40000u16, 40001] {
        let mut f = Flow { cp, ..Flow::v4() };
        handshake(&ct, &mut f);
        track(&ct, 3, &f.seg(true, R | A, 0));
    }
    let mut f = Flow {
        cp: 40002,
        ..Flow::v4()
    };
    let o = track(&ct, 4, &f.seg(true, S, 0));
    assert!(o.created, "{o:?}");
    assert_eq!(ct.counters().early_drops, 1);
}

#[test]
fn same_endpoints_are_invalid_not_a_corrupt_index() {
    // Found by the parse_track fuzz target: a packet whose reply tuple is itself.
    let ct = Conntrack::new(&cfg());
    let a = ip("198.51.100.10");
    invalid(
        &track(&ct, 0, &build::udp(a, a, 7, 7, b"")),
        InvalidReason::SameEndpoints,
    );
    invalid(
        &track(&ct, 0, &build::echo(a, a, false, 7, 1)),
        InvalidReason::SameEndpoints,
    );
    // Same address, different ports is a (local) connection like any other.
    assert!(track(&ct, 0, &build::udp(a, a, 7, 8, b"")).created);
    ct.lock(0).check_invariants().unwrap();
}

// ---- fairness of the global bounds (issue 9 items 4 and 10a) --------------------------------

/// A SYN from `c:cp` to `s:80`.
fn syn(c: IpAddr, s: IpAddr, cp: u16) -> Vec<u8> {
    build::tcp(c, s, &TcpSpec::new(cp, 80, S))
}

fn shard_of_bytes(ct: &Conntrack, b: &[u8]) -> usize {
    ct.shard_of(&Packet::parse(b).unwrap())
}

/// A client in 198.51.100.0/24 whose pair with `s` hashes to a shard other than `not`.
fn client_elsewhere(ct: &Conntrack, s: IpAddr, not: &[usize]) -> IpAddr {
    (1..=254u8)
        .map(|i| ip(&format!("198.51.100.{i}")))
        .find(|c| !not.contains(&shard_of_bytes(ct, &syn(*c, s, 1))))
        .unwrap()
}

/// The original tuple of a packet.
fn tuple_of(b: &[u8]) -> Tuple {
    Tuple::of_packet(&Packet::parse(b).unwrap()).unwrap()
}

/// 64 shards, 100 entries; an attacker pair fills the table with unassured SYNs.
fn attacked() -> (Conntrack, IpAddr, IpAddr, usize) {
    let ct = Conntrack::new(&Config {
        shards: 64,
        max_entries: 100,
        ..Config::default()
    });
    let (a, v) = (ip("198.51.100.66"), ip("203.0.113.66"));
    let attacker = shard_of_bytes(&ct, &syn(a, v, 1));
    (ct, a, v, attacker)
}

#[test]
fn one_host_pair_cannot_deny_new_connections_to_everyone_else() {
    let (ct, a, v, attacker) = attacked();
    // The attacker fills the whole table with unanswered SYNs, oldest first.
    for port in 0..100u16 {
        let o = track(&ct, u64::from(port), &syn(a, v, 1000 + port));
        assert!(o.created, "attacker SYN {port}: {o:?}");
    }
    assert_eq!(ct.len(), 100);
    while ct.lock(attacker).poll_event().is_some() {}
    // A legitimate pair in another (empty) shard still gets its SYN tracked...
    let s = ip("203.0.113.10");
    let c = client_elsewhere(&ct, s, &[attacker]);
    let mut f = Flow { c, s, ..Flow::v4() };
    let o = track(&ct, 200, &f.seg(true, S, 0));
    assert_eq!((o.state, o.created), (CtState::New, true), "{o:?}");
    assert_eq!(ct.len(), 100);
    // ...because the attacker's oldest unassured entry was early-dropped, and counted there.
    let mut sh = ct.lock(attacker);
    assert_eq!(sh.counters.early_drops, 1);
    let evs: Vec<_> = std::iter::from_fn(|| sh.poll_event()).collect();
    assert_eq!(
        evs,
        vec![Event::ConnDestroyed {
            tuple: tuple_of(&syn(a, v, 1000)),
            reason: DestroyReason::EarlyDrop,
        }]
    );
    drop(sh);
    // The handshake completes.
    assert_eq!(
        track(&ct, 201, &f.seg(false, S | A, 0)).state,
        CtState::Established
    );
    assert_eq!(
        track(&ct, 202, &f.seg(true, A, 0)).state,
        CtState::Established
    );
    // The attacker's own next SYN is paid for by the attacker's shard.
    assert!(track(&ct, 203, &syn(a, v, 3000)).created);
    assert_eq!(ct.lock(attacker).counters.early_drops, 2);
    assert_eq!(ct.counters().early_drops, 2);
    ct.check_invariants().unwrap();
}

#[test]
fn a_shard_below_its_share_does_not_evict_its_own_connections_for_a_flood() {
    let (ct, a, v, attacker) = attacked();
    // A legitimate pair in another shard has one unanswered (droppable) SYN.
    let s = ip("203.0.113.10");
    let c = client_elsewhere(&ct, s, &[attacker]);
    let legit = shard_of_bytes(&ct, &syn(c, s, 1));
    assert!(track(&ct, 0, &syn(c, s, 5000)).created);
    for port in 0..99u16 {
        assert!(track(&ct, 1 + u64::from(port), &syn(a, v, 1000 + port)).created);
    }
    assert_eq!(ct.len(), 100);
    // Its next SYN is paid for by the attacker's shard (above its share), not by its own
    // pending SYN (its shard holds less than its share of the table).
    assert!(track(&ct, 200, &syn(c, s, 5001)).created);
    assert_eq!(
        ct.lock(legit).len(),
        2,
        "the legitimate pending SYN survives"
    );
    assert_eq!(ct.lock(legit).counters.early_drops, 0);
    assert_eq!(ct.lock(attacker).counters.early_drops, 1);
    ct.check_invariants().unwrap();
}

#[test]
fn shards_below_their_share_pay_for_others_only_as_a_last_resort() {
    let (ct, a, v, attacker) = attacked();
    let s = ip("203.0.113.10");
    let x = client_elsewhere(&ct, s, &[attacker]);
    let xs = shard_of_bytes(&ct, &syn(x, s, 1));
    let y = client_elsewhere(&ct, s, &[attacker, xs]);
    let ys = shard_of_bytes(&ct, &syn(y, s, 1));
    // Shard X: one pending SYN (below its share). The attacker: 99 unassured SYNs.
    assert!(track(&ct, 0, &syn(x, s, 5000)).created);
    for port in 0..99u16 {
        assert!(track(&ct, 1, &syn(a, v, 1000 + port)).created);
    }
    // Y's SYN: the attacker pays, X keeps its pending connection.
    assert!(track(&ct, 2, &syn(y, s, 6000)).created);
    assert_eq!(ct.lock(attacker).counters.early_drops, 1);
    let sh = ct.lock(xs);
    assert_eq!((sh.len(), sh.counters.early_drops), (1, 0));
    drop(sh);
    // Now the attacker's connections are all assured: X's unassured SYN is the only victim
    // left, and it goes rather than Y's next SYN being refused.
    let ct = attacked().0;
    assert!(track(&ct, 0, &syn(x, s, 5000)).created);
    for port in 0..99u16 {
        let mut f = Flow {
            c: a,
            s: v,
            cp: 1000 + port,
            ..Flow::v4()
        };
        track(&ct, 1, &f.seg(true, S, 0));
        track(&ct, 1, &f.seg(false, S | A, 0));
        assert_eq!(
            track(&ct, 1, &f.seg(true, A, 0)).state,
            CtState::Established
        );
    }
    assert_eq!(ct.len(), 100);
    let o = track(&ct, 2, &syn(y, s, 6000));
    assert!(o.created, "{o:?}");
    assert_eq!(ct.lock(xs).counters.early_drops, 1);
    assert!(ct.lock(xs).is_empty());
    assert_eq!(ct.lock(ys).len(), 1);
    ct.check_invariants().unwrap();
}

#[test]
fn global_early_drop_does_not_wait_forever_for_a_busy_shard() {
    let (ct, a, v, attacker) = attacked();
    for port in 0..100u16 {
        assert!(track(&ct, u64::from(port), &syn(a, v, 1000 + port)).created);
    }
    let c = client_elsewhere(&ct, v, &[attacker]);
    // Another worker holds the attacker's shard: the bounded wait gives up, the SYN is refused
    // (no deadlock, no blocking).
    let held = ct.lock(attacker);
    invalid(&track(&ct, 200, &syn(c, v, 1)), InvalidReason::TableFull);
    drop(held);
    assert!(track(&ct, 201, &syn(c, v, 1)).created);
    ct.check_invariants().unwrap();
}

#[test]
fn expectation_bound_is_global() {
    let ct = Conntrack::new(&Config {
        shards: 64,
        max_expectations: 2,
        ..cfg()
    });
    // Two FTP control connections whose pairs live in different shards.
    let s = ip("203.0.113.10");
    let mut masters = Vec::new();
    let mut used = Vec::new();
    for cp in [40000u16, 40001] {
        let c = client_elsewhere(&ct, s, &used);
        used.push(shard_of_bytes(&ct, &syn(c, s, 1)));
        let mut f = Flow {
            c,
            s,
            cp,
            sp: 21,
            ..Flow::v4()
        };
        let m = track(&ct, 0, &f.seg(true, S, 0)).conn.unwrap();
        track(&ct, 1, &f.seg(false, S | A, 0));
        track(&ct, 2, &f.seg(true, A, 0));
        masters.push((f, m));
    }
    assert_ne!(used[0], used[1]);
    let lock = |f: &Flow| ct.lock(shard_of_bytes(&ct, &syn(f.c, f.s, 1)));
    let (f0, m0) = &masters[0];
    let (f1, m1) = &masters[1];
    // The first master may use the whole global bound...
    for port in [50000, 50001] {
        assert_eq!(
            lock(f0).expect(t(10), data_expect(*m0, f0, port)),
            Ok(ExpectOutcome::Created)
        );
    }
    assert_eq!(ct.expectation_count(), 2);
    // ...and then no shard may add one.
    assert_eq!(
        lock(f1).expect(t(10), data_expect(*m1, f1, 50000)),
        Err(ExpectError::TableFull)
    );
    assert_eq!(lock(f1).counters.expect_refused, 1);
    // A refresh is not a new expectation.
    assert_eq!(
        lock(f0).expect(t(11), data_expect(*m0, f0, 50000)),
        Ok(ExpectOutcome::Refreshed)
    );
    // Consuming one gives its place back.
    let mut d = Flow {
        c: f0.s,
        s: f0.c,
        cp: 20,
        sp: 50000,
        ..Flow::v4()
    };
    assert_eq!(track(&ct, 12, &d.seg(true, S, 0)).state, CtState::Related);
    assert_eq!(ct.expectation_count(), 1);
    assert_eq!(
        lock(f1).expect(t(13), data_expect(*m1, f1, 50000)),
        Ok(ExpectOutcome::Created)
    );
    // Expiry and master death give places back too.
    ct.handle_timeout(t(11 + 300_000), 0, 1, 16);
    assert_eq!(ct.expectation_count(), 1);
    assert!(lock(f1).remove(*m1));
    assert_eq!(ct.expectation_count(), 0);
    ct.check_invariants().unwrap();
}

#[test]
fn full_table_does_not_consume_the_expectation() {
    let ct = Conntrack::new(&Config {
        max_entries: 2,
        ..cfg()
    });
    let (f, m) = ftp_master(&ct);
    // An assured UDP flow fills the table: nothing is droppable.
    let filler = track(&ct, 3, &build::udp(f.c, f.s, 7000, 53, b""));
    track(&ct, 4, &build::udp(f.s, f.c, 53, 7000, b""));
    track(&ct, 5, &build::udp(f.c, f.s, 7000, 53, b""));
    ct.lock(0).expect(t(10), data_expect(m, &f, 50000)).unwrap();
    let mut d = Flow {
        c: f.s,
        s: f.c,
        cp: 20,
        sp: 50000,
        ..Flow::v4()
    };
    let first = d.seg(true, S, 0);
    invalid(&track(&ct, 11, &first), InvalidReason::TableFull);
    assert_eq!(ct.lock(0).expectation_count(), 1, "not consumed");
    assert_eq!(ct.lock(0).counters.expect_matched, 0);
    // Once there is room, the retransmitted SYN is still RELATED.
    assert!(ct.lock(0).remove(filler.conn.unwrap()));
    let o = track(&ct, 12, &first);
    assert_eq!((o.state, o.created), (CtState::Related, true), "{o:?}");
    assert_eq!(ct.lock(0).conn(o.conn.unwrap()).unwrap().master, Some(m));
    assert_eq!(ct.expectation_count(), 0);
    ct.check_invariants().unwrap();
}

#[test]
fn expected_connection_whose_master_is_early_dropped_is_not_related() {
    // The master is the only droppable entry: making room for the data connection drops it,
    // and its expectation with it; the data connection is then an ordinary NEW one.
    let ct = Conntrack::new(&Config {
        max_entries: 2,
        ..cfg()
    });
    let mut f = Flow {
        sp: 21,
        ..Flow::v4()
    };
    let m = track(&ct, 0, &f.seg(true, S, 0)).conn.unwrap();
    track(&ct, 1, &build::udp(f.c, f.s, 7000, 53, b""));
    track(&ct, 2, &build::udp(f.s, f.c, 53, 7000, b""));
    track(&ct, 3, &build::udp(f.c, f.s, 7000, 53, b""));
    ct.lock(0).expect(t(10), data_expect(m, &f, 50000)).unwrap();
    let o = track(&ct, 11, &build::tcp(f.s, f.c, &TcpSpec::new(20, 50000, S)));
    assert_eq!((o.state, o.created), (CtState::New, true), "{o:?}");
    let sh = ct.lock(0);
    assert!(sh.conn(m).is_none(), "master early-dropped");
    assert_eq!(sh.conn(o.conn.unwrap()).unwrap().master, None);
    assert_eq!(sh.counters.expect_matched, 0);
    drop(sh);
    ct.check_invariants().unwrap();
}

// ---- counting and paged listing for the control API (issue 9 item 8) ----------------------

/// UDP flows `0..n` between several pairs (so over several shards), created at `now`.
fn udp_flows(ct: &Conntrack, now: u64, n: u16) -> Vec<Tuple> {
    (0..n)
        .map(|i| {
            let c = ip(&format!("198.51.100.{}", 1 + i % 50));
            let b = build::udp(c, ip("203.0.113.10"), 1000 + i, 53, b"");
            assert!(track(ct, now, &b).created);
            tuple_of(&b)
        })
        .collect()
}

#[test]
fn counts_by_state_and_filter_without_snapshots() {
    let ct = Conntrack::new(&Config { shards: 8, ..cfg() });
    let flows = udp_flows(&ct, 0, 20);
    let mut f = Flow::v4();
    let o = track(&ct, 1, &f.seg(true, S, 0));
    assert!(o.created);
    let mut g = Flow {
        cp: 40001,
        ..Flow::v4()
    };
    track(&ct, 1, &g.seg(true, S, 0));
    track(&ct, 1, &g.seg(false, S | A, 0));
    track(&ct, 1, &g.seg(true, A, 0));
    track(
        &ct,
        1,
        &build::echo(ip("198.51.100.1"), ip("203.0.113.1"), false, 9, 1),
    );
    let c = ct.state_counts(t(2));
    assert_eq!(c.udp, 20);
    assert_eq!(c.icmp, 1);
    assert_eq!(c.tcp[TcpState::SynSent as usize], 1);
    assert_eq!(c.tcp[TcpState::Established as usize], 1);
    assert_eq!(c.total(), 23);
    assert_eq!(ct.count_where(t(2), |i| i.tuple.src_port == 1005), 1);
    assert_eq!(
        ct.count_where(t(2), |i| i.tuple.proto == proto::UDP),
        flows.len() as u64
    );
    // Expired but not yet reaped entries are not counted (as in `snapshots`).
    let c = ct.state_counts(t(31_000));
    assert_eq!((c.udp, c.icmp), (0, 0));
    assert_eq!(c.tcp[TcpState::SynSent as usize], 1);
    assert_eq!(ct.count_where(t(31_000), |_| true), 2);
}

/// Every page of a listing, following the cursors.
fn all_pages(ct: &Conntrack, limit: usize, f: impl Fn(&ConnInfo) -> bool) -> Vec<ConnPage> {
    let mut pages = Vec::new();
    let mut cur = ListCursor::default();
    loop {
        let p = ct.snapshots_page(cur, limit, t(1), &f);
        assert!(p.conns.len() <= limit);
        let next = p.next;
        pages.push(p);
        match next {
            Some(n) => cur = ListCursor::from_token(n.to_token()),
            None => return pages,
        }
    }
}

#[test]
fn paged_listing_covers_every_connection_once() {
    let ct = Conntrack::new(&Config { shards: 8, ..cfg() });
    let mut flows = udp_flows(&ct, 0, 300);
    let pages = all_pages(&ct, 7, |_| true);
    let mut listed: Vec<Tuple> = pages
        .iter()
        .flat_map(|p| p.conns.iter().map(|c| c.tuple))
        .collect();
    assert!(pages.len() >= 300 / 7);
    let key = |t: &Tuple| (t.src, t.src_port);
    listed.sort_by_key(key);
    flows.sort_by_key(key);
    assert_eq!(listed, flows);
    // With a filter, the limit counts matching connections.
    let pages = all_pages(&ct, 5, |i| i.tuple.src_port % 10 == 0);
    let n: usize = pages.iter().map(|p| p.conns.len()).sum();
    assert_eq!(n, 30);
    // A stale or forged token just ends the listing.
    let p = ct.snapshots_page(ListCursor::from_token(u64::MAX), 10, t(1), |_| true);
    assert_eq!((p.conns.len(), p.next), (0, None));
}

#[test]
fn paged_listing_survives_changes_between_pages() {
    let ct = Conntrack::new(&Config { shards: 4, ..cfg() });
    let flows = udp_flows(&ct, 0, 100);
    let first = ct.snapshots_page(ListCursor::default(), 40, t(1), |_| true);
    let mut seen: Vec<Tuple> = first.conns.iter().map(|c| c.tuple).collect();
    // Between pages: one listed and one unlisted connection go, new ones come.
    let unlisted = *flows.iter().find(|t| !seen.contains(t)).unwrap();
    for gone in [seen[0], unlisted] {
        let b = build::udp(
            gone.src_ip(),
            gone.dst_ip(),
            gone.src_port,
            gone.dst_port,
            b"",
        );
        let p = Packet::parse(&b).unwrap();
        let mut sh = ct.lock_for(&p);
        let id = sh.track(t(1), &p).conn.unwrap();
        assert!(sh.remove(id));
    }
    for i in 0..30u16 {
        track(
            &ct,
            1,
            &build::udp(ip("198.51.100.200"), ip("203.0.113.10"), 5000 + i, 53, b""),
        );
    }
    let mut cur = first.next;
    while let Some(c) = cur {
        let p = ct.snapshots_page(c, 40, t(1), |_| true);
        seen.extend(p.conns.iter().map(|c| c.tuple));
        cur = p.next;
    }
    // Every connection that lived through the listing is listed exactly once.
    for f in flows
        .iter()
        .filter(|f| **f != unlisted && **f != first.conns[0].tuple)
    {
        assert_eq!(seen.iter().filter(|s| *s == f).count(), 1, "{f:?}");
    }
    assert!(!seen.contains(&unlisted));
}

#[test]
fn paged_listing_drops_the_lock_on_long_sparse_scans() {
    // One shard, 5000 connections, a filter that matches only the last one.
    let ct = Conntrack::new(&Config {
        max_entries: 8192,
        ..cfg()
    });
    let (c, s) = (ip("198.51.100.10"), ip("203.0.113.10"));
    for i in 0..5000u16 {
        assert!(track(&ct, 0, &build::udp(c, s, 1000 + i, 53, b"")).created);
    }
    let want = |i: &ConnInfo| i.tuple.src_port == 1000 + 4999;
    // Under one lock the shard examines at most `scan` slots and says where to resume...
    let mut out = Vec::new();
    let sh = ct.lock(0);
    assert_eq!(
        sh.snapshots_page(0, 10, 4096, t(1), &want, &mut out),
        Some(4096)
    );
    assert!(out.is_empty());
    assert_eq!(
        sh.snapshots_page(4096, 10, 4096, t(1), &want, &mut out),
        None
    );
    assert_eq!(out.len(), 1);
    drop(sh);
    // ...and the shell goes on, re-locking, until the page is full or the table ends.
    let p = ct.snapshots_page(ListCursor::default(), 10, t(1), want);
    assert_eq!(p.conns.len(), 1);
    assert_eq!(p.conns[0].tuple.src_port, 5999);
    assert_eq!(p.next, None);
}

// ---- events: nothing when replication is off, compact when on -----------------------------

/// Everything that makes events: a handshake, an expectation created, matched and expired, a
/// timeout, an early drop.
fn busy_life(ct: &Conntrack) {
    let (f, m) = ftp_master(ct);
    ct.lock(0).expect(t(10), data_expect(m, &f, 50000)).unwrap();
    ct.lock(0).expect(t(10), data_expect(m, &f, 50001)).unwrap();
    let mut d = Flow {
        c: f.s,
        s: f.c,
        cp: 20,
        sp: 50000,
        ..Flow::v4()
    };
    track(ct, 11, &d.seg(true, S, 0));
    track(ct, 12, &build::udp(f.c, f.s, 5000, 53, b""));
    ct.handle_timeout(t(10_000_000), 0, 1, 1000);
}

#[test]
fn no_event_is_built_when_replication_is_off() {
    let ct = Conntrack::new(&Config {
        event_queue: 0,
        ..cfg()
    });
    busy_life(&ct);
    let mut sh = ct.lock(0);
    assert!(sh.poll_event().is_none());
    // Nothing was built and thrown away: no overflow counted, no resync asked for.
    assert_eq!(sh.counters.events_dropped, 0);
    assert!(!sh.take_resync_needed());
    drop(sh);
    // The same life with replication on does make events (the test can fail).
    let on = Conntrack::new(&cfg());
    busy_life(&on);
    assert!(on.lock(0).poll_event().is_some());
}

#[test]
fn state_changes_are_compact_updates() {
    let ct = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    let o = handshake(&ct, &mut f);
    let mut sh = ct.lock(0);
    let evs: Vec<_> = std::iter::from_fn(|| sh.poll_event()).collect();
    let Event::ConnCreated(c) = &evs[0] else {
        panic!("{evs:?}")
    };
    assert!(matches!(c.proto, ProtoState::Tcp(x) if x.state() == TcpState::SynSent));
    let ups: Vec<ConnUpdate> = evs[1..]
        .iter()
        .map(|e| match e {
            Event::ConnUpdated(u) => *u,
            other => panic!("{other:?}"),
        })
        .collect();
    let states: Vec<_> = ups
        .iter()
        .map(|u| match u.proto {
            ProtoState::Tcp(x) => x.state(),
            _ => panic!(),
        })
        .collect();
    assert_eq!(states, [TcpState::SynRecv, TcpState::Established]);
    assert!(ups.iter().all(|u| u.tuple == c.tuple));
    assert_eq!(ups[1].status & status::ASSURED, status::ASSURED);
    let info = sh.conn(o.conn.unwrap()).unwrap();
    assert_eq!(ups[1].expires_in_ms, info.expires.as_millis() - 2);
}

/// An FTP control connection on `a` whose client sent `USER` then `PASS`; each segment the
/// helper consumed is followed by `helper_changed`, as the worker does.
fn ftp_two_lines(a: &Conntrack) -> (Flow, ConnId, Vec<ConnSnapshot>) {
    use crate::helper::ftp::{self, ControlConn, FtpCounters, Segment};
    let (mut f, m) = ftp_master(a);
    let mut sh = a.lock(0);
    while sh.poll_event().is_some() {}
    let ctl = ControlConn {
        client: f.c,
        server: f.s,
    };
    let mut whole = Vec::new();
    for (i, line) in [&b"USER anonymous\r\n"[..], b"PASS x@\r\n"]
        .iter()
        .enumerate()
    {
        let seg = Segment {
            dir: Direction::Original,
            seq: f.cseq,
            payload: line,
            payload_len: line.len() as u32,
        };
        f.cseq = f.cseq.wrapping_add(line.len() as u32);
        let hs = sh.helper_state_mut(m).unwrap();
        ftp::on_segment(hs, &ctl, seg, &mut FtpCounters::default(), &mut |_| {});
        sh.helper_changed(m, t(20 + i as u64));
        match sh.poll_event() {
            Some(Event::ConnHelper(s)) => whole.push(s),
            other => panic!("{other:?}"),
        }
    }
    (f, m, whole)
}

/// Feed `PORT` for the data port 50000 to the helper state of `b`'s copy of the control
/// connection; how many announcements the helper made.
fn port_after_failover(b: &Conntrack, f: &Flow, tuple: &Tuple) -> usize {
    use crate::helper::ftp::{self, ControlConn, FtpCounters, Segment};
    let mut sh = b.lock(0);
    let id = sh.find(tuple).unwrap();
    let ctl = ControlConn {
        client: f.c,
        server: f.s,
    };
    let line = b"PORT 198,51,100,10,195,80\r\n";
    let seg = Segment {
        dir: Direction::Original,
        seq: f.cseq,
        payload: line,
        payload_len: line.len() as u32,
    };
    let mut n = 0;
    let hs = sh.helper_state_mut(id).unwrap();
    ftp::on_segment(hs, &ctl, seg, &mut FtpCounters::default(), &mut |_| n += 1);
    n
}

#[test]
fn helper_state_reaches_the_peer_so_the_first_command_after_failover_parses() {
    let a = Conntrack::new(&cfg());
    let (f, _, whole) = ftp_two_lines(&a);
    let h = whole[1].helper.as_ref().unwrap();
    assert_eq!(h.dir[0].next_seq, Some(f.cseq));

    // The standby holds the latest whole snapshot: PORT parses.
    let b = Conntrack::new(&cfg());
    for s in &whole {
        b.import_conn(t(30), s).unwrap();
    }
    assert_eq!(port_after_failover(&b, &f, &whole[0].tuple), 1);

    // A standby holding only an older one sees PORT as beyond a gap and skips it.
    let stale = Conntrack::new(&cfg());
    stale.import_conn(t(30), &whole[0]).unwrap();
    assert_eq!(port_after_failover(&stale, &f, &whole[0].tuple), 0);
}

#[test]
fn helper_changed_is_silent_when_replication_is_off_or_the_connection_is_gone() {
    let ct = Conntrack::new(&Config {
        event_queue: 0,
        ..cfg()
    });
    let (_, m) = ftp_master(&ct);
    let mut sh = ct.lock(0);
    sh.helper_changed(m, t(5));
    assert!(sh.poll_event().is_none());
    let on = Conntrack::new(&cfg());
    let (_, m) = ftp_master(&on);
    let mut sh = on.lock(0);
    assert!(sh.remove(m));
    while sh.poll_event().is_some() {}
    sh.helper_changed(m, t(5));
    assert!(sh.poll_event().is_none());
}

// ---- state replication: applying a peer's items --------------------------------------------

/// Copy `a`'s whole table into `b` page by page, as a bulk transfer does; the page count.
fn transfer(a: &Conntrack, b: &Conntrack, now: u64, limit: usize) -> usize {
    let (mut cur, mut pages) = (0, 0);
    loop {
        let p = a.bulk_page(cur, limit, t(now), BulkScope::Own);
        for c in &p.conns {
            b.import_conn(t(now), c).unwrap();
        }
        for x in &p.expects {
            b.import_expect(t(now), x).unwrap();
        }
        pages += 1;
        match p.next {
            Some(n) => cur = n,
            None => return pages,
        }
    }
}

/// Everything a table holds, its own and learned entries and expectations (a bulk page lists
/// only its own), for before/after comparisons.
fn everything(ct: &Conntrack, now: u64) -> (Vec<ConnSnapshot>, Vec<ExpectSnapshot>) {
    let (mut conns, mut expects) = (vec![], vec![]);
    for i in 0..ct.shard_count() {
        let sh = ct.lock(i);
        conns.extend(sh.snapshots(t(now)));
        expects.extend(sh.expectations(t(now)));
    }
    (conns, expects)
}

fn drain_all(ct: &Conntrack) -> Vec<Event> {
    let mut v = Vec::new();
    for i in 0..ct.shard_count() {
        let mut sh = ct.lock(i);
        v.extend(std::iter::from_fn(|| sh.poll_event()));
    }
    v
}

fn state_of(ct: &Conntrack, tuple: &Tuple) -> TcpState {
    let sh = ct.lock(0);
    match sh.conn(sh.find(tuple).unwrap()).unwrap().proto {
        ProtoState::Tcp(c) => c.state(),
        other => panic!("{other:?}"),
    }
}

/// An active FTP session on `a` (one shard) whose data connection took a lower slot than its
/// master, plus a second announced data port still expected.
fn ftp_with_related(a: &Conntrack) -> (Tuple, Tuple) {
    let f0 = Flow::v4();
    let early = track(a, 0, &build::udp(f0.c, f0.s, 7, 53, b""));
    let (f, m) = ftp_master(a);
    assert!(a.lock(0).remove(early.conn.unwrap()));
    a.lock(0).expect(t(10), data_expect(m, &f, 50000)).unwrap();
    a.lock(0).expect(t(10), data_expect(m, &f, 50001)).unwrap();
    let mut d = Flow {
        c: f.s,
        s: f.c,
        cp: 20,
        sp: 50000,
        ..Flow::v4()
    };
    let o = track(a, 11, &d.seg(true, S, 0));
    assert_eq!(o.state, CtState::Related);
    assert!(
        o.conn.unwrap().slot < m.slot,
        "the data connection reused an earlier slot"
    );
    let sh = a.lock(0);
    (
        sh.conn(m).unwrap().tuple,
        sh.conn(o.conn.unwrap()).unwrap().tuple,
    )
}

#[test]
fn bulk_lists_masters_before_related_and_expectations_last() {
    let a = Conntrack::new(&cfg());
    let (master, data) = ftp_with_related(&a);
    let p = a.bulk_page(0, 100, t(12), BulkScope::Own);
    assert_eq!(p.next, None);
    let at = |x: &Tuple| p.conns.iter().position(|c| c.tuple == *x).unwrap();
    assert!(at(&master) < at(&data));
    assert_eq!(p.conns[at(&data)].master, Some(master));
    assert_eq!(p.expects.len(), 1);

    // One item per page: the import still finds every master.
    let b = Conntrack::new(&cfg());
    assert!(transfer(&a, &b, 12, 1) >= 3);
    let sh = b.lock(0);
    let (bm, bd) = (sh.find(&master).unwrap(), sh.find(&data).unwrap());
    let d = sh.conn(bd).unwrap();
    assert_eq!(d.master, Some(bm), "resolved by tuple");
    assert_eq!(d.status & status::RELATED, status::RELATED);
    for id in [bm, bd] {
        assert_ne!(sh.conn(id).unwrap().status & status::FROM_PEER, 0);
    }
    let x: Vec<_> = sh.expectations(t(12)).collect();
    assert_eq!(x.len(), 1);
    assert_eq!(x[0].master, master);
    assert_eq!(x[0].expires_in_ms, 300_000 - 2, "the remaining lifetime");
    drop(sh);
    b.check_invariants().unwrap();
}

#[test]
fn bulk_pages_cover_every_entry_once_over_many_shards() {
    let a = Conntrack::new(&Config { shards: 8, ..cfg() });
    let flows = udp_flows(&a, 0, 120);
    let mut seen = std::collections::HashMap::new();
    let (mut cur, mut pages) = (0, 0);
    loop {
        let p = a.bulk_page(cur, 7, t(1), BulkScope::Own);
        assert!(p.conns.len() <= 7);
        for c in p.conns {
            *seen.entry(c.tuple).or_insert(0) += 1;
        }
        pages += 1;
        match p.next {
            Some(n) => cur = n,
            None => break,
        }
    }
    assert!(pages >= 120 / 7);
    assert_eq!(seen.len(), flows.len());
    assert!(seen.values().all(|&n| n == 1));
    // Garbage cursors end the listing or list something; they never panic.
    for c in [u64::MAX, 3 << 30, 7 << 32 | 3 << 30, 1 << 63] {
        a.bulk_page(c, 5, t(1), BulkScope::Own);
    }
}

#[test]
fn a_peer_update_never_moves_tcp_state_back() {
    let a = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    handshake(&a, &mut f);
    let evs = drain_all(&a);
    let (Event::ConnCreated(syn), Event::ConnUpdated(synrecv), Event::ConnUpdated(est)) =
        (&evs[0], &evs[1], &evs[2])
    else {
        panic!("{evs:?}")
    };
    let tuple = syn.tuple;
    let b = Conntrack::new(&cfg());
    b.import_conn(t(3), syn).unwrap();
    assert_eq!(state_of(&b, &tuple), TcpState::SynSent);
    b.apply_update(t(3), est).unwrap();
    assert_eq!(state_of(&b, &tuple), TcpState::Established);
    let exp = |ct: &Conntrack| {
        let sh = ct.lock(0);
        sh.conn(sh.find(&tuple).unwrap()).unwrap().expires
    };
    let before = exp(&b);
    // A late update: the state stays, the expiry does not shrink.
    b.apply_update(t(4), synrecv).unwrap();
    assert_eq!(state_of(&b, &tuple), TcpState::Established);
    assert_eq!(exp(&b), before);
    // After a failover the entry is ours; an old whole copy from a peer that lags (or came
    // back with an old table) does not rewind it either.
    assert_eq!(
        track(&b, 4, &f.seg(false, A, 0)).state,
        CtState::Established
    );
    let before = exp(&b);
    b.import_conn(t(4), syn).unwrap();
    assert_eq!(state_of(&b, &tuple), TcpState::Established);
    assert_eq!(exp(&b), before);
    // Forward still works: the client closes.
    track(&a, 5, &f.seg(true, F | A, 0));
    for e in drain_all(&a) {
        if let Event::ConnUpdated(u) = e {
            b.apply_update(t(5), &u).unwrap();
        }
    }
    assert_eq!(state_of(&b, &tuple), TcpState::FinWait);
    let status_of = |ct: &Conntrack| {
        let sh = ct.lock(0);
        sh.conn(sh.find(&tuple).unwrap()).unwrap().status
    };
    let status_before = status_of(&b);
    assert_ne!(status_before & status::ASSURED, 0);
    // An update without ASSURED does not take it away.
    let mut u = *est;
    u.status = 0;
    u.proto = match u.proto {
        ProtoState::Tcp(mut c) => {
            c.state.set(TcpState::CloseWait);
            ProtoState::Tcp(c)
        }
        p => p,
    };
    b.apply_update(t(6), &u).unwrap();
    assert_eq!(state_of(&b, &tuple), TcpState::CloseWait);
    let st = status_of(&b);
    assert_ne!(st & status::ASSURED, 0);
    // An update for a connection we do not have.
    let mut other = *est;
    other.tuple.src_port ^= 1;
    assert_eq!(b.apply_update(t(6), &other), Err(ApplyError::Missing));
    // Seen the other way round it is not the same connection to the peer either.
    other.tuple = tuple.reverse();
    assert_eq!(b.apply_update(t(6), &other), Err(ApplyError::Missing));
}

#[test]
fn a_reopened_connection_replaces_the_finished_one() {
    let a = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    handshake(&a, &mut f);
    track(&a, 3, &f.seg(true, F | A, 0));
    track(&a, 4, &f.seg(false, F | A, 0));
    track(&a, 5, &f.seg(true, A, 0));
    let b = Conntrack::new(&cfg());
    transfer(&a, &b, 5, 10);
    let tuple = tuple_of(&f.seg(true, A, 0));
    assert_eq!(state_of(&b, &tuple), TcpState::TimeWait);
    drain_all(&a);
    f.cseq = f.cseq.wrapping_add(100_000);
    assert!(track(&a, 6, &f.seg(true, S, 0)).created);
    let evs = drain_all(&a);
    assert!(matches!(
        evs[0],
        Event::ConnDestroyed {
            reason: DestroyReason::Reopened,
            ..
        }
    ));
    let Event::ConnCreated(new) = &evs[1] else {
        panic!("{evs:?}")
    };
    // As sent: gone, then whole.
    assert!(b.remove_conn(&tuple));
    b.import_conn(t(6), new).unwrap();
    assert_eq!(state_of(&b, &tuple), TcpState::SynSent);
    // The whole copy alone (the ConnGone was lost) also replaces a finished connection.
    let b2 = Conntrack::new(&cfg());
    let mut fin = Flow::v4();
    handshake(&b2, &mut fin);
    track(&b2, 3, &fin.seg(true, F | A, 0));
    track(&b2, 4, &fin.seg(false, F | A, 0));
    track(&b2, 5, &fin.seg(true, A, 0));
    assert_eq!(state_of(&b2, &tuple), TcpState::TimeWait);
    b2.import_conn(t(6), new).unwrap();
    assert_eq!(state_of(&b2, &tuple), TcpState::SynSent);
    b2.check_invariants().unwrap();
}

#[test]
fn first_local_packet_makes_a_learned_entry_ours_and_the_sweep_spares_it() {
    let a = Conntrack::new(&Config { shards: 4, ..cfg() });
    let flows = udp_flows(&a, 0, 3);
    let b = Conntrack::new(&Config { shards: 4, ..cfg() });
    transfer(&a, &b, 1, 100);
    assert_eq!(b.len(), 3);
    let origin = |tu: &Tuple| {
        let sh = b.lock_tuple(tu);
        sh.conn(sh.find(tu).unwrap())
            .map(|c| c.status & status::FROM_PEER != 0)
    };
    assert!(flows.iter().all(|f| origin(f) == Some(true)));
    // Failover: b forwards a packet of flow 0.
    let c0 = ip("198.51.100.1");
    let o = track(&b, 2, &build::udp(ip("203.0.113.10"), c0, 53, 1000, b""));
    assert_eq!(o.state, CtState::Established);
    assert_eq!(origin(&flows[0]), Some(false));
    // The peer no longer has flows 0 and 1; a bulk from it brings only flow 2.
    for f in &flows[..2] {
        let mut sh = a.lock_tuple(f);
        let id = sh.find(f).unwrap();
        sh.remove(id);
    }
    b.begin_peer_bulk(false);
    transfer(&a, &b, 3, 100);
    assert_eq!(
        b.end_peer_bulk(),
        1,
        "only flow 1: learned and not refreshed"
    );
    let sh = |tu: &Tuple| b.lock_tuple(tu).find(tu).is_some();
    assert!(sh(&flows[0]), "used here: ours");
    assert!(!sh(&flows[1]));
    assert!(sh(&flows[2]), "refreshed by the bulk");
    // The peer's ConnGone ends only what is still the peer's.
    assert!(!b.remove_conn(&flows[0]));
    assert!(b.remove_conn(&flows[2]));
    assert!(!b.remove_conn(&flows[2]));
    assert_eq!(b.len(), 1);
    // A second sweep with nothing learned left removes nothing.
    b.begin_peer_bulk(false);
    assert_eq!(b.end_peer_bulk(), 0);
    b.check_invariants().unwrap();
}

#[test]
fn what_a_restarted_peer_lost_is_kept_as_orphans_until_it_learns_them_back() {
    let a = Conntrack::new(&cfg());
    let flows = udp_flows(&a, 0, 3);
    let b = Conntrack::new(&cfg());
    transfer(&a, &b, 1, 100);
    // `a` restarts empty; its first bulk lists nothing. `b` keeps what it learned from the
    // old boot: nobody else has it now.
    b.begin_peer_bulk(true);
    assert_eq!(
        b.end_peer_bulk(),
        0,
        "nothing swept when the peer restarted"
    );
    assert_eq!(b.len(), 3);
    b.check_invariants().unwrap();
    // The new boot's later bulks do not sweep the orphans either...
    b.begin_peer_bulk(false);
    assert_eq!(b.end_peer_bulk(), 0, "orphans are not swept");
    // ...until the peer sends one of them again (it learned it back, or it carries traffic
    // there): from then on it is the peer's, and a bulk without it sweeps it.
    let a2 = Conntrack::new(&cfg());
    let snap = b.bulk_page(0, 100, t(3), BulkScope::OwnAndLearned).conns;
    let one = snap.iter().find(|c| c.tuple == flows[0]).unwrap();
    b.import_conn(t(3), one).unwrap();
    b.begin_peer_bulk(false);
    transfer(&a2, &b, 4, 100);
    assert_eq!(b.end_peer_bulk(), 1, "the refreshed one is ordinary again");
    assert_eq!(b.len(), 2);
    // A ConnGone still ends an orphan: it is the peer's to end.
    assert!(b.remove_conn(&flows[1]));
    // Snapshots never show the internal bit.
    let left = b.bulk_page(0, 100, t(4), BulkScope::OwnAndLearned).conns;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].status & status::INTERNAL, 0);
    b.check_invariants().unwrap();
}

#[test]
fn a_live_item_during_a_bulk_counts_as_a_refresh() {
    let a = Conntrack::new(&cfg());
    let flows = udp_flows(&a, 0, 2);
    let b = Conntrack::new(&cfg());
    transfer(&a, &b, 1, 100);
    b.begin_peer_bulk(false);
    let snap = a.bulk_page(0, 100, t(2), BulkScope::Own).conns;
    let one = snap.iter().find(|c| c.tuple == flows[1]).unwrap();
    let u = ConnUpdate {
        tuple: one.tuple,
        proto: one.proto,
        status: one.status,
        expires_in_ms: one.expires_in_ms,
    };
    b.apply_update(t(2), &u).unwrap();
    assert_eq!(b.end_peer_bulk(), 1);
    assert!(b.lock(0).find(&flows[1]).is_some());
    assert!(b.lock(0).find(&flows[0]).is_none());
}

#[test]
fn peer_expectations_keep_their_lifetime_need_their_master_and_respect_the_bound() {
    let a = Conntrack::new(&cfg());
    let (f, m) = ftp_master(&a);
    a.lock(0).expect(t(10), data_expect(m, &f, 50000)).unwrap();
    a.lock(0).expect(t(10), data_expect(m, &f, 50001)).unwrap();
    let p = a.bulk_page(0, 100, t(90_010), BulkScope::Own);
    let (xs, master) = (p.expects, &p.conns[0]);
    assert_eq!(xs[0].expires_in_ms, 300_000 - 90_000);

    let b = Conntrack::new(&Config {
        max_expectations: 1,
        ..cfg()
    });
    assert_eq!(b.import_expect(t(1000), &xs[0]), Err(ImportError::NoMaster));
    assert_eq!(b.expectation_count(), 0);
    b.import_conn(t(1000), master).unwrap();
    b.import_expect(t(1000), &xs[0]).unwrap();
    let got: Vec<_> = b.lock(0).expectations(t(1000)).collect();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].expires_in_ms, 210_000,
        "remaining, not a fresh timeout"
    );
    // Identical: refreshed in place.
    let mut again = xs[0].clone();
    again.expires_in_ms = 500;
    b.import_expect(t(2000), &again).unwrap();
    assert_eq!(b.expectation_count(), 1);
    assert_eq!(
        b.lock(0)
            .expectations(t(2000))
            .next()
            .unwrap()
            .expires_in_ms,
        500
    );
    // A different one: the global bound (1) refuses it.
    assert_eq!(
        b.import_expect(t(2000), &xs[1]),
        Err(ImportError::TableFull)
    );
    // Removed when the peer says so; the data connection then is not RELATED.
    assert!(b.remove_expect(&xs[0]));
    assert!(!b.remove_expect(&xs[0]));
    b.import_expect(t(2000), &again).unwrap();
    // It expires with the lifetime the peer gave it, quietly.
    b.handle_timeout(t(2500), 0, 1, 100);
    assert_eq!(b.expectation_count(), 0);
    assert!(drain_all(&b).is_empty());
    b.check_invariants().unwrap();
}

#[test]
fn a_learned_expectation_is_used_after_failover() {
    let a = Conntrack::new(&cfg());
    let (master, _) = ftp_with_related(&a);
    let b = Conntrack::new(&cfg());
    transfer(&a, &b, 12, 100);
    // PORT was before the crash; the data connection opens on b after it.
    let mut d = Flow {
        c: ip("203.0.113.10"),
        s: ip("198.51.100.10"),
        cp: 20,
        sp: 50001,
        ..Flow::v4()
    };
    let o = track(&b, 13, &d.seg(true, S, 0));
    assert_eq!((o.state, o.created), (CtState::Related, true));
    let sh = b.lock(0);
    assert_eq!(sh.conn(o.conn.unwrap()).unwrap().master, sh.find(&master));
}

#[test]
fn a_peers_items_are_not_echoed_and_learned_entries_end_quietly() {
    let a = Conntrack::new(&cfg());
    let (master, data) = ftp_with_related(&a);
    udp_flows(&a, 12, 2);
    let b = Conntrack::new(&cfg());
    transfer(&a, &b, 12, 2);
    b.begin_peer_bulk(false);
    assert_eq!(b.end_peer_bulk(), 4, "3 connections and 1 expectation");
    transfer(&a, &b, 12, 2);
    assert!(b.remove_conn(&data));
    let x = b.lock(0).expectations(t(12)).next().unwrap();
    assert!(b.remove_expect(&x));
    // The peer's entries time out here too; their end is the peer's to announce.
    b.handle_timeout(t(10_000_000_000), 0, 1, 1000);
    assert!(b.is_empty());
    assert!(drain_all(&b).is_empty(), "nothing goes back to the peer");
    // Local traffic on a learned entry does make events.
    transfer(&a, &b, 20, 100);
    assert!(b.lock(0).find(&master).is_some());
    let c = ip("198.51.100.1");
    track(&b, 21, &build::udp(ip("203.0.113.10"), c, 53, 1000, b""));
    assert!(!drain_all(&b).is_empty());
}

#[test]
fn bad_peer_items_are_refused_and_change_nothing() {
    let a = Conntrack::new(&cfg());
    let (f, m) = ftp_master(&a);
    a.lock(0).expect(t(10), data_expect(m, &f, 50000)).unwrap();
    let p = a.bulk_page(0, 100, t(10), BulkScope::Own);
    let (good, gx) = (p.conns[0].clone(), p.expects[0].clone());
    assert!(good.helper.is_some());
    let b = Conntrack::new(&cfg());
    b.import_conn(t(10), &good).unwrap();
    let before = everything(&b, 10);
    assert_eq!((before.0.len(), before.1.len()), (1, 0));

    let tcp = |s: &ConnSnapshot| match s.proto {
        ProtoState::Tcp(c) => c,
        _ => unreachable!(),
    };
    let mut cases: Vec<(ConnSnapshot, ImportError)> = Vec::new();
    let mut s = good.clone();
    s.tuple.family = 5;
    cases.push((s, ImportError::BadFamily));
    let mut s = good.clone();
    s.tuple.dst = s.tuple.src;
    s.tuple.dst_port = s.tuple.src_port;
    cases.push((s, ImportError::SameEndpoints));
    let mut s = good.clone();
    s.proto = ProtoState::Udp;
    cases.push((s, ImportError::ProtoMismatch));
    let mut s = good.clone();
    s.tuple.proto = proto::UDP;
    cases.push((s, ImportError::ProtoMismatch));
    for bad in [10u8, 200, 0] {
        let mut s = good.clone();
        let mut c = tcp(&s);
        c.state = tcp::TcpStateRepr(bad);
        s.proto = ProtoState::Tcp(c);
        cases.push((s, ImportError::BadTcpState));
    }
    let mut s = good.clone();
    let mut c = tcp(&s);
    c.dir[1].scale = 15;
    s.proto = ProtoState::Tcp(c);
    cases.push((s, ImportError::BadTcpState));
    let mut s = good.clone();
    s.helper.as_mut().unwrap().dir[1].len = helper_state::LINE_MAX as u16 + 1;
    cases.push((s, ImportError::BadHelper));
    let mut s = good.clone();
    s.tuple.proto = proto::UDP;
    s.proto = ProtoState::Udp;
    cases.push((s, ImportError::BadHelper));
    for (s, want) in &cases {
        assert_eq!(b.import_conn(t(11), s), Err(*want), "{s:?}");
        let u = ConnUpdate {
            tuple: s.tuple,
            proto: s.proto,
            status: s.status,
            expires_in_ms: s.expires_in_ms,
        };
        if *want != ImportError::BadHelper {
            assert_eq!(b.apply_update(t(11), &u), Err(ApplyError::Invalid(*want)));
        }
    }
    // Expectations.
    let mut x = gx.clone();
    x.family = 9;
    assert_eq!(b.import_expect(t(11), &x), Err(ImportError::BadFamily));
    let mut x = gx.clone();
    x.proto = proto::ICMP;
    assert_eq!(b.import_expect(t(11), &x), Err(ImportError::ProtoMismatch));
    assert_eq!(everything(&b, 10), before, "untouched");

    // Handed to the wrong shard.
    let many = Conntrack::new(&Config { shards: 8, ..cfg() });
    let right = many.shard_of_pair(&good.tuple.src, &good.tuple.dst, good.tuple.proto);
    let wrong = (right + 1) % 8;
    assert_eq!(
        many.lock(wrong).import_conn(t(11), &good),
        Err(ImportError::WrongShard)
    );
    assert_eq!(
        many.lock(wrong).import_expect(t(11), &gx),
        Err(ImportError::WrongShard)
    );
    assert!(many.is_empty());
    b.check_invariants().unwrap();
    many.check_invariants().unwrap();
}

/// ICMP carried over IPv6 (or ICMPv6 over IPv4) does not parse as ICMP: the tracker keeps it
/// as an unknown protocol. A peer's echo entry for such a tuple is refused (as `sync::codec`
/// refuses it on the wire), so no packet meets an entry of a kind it cannot be judged by
/// (such a packet used to be INVALID, counted as `icmp_untracked`).
#[test]
fn an_echo_entry_is_imported_only_over_its_own_familys_icmp() {
    let snap = |pkt: &[u8]| ConnSnapshot {
        tuple: tuple_of(pkt),
        proto: ProtoState::IcmpEcho,
        status: 0,
        master: None,
        expires_in_ms: 30_000,
        helper: None,
    };
    for (c, s, p) in [
        ("2001:db8:1::10", "2001:db8:2::10", proto::ICMP),
        ("198.51.100.10", "203.0.113.10", proto::ICMPV6),
    ] {
        // An echo request of the other family (type 8 or 128, identifier 0).
        let ty = if p == proto::ICMP { 8 } else { 128 };
        let pkt = build::ip(ip(c), ip(s), p, &[ty, 0, 0, 0, 0, 0, 0, 1]);
        let b = Conntrack::new(&cfg());
        assert_eq!(
            b.import_conn(t(0), &snap(&pkt)),
            Err(ImportError::ProtoMismatch),
            "{c}, protocol {p}"
        );
        assert!(b.is_empty());
        // The packet is tracked as what it parses as.
        let o = track(&b, 1, &pkt);
        assert_eq!((o.state, o.invalid, o.created), (CtState::New, None, true));
    }
    // Over its own family's ICMP an echo entry is imported, and the reply finds it.
    for (c, s) in [
        ("198.51.100.10", "203.0.113.10"),
        ("2001:db8:1::10", "2001:db8:2::10"),
    ] {
        let (c, s) = (ip(c), ip(s));
        let b = Conntrack::new(&cfg());
        b.import_conn(t(0), &snap(&build::echo(c, s, false, 9, 1)))
            .unwrap();
        let o = track(&b, 1, &build::echo(s, c, true, 9, 1));
        assert_eq!((o.state, o.invalid), (CtState::Established, None));
    }
}

#[test]
fn an_imported_lifetime_is_bounded_by_the_longest_timeout() {
    let a = Conntrack::new(&cfg());
    udp_flows(&a, 0, 1);
    let mut s = a.bulk_page(0, 1, t(0), BulkScope::Own).conns.remove(0);
    s.expires_in_ms = u64::MAX;
    let b = Conntrack::new(&cfg());
    b.import_conn(t(0), &s).unwrap();
    let longest = Timeouts::default().longest() * 1000;
    assert_eq!(everything(&b, 0).0[0].expires_in_ms, longest);
}

// ---- property test: a peer's items, random and hostile -------------------------------------

fn arb_tuple() -> impl Strategy<Value = Tuple> {
    (
        0u8..3,
        0u8..3,
        prop_oneof![
            Just(proto::TCP),
            Just(proto::UDP),
            Just(proto::ICMP),
            Just(47u8)
        ],
        0u16..3,
        0u16..3,
        prop_oneof![4 => Just(4u8), 1 => Just(6u8), 1 => any::<u8>()],
    )
        .prop_map(|(a, b, p, sp, dp, family)| {
            let addr = |x: u8| {
                let mut v = [0u8; 16];
                v[10] = 0xff;
                v[11] = 0xff;
                v[15] = x;
                v
            };
            Tuple {
                src: addr(a),
                dst: addr(b),
                src_port: sp,
                dst_port: dp,
                proto: p,
                family,
            }
        })
}

fn arb_proto() -> impl Strategy<Value = ProtoState> {
    prop_oneof![
        3 => (0u8..12, any::<[u32; 6]>(), 0u8..17, 0u8..17, any::<[u8; 2]>()).prop_map(
            |(st, w, s0, s1, fl)| {
                let mut c = tcp::TcpConn {
                    state: tcp::TcpStateRepr(st),
                    ..Default::default()
                };
                for (i, (d, sc)) in c.dir.iter_mut().zip([s0, s1]).enumerate() {
                    d.end = tcp::SeqNumber(w[3 * i]);
                    d.maxend = tcp::SeqNumber(w[3 * i + 1]);
                    d.maxwin = w[3 * i + 2];
                    d.scale = sc;
                    d.flags = fl[i];
                }
                ProtoState::Tcp(c)
            }
        ),
        1 => Just(ProtoState::Udp),
        1 => Just(ProtoState::IcmpEcho),
        1 => Just(ProtoState::Generic),
    ]
}

fn arb_helper() -> impl Strategy<Value = Option<Box<helper_state::HelperState>>> {
    proptest::option::of((any::<Option<u32>>(), 0u16..600, any::<bool>()).prop_map(
        |(seq, len, ov)| {
            let mut h = helper_state::HelperState::new(helper_state::HelperKind::Ftp);
            h.dir[0].next_seq = seq;
            h.dir[1].len = len;
            h.dir[1].overflowed = ov;
            Box::new(h)
        },
    ))
}

fn arb_expect() -> impl Strategy<Value = ExpectSnapshot> {
    (arb_tuple(), 0u8..3, 0u8..3, 0u16..3, 0u64..100_000).prop_map(
        |(master, s, d, port, expires_in_ms)| ExpectSnapshot {
            master,
            proto: if port == 2 { proto::UDP } else { proto::TCP },
            src: master.src.map(|b| b ^ s),
            src_port: None,
            dst: master.dst.map(|b| b ^ d),
            dst_port: port,
            family: master.family,
            expires_in_ms,
            helper: None,
        },
    )
}

#[derive(Clone, Debug)]
enum PeerOp {
    Conn(ConnSnapshot),
    Update(ConnUpdate),
    Gone(Tuple),
    Expect(ExpectSnapshot),
    ExpectGone(ExpectSnapshot),
    Begin,
    End,
    Local {
        flow: u8,
        flags: u8,
        seq: u32,
        reply: bool,
    },
    Tick(u32),
}

fn peer_op() -> impl Strategy<Value = PeerOp> {
    let snap = (
        arb_tuple(),
        arb_proto(),
        any::<u16>(),
        proptest::option::of(arb_tuple()),
        0u64..400_000_000,
        arb_helper(),
    )
        .prop_map(
            |(tuple, proto, status, master, expires_in_ms, helper)| ConnSnapshot {
                tuple,
                proto,
                status,
                master,
                expires_in_ms,
                helper,
            },
        );
    let upd = (arb_tuple(), arb_proto(), any::<u16>(), 0u64..400_000_000).prop_map(
        |(tuple, proto, status, expires_in_ms)| ConnUpdate {
            tuple,
            proto,
            status,
            expires_in_ms,
        },
    );
    prop_oneof![
        4 => snap.prop_map(PeerOp::Conn),
        3 => upd.prop_map(PeerOp::Update),
        1 => arb_tuple().prop_map(PeerOp::Gone),
        2 => arb_expect().prop_map(PeerOp::Expect),
        1 => arb_expect().prop_map(PeerOp::ExpectGone),
        1 => Just(PeerOp::Begin),
        1 => Just(PeerOp::End),
        2 => (0u8..3, any::<u8>(), any::<u32>(), any::<bool>())
            .prop_map(|(flow, flags, seq, reply)| PeerOp::Local { flow, flags, seq, reply }),
        1 => (0u32..200_000).prop_map(PeerOp::Tick),
    ]
}

proptest! {
    #[test]
    fn random_peer_items_never_panic_and_keep_invariants(ops in proptest::collection::vec(peer_op(), 1..80)) {
        let ct = Conntrack::new(&Config { shards: 4, max_entries: 6, max_expectations: 3, max_expect_per_master: 2, event_queue: 64, ..Config::default() });
        let mut now = 0u64;
        for op in ops {
            let before = (ct.len(), ct.expectation_count());
            match op {
                PeerOp::Conn(s) => {
                    if ct.import_conn(t(now), &s).is_err() {
                        prop_assert_eq!(ct.len(), before.0);
                    }
                }
                PeerOp::Update(u) => {
                    if ct.apply_update(t(now), &u).is_err() {
                        prop_assert_eq!((ct.len(), ct.expectation_count()), before);
                    }
                }
                PeerOp::Gone(tu) => { ct.remove_conn(&tu); }
                PeerOp::Expect(x) => {
                    if ct.import_expect(t(now), &x).is_err() {
                        prop_assert_eq!((ct.len(), ct.expectation_count()), before);
                    }
                }
                PeerOp::ExpectGone(x) => { ct.remove_expect(&x); }
                PeerOp::Begin => ct.begin_peer_bulk(false),
                PeerOp::End => { ct.end_peer_bulk(); }
                PeerOp::Local { flow, flags, seq, reply } => {
                    let (a, b) = (ip("0.0.0.1"), ip("0.0.0.0"));
                    let (src, dst, sp, dp) = if reply { (b, a, 1, u16::from(flow)) } else { (a, b, u16::from(flow), 1) };
                    let mut spec = TcpSpec::new(sp, dp, flags);
                    spec.seq = seq;
                    spec.payload = vec![0; 3];
                    track(&ct, now, &build::tcp(src, dst, &spec));
                    track(&ct, now, &build::udp(src, dst, sp, dp, b""));
                }
                PeerOp::Tick(ms) => {
                    now += u64::from(ms);
                    ct.handle_timeout(t(now), 0, 1, 4);
                }
            }
            if let Err(e) = ct.check_invariants() {
                return Err(TestCaseError::fail(e));
            }
            // Whatever it holds can be listed and sent on.
            let mut cur = 0;
            for _ in 0..64 {
                match ct.bulk_page(cur, 3, t(now), BulkScope::Own).next { Some(n) => cur = n, None => break }
            }
            let _ = drain_all(&ct);
        }
    }
}

// ---- TCP against Linux nf_conntrack_proto_tcp.c (issue 9 item 5) ---------------------------

#[test]
fn a_picked_up_scaled_flow_is_not_judged_by_windows_it_cannot_know() {
    let ct = Conntrack::new(&Config {
        tcp_pickup: true,
        ..cfg()
    });
    // Both ends scale by 2^7; the 512 in the window field is really 64 KiB, but the SYNs
    // that said so were before the pickup.
    let mut f = Flow {
        window: 512,
        ..Flow::v4()
    };
    assert!(track(&ct, 0, &f.seg(true, A, 0)).created);
    track(&ct, 1, &f.seg(false, A, 0));
    for i in 0..3 {
        let o = track(&ct, 2 + i, &f.seg(true, A | P, 1448));
        assert_eq!(o.state, CtState::Established, "full segment {i}");
    }
}

#[test]
fn an_in_window_rst_off_the_expected_sequence_keeps_the_connection_for_a_challenge_ack() {
    let ct = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    let o = handshake(&ct, &mut f);
    // RFC 5961 3.2: in window but not exactly the next sequence number. The receiver answers
    // with a challenge ACK; the connection must survive so that ACK gets through.
    let mut near = TcpSpec::new(f.cp, f.sp, R);
    near.seq = f.cseq.wrapping_add(100);
    let r = track(&ct, 3, &build::tcp(f.c, f.s, &near));
    assert_eq!(r.state, CtState::Established, "passed on to the endpoint");
    assert_eq!(tcp_state(&ct, &o), TcpState::Established);
    assert_eq!(
        track(&ct, 4, &f.seg(false, A, 0)).state,
        CtState::Established
    );
    // The sender answers the challenge with the exact sequence number: now it closes.
    let exact = track(&ct, 5, &f.seg(true, R, 0));
    assert_eq!(exact.state, CtState::Established);
    assert_eq!(tcp_state(&ct, &o), TcpState::Close);
}

#[test]
fn a_learned_entry_refuses_a_rst_it_cannot_check_yet() {
    let a = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    let o = handshake(&a, &mut f);
    let snap = a.lock(0).snapshot(o.conn.unwrap(), t(2)).unwrap();
    let b = Conntrack::new(&cfg());
    b.import_conn(t(3), &snap).unwrap();
    let id = b.lock(0).find(&snap.tuple).unwrap();
    let state = || match b.lock(0).conn(id).unwrap().proto {
        ProtoState::Tcp(c) => c.state(),
        p => panic!("{p:?}"),
    };
    // The windows are stale and nothing was seen since: a RST at any sequence number would be
    // a free kill switch for the connection. Refused, whatever its sequence number.
    for seq in [f.cseq.wrapping_add(9_999_999), f.cseq] {
        let mut rst = TcpSpec::new(f.cp, f.sp, R);
        rst.seq = seq;
        invalid(
            &track(&b, 4, &build::tcp(f.c, f.s, &rst)),
            InvalidReason::TcpRstOutOfWindow,
        );
        assert_eq!(state(), TcpState::Established);
    }
    // The server's next segment says (by its ACK) where the client is: a RST at the client's
    // exact sequence number is now accepted.
    track(&b, 5, &f.seg(false, A, 0));
    assert_eq!(track(&b, 6, &f.seg(true, R, 0)).state, CtState::Established);
    assert_eq!(state(), TcpState::Close);
}

#[test]
fn an_old_ack_within_66000_bytes_is_in_window_even_with_small_windows() {
    let ct = Conntrack::new(&cfg());
    let mut f = Flow {
        window: 1000,
        ..Flow::v4()
    };
    handshake(&ct, &mut f);
    for i in 0..6 {
        assert_eq!(
            track(&ct, 3 + i, &f.seg(true, A | P, 900)).state,
            CtState::Established
        );
        assert_eq!(
            track(&ct, 3 + i, &f.seg(false, A, 0)).state,
            CtState::Established
        );
    }
    // A reordered ACK from before the last 5000 bytes: Linux's MAXACKWINDOW takes the larger
    // of the sender's largest window and 66000.
    let mut old = TcpSpec::new(f.sp, f.cp, A);
    old.seq = f.sseq;
    old.ack = f.cseq.wrapping_sub(5000);
    old.window = 1000;
    assert_eq!(
        track(&ct, 20, &build::tcp(f.s, f.c, &old)).state,
        CtState::Established
    );
    // Beyond 66000 it is not.
    old.ack = f.cseq.wrapping_sub(70_000);
    invalid(
        &track(&ct, 21, &build::tcp(f.s, f.c, &old)),
        InvalidReason::TcpOutOfWindow,
    );
}

#[test]
fn a_syn_with_a_new_isn_reinitialises_only_in_syn_sent_and_syn_recv() {
    // In SYN_SENT a retransmitted SYN with a later ISN restarts the sender's bounds.
    let ct = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    let o = track(&ct, 0, &f.seg(true, S, 0));
    f.cseq = f.cseq.wrapping_add(100_000);
    let o2 = track(&ct, 1, &f.seg(true, S, 0));
    assert_eq!((o2.state, o2.conn), (CtState::New, o.conn));
    // Simultaneous open (SYN_SENT2): the same SYN does not re-initialise; it is out of window.
    let ct = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    let o = track(&ct, 0, &f.seg(true, S, 0));
    track(&ct, 1, &f.seg(false, S, 0));
    assert_eq!(tcp_state(&ct, &o), TcpState::SynSent2);
    f.cseq = f.cseq.wrapping_add(100_000);
    invalid(
        &track(&ct, 2, &f.seg(true, S, 0)),
        InvalidReason::TcpOutOfWindow,
    );
}

#[test]
fn a_reply_syn_in_time_wait_reopens_with_the_roles_swapped() {
    let ct = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    let o = handshake(&ct, &mut f);
    track(&ct, 3, &f.seg(true, F | A, 0));
    track(&ct, 4, &f.seg(false, F | A, 0));
    track(&ct, 5, &f.seg(true, A, 0));
    assert_eq!(tcp_state(&ct, &o), TcpState::TimeWait);
    // The server opens a new connection to the client's port (RFC 1122 4.2.2.13).
    f.sseq = f.sseq.wrapping_add(100_000);
    let n = track(&ct, 6, &f.seg(false, S, 0));
    assert_eq!(
        (n.state, n.created, n.dir),
        (CtState::New, true, Direction::Original)
    );
    assert_ne!(n.conn, o.conn);
    assert_eq!(ct.len(), 1);
    let info = ct.lock(0).conn(n.conn.unwrap()).unwrap();
    assert_eq!((info.tuple.src_ip(), info.tuple.src_port), (f.s, f.sp));
    assert_eq!(tcp_state(&ct, &n), TcpState::SynSent);
    assert_eq!(
        track(&ct, 7, &f.seg(true, S | A, 0)).state,
        CtState::Established
    );
}

#[test]
fn a_window_scale_above_14_is_clamped() {
    use crate::packet::{Tcp, TcpOptions};
    let syn = Tcp {
        src_port: 1,
        dst_port: 2,
        seq: 1,
        ack: 0,
        flags: TcpFlags(S),
        window: 1000,
        options: TcpOptions {
            window_scale: Some(40),
            ..TcpOptions::default()
        },
        opts: &[],
        payload_len: 0,
        payload: &[],
    };
    let c = tcp::TcpConn::new_from(&syn, false).unwrap();
    assert_eq!(c.dir[0].scale, 14);
    let mut c = c;
    let mut synack = syn;
    synack.flags = TcpFlags(S | A);
    synack.ack = 2;
    synack.seq = 500;
    synack.options.window_scale = Some(255);
    assert_eq!(
        c.update(Direction::Reply, &synack, false),
        tcp::TcpVerdict::Ok
    );
    assert_eq!(c.dir[1].scale, 14);
    // Scaling a full window by 14 does not overflow.
    let mut ack = syn;
    ack.flags = TcpFlags(A);
    ack.seq = 2;
    ack.ack = 501;
    ack.window = u16::MAX;
    ack.options = TcpOptions::default();
    assert_eq!(
        c.update(Direction::Original, &ack, false),
        tcp::TcpVerdict::Ok
    );
}

#[test]
fn a_whole_copy_replaces_a_learned_entry_even_with_an_earlier_state() {
    // The peer's previous boot left us a learned entry in LAST_ACK; after its restart the same
    // tuple is a new connection there. Its whole copy is the peer's latest word (the sync core
    // keeps the stream in order) and replaces ours; merging would keep LAST_ACK.
    let a = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    handshake(&a, &mut f);
    track(&a, 3, &f.seg(true, F | A, 0));
    track(&a, 4, &f.seg(false, F | A, 0));
    let b = Conntrack::new(&cfg());
    transfer(&a, &b, 4, 10);
    let tuple = tuple_of(&f.seg(true, A, 0));
    assert_eq!(state_of(&b, &tuple), TcpState::LastAck);
    let a2 = Conntrack::new(&cfg());
    let mut g = Flow::v4();
    handshake(&a2, &mut g);
    let fresh = a2.bulk_page(0, 10, t(2), BulkScope::Own).conns.remove(0);
    b.import_conn(t(5), &fresh).unwrap();
    assert_eq!(state_of(&b, &tuple), TcpState::Established);
    let sh = b.lock(0);
    let st = sh.conn(sh.find(&tuple).unwrap()).unwrap().status;
    assert_ne!(st & status::FROM_PEER, 0);
    // A compact update, by contrast, never rewinds (it carries no incarnation).
    drop(sh);
    let mut u = ConnUpdate {
        tuple,
        proto: fresh.proto,
        status: fresh.status,
        expires_in_ms: 1000,
    };
    if let ProtoState::Tcp(mut c) = u.proto {
        c.state.set(TcpState::SynRecv);
        u.proto = ProtoState::Tcp(c);
    }
    b.apply_update(t(6), &u).unwrap();
    assert_eq!(state_of(&b, &tuple), TcpState::Established);
}

#[test]
fn a_whole_copy_keeps_the_expectations_of_a_learned_master() {
    // ConnHelper re-sends the FTP control connection whole after each command: the data
    // connections it announced must survive that.
    let a = Conntrack::new(&cfg());
    let (master, _) = ftp_with_related(&a);
    let b = Conntrack::new(&cfg());
    transfer(&a, &b, 12, 100);
    assert_eq!(b.expectation_count(), 1);
    let again = a.bulk_page(0, 100, t(13), BulkScope::Own).conns;
    let m = again.iter().find(|c| c.tuple == master).unwrap();
    b.import_conn(t(13), m).unwrap();
    assert_eq!(b.expectation_count(), 1);
    b.check_invariants().unwrap();
}

// ---- SACK and the bounds Linux keeps (tcp_in_window, v6.6) ---------------------------------

/// One segment for `TcpConn`-level tests: `opts` are raw option bytes (SACK blocks).
fn tseg(
    flags: u8,
    seq: u32,
    ack: u32,
    len: u32,
    opts: &[u8],
    sack_perm: bool,
) -> crate::packet::Tcp<'_> {
    crate::packet::Tcp {
        src_port: 40000,
        dst_port: 80,
        seq,
        ack,
        flags: TcpFlags(flags),
        window: 2000,
        options: crate::packet::TcpOptions {
            sack_permitted: sack_perm && flags & S != 0,
            ..Default::default()
        },
        opts,
        payload_len: len,
        payload: &[],
    }
}

fn sack_blocks(blocks: &[(u32, u32)]) -> Vec<u8> {
    let mut o = vec![1, 1, 5, (2 + 8 * blocks.len()) as u8];
    for (l, r) in blocks {
        o.extend_from_slice(&l.to_be_bytes());
        o.extend_from_slice(&r.to_be_bytes());
    }
    o
}

/// Client ISN 1000, server ISN 5000, windows 2000 unscaled; the client has sent 1001..3001.
fn sack_conn(sack_perm: bool) -> tcp::TcpConn {
    use tcp::TcpVerdict::Ok;
    let (o, r) = (Direction::Original, Direction::Reply);
    let mut c = tcp::TcpConn::new_from(&tseg(S, 1000, 0, 0, &[], sack_perm), false).unwrap();
    assert_eq!(
        c.update(r, &tseg(S | A, 5000, 1001, 0, &[], sack_perm), false),
        Ok
    );
    assert_eq!(c.update(o, &tseg(A, 1001, 5001, 0, &[], false), false), Ok);
    assert_eq!(
        c.update(o, &tseg(A, 1001, 5001, 1000, &[], false), false),
        Ok
    );
    assert_eq!(
        c.update(o, &tseg(A, 2001, 5001, 1000, &[], false), false),
        Ok
    );
    c
}

#[test]
fn a_sack_block_beyond_the_data_sent_is_out_of_window_when_sack_was_permitted() {
    let r = Direction::Reply;
    // The server lost 1001..2001 and SACKs 2001..3001: fine.
    let ok = sack_blocks(&[(2001, 3001)]);
    let mut c = sack_conn(true);
    assert_eq!(
        c.update(r, &tseg(A, 5001, 1001, 0, &ok, false), false),
        tcp::TcpVerdict::Ok
    );
    // A SACK for data the client never sent acknowledges the unseen (Linux: "ACK is over
    // the upper bound"), although the cumulative ACK is fine.
    let forged = sack_blocks(&[(2001, 9001)]);
    let before = c;
    assert_eq!(
        c.update(r, &tseg(A, 5001, 1001, 0, &forged, false), false),
        tcp::TcpVerdict::OutOfWindow
    );
    assert_eq!(c, before, "an out-of-window segment changes nothing");
    // Without SACK permitted in the client's SYN the blocks mean nothing and are not read.
    let mut c = sack_conn(false);
    assert_eq!(
        c.update(r, &tseg(A, 5001, 1001, 0, &forged, false), false),
        tcp::TcpVerdict::Ok
    );
}

#[test]
fn a_sack_block_moves_the_senders_right_edge() {
    let (o, r) = (Direction::Original, Direction::Reply);
    for sack_perm in [true, false] {
        let mut c = sack_conn(sack_perm);
        let sacked = sack_blocks(&[(2001, 3001)]);
        assert_eq!(
            c.update(r, &tseg(A, 5001, 1001, 0, &sacked, false), false),
            tcp::TcpVerdict::Ok
        );
        // Linux lets the client's window run from the highest SACKed byte: 3001 + 2000.
        let expect = if sack_perm { 5001 } else { 3001 };
        assert_eq!(
            c.dir[0].maxend,
            tcp::SeqNumber(expect),
            "sack_perm {sack_perm}"
        );
        let v = c.update(o, &tseg(A, 4001, 5001, 1000, &[], false), false);
        let want = if sack_perm {
            tcp::TcpVerdict::Ok
        } else {
            tcp::TcpVerdict::OutOfWindow
        };
        assert_eq!(v, want, "sack_perm {sack_perm}");
    }
}

#[test]
fn a_pure_ack_is_judged_at_the_senders_end_whatever_its_sequence_number() {
    let mut c = sack_conn(false);
    // No data, no SYN/FIN: Linux moves seq and end to the sender's end before judging.
    let stale = tseg(A, 7, 5001, 0, &[], false);
    assert_eq!(
        c.update(Direction::Original, &stale, false),
        tcp::TcpVerdict::Ok
    );
    // The same sequence number with one byte of data is far out of window.
    let data = tseg(A, 7, 5001, 1, &[], false);
    assert_eq!(
        c.update(Direction::Original, &data, false),
        tcp::TcpVerdict::OutOfWindow
    );
}

#[test]
fn a_liberal_connections_out_of_window_segment_passes_and_moves_no_bound() {
    let o = Direction::Original;
    // Picked up mid-stream: liberal both ways, bounds learned from the first segment.
    let mut c = tcp::TcpConn::new_from(&tseg(A, 1001, 5001, 100, &[], false), true).unwrap();
    assert_eq!(
        c.update(o, &tseg(A, 1101, 5001, 100, &[], false), false),
        tcp::TcpVerdict::Ok
    );
    let learned = c;
    let wild = tseg(A, 0x8000_0000, 5001, 100, &[], false);
    assert_eq!(c.update(o, &wild, false), tcp::TcpVerdict::Ok);
    assert_eq!(
        c.dir, learned.dir,
        "the wild segment passed without moving a bound"
    );
    assert_ne!(
        c.dir[0].flags & tcp::DIR_SACK_PERM,
        0,
        "picked up: SACK assumed, as Linux"
    );
}

#[test]
fn a_retransmitted_syn_with_a_new_isn_forgets_the_old_options() {
    let o = Direction::Original;
    let mut syn = tseg(S, 1000, 0, 0, &[], true);
    syn.options.window_scale = Some(7);
    let mut c = tcp::TcpConn::new_from(&syn, false).unwrap();
    assert_eq!(c.dir[0].scale, 7);
    assert_ne!(c.dir[0].flags & tcp::DIR_SACK_PERM, 0);
    // Same tuple, new ISN, no options: the old scale and SACK permission are gone.
    let again = tseg(S, 90_000, 0, 0, &[], false);
    assert_eq!(c.update(o, &again, false), tcp::TcpVerdict::Ok);
    assert_eq!(c.dir[0].end, tcp::SeqNumber(90_001));
    assert_eq!(c.dir[0].scale, 0);
    assert_eq!(c.dir[0].flags & (tcp::DIR_SACK_PERM | tcp::DIR_WSCALE), 0);
}

/// The parser hands the tracker the option bytes of a SACK-carrying segment as built.
#[test]
fn sack_blocks_reach_the_tracker_through_the_parser() {
    let mut f = Flow::v4();
    let ct = Conntrack::new(&cfg());
    let mut spec = TcpSpec::new(f.cp, f.sp, S);
    spec.seq = f.cseq;
    spec.sack_perm = true;
    assert_eq!(
        track(&ct, 0, &build::tcp(f.c, f.s, &spec)).state,
        CtState::New
    );
    f.cseq += 1;
    let mut sa = TcpSpec::new(f.sp, f.cp, S | A);
    sa.seq = f.sseq;
    sa.ack = f.cseq;
    sa.sack_perm = true;
    assert_eq!(
        track(&ct, 1, &build::tcp(f.s, f.c, &sa)).state,
        CtState::Established
    );
    f.sseq += 1;
    // Server ACKs with a SACK block beyond anything the client sent.
    let mut ack = TcpSpec::new(f.sp, f.cp, A);
    ack.seq = f.sseq;
    ack.ack = f.cseq;
    ack.sack = vec![(f.cseq + 100, f.cseq + 200)];
    invalid(
        &track(&ct, 2, &build::tcp(f.s, f.c, &ack)),
        InvalidReason::TcpOutOfWindow,
    );
    ack.sack.clear();
    assert_eq!(
        track(&ct, 3, &build::tcp(f.s, f.c, &ack)).state,
        CtState::Established
    );
}

/// Counting and listing drop the shard lock every `PAGE_SCAN` slots and `PAGE_TAKE`
/// snapshots; across those boundaries nothing is lost or counted twice.
#[test]
fn counting_and_listing_in_lock_holds_cover_a_large_shard_exactly() {
    let ct = Conntrack::new(&Config {
        shards: 1,
        max_entries: 5000,
        ..cfg()
    });
    let flows = udp_flows(&ct, 0, 4100);
    assert_eq!(ct.count_where(t(1), |_| true), 4100);
    assert_eq!(ct.state_counts(t(1)).udp, 4100);
    assert_eq!(
        ct.count_where(t(1), |i| i.tuple.src_port % 2 == 0),
        flows.iter().filter(|f| f.src_port % 2 == 0).count() as u64
    );
    // One page asks for more than PAGE_TAKE: it is still filled to its limit.
    let first = ct.snapshots_page(ListCursor::default(), 1000, t(1), |_| true);
    assert_eq!(first.conns.len(), 1000);
    let listed: usize = all_pages(&ct, 1000, |_| true)
        .iter()
        .map(|p| p.conns.len())
        .sum();
    assert_eq!(listed, 4100);
}

/// Found by the `sync_wire` fuzz target. A bulk page lists only this node's own entries and
/// expectations, never what it learned from its peer: B's bulk used to hand A back A's own
/// connection as B last heard of it. A had reset the connection meanwhile (CLOSE); the echo
/// (SYN_SENT) made A's import "reopen" it, replacing A's own entry by a learned SYN_SENT one
/// (a reset connection resurrected on the node that saw the reset), and B kept its copy.
#[test]
fn a_bulk_lists_only_own_entries_so_a_peer_never_gets_its_own_back_older() {
    let a = Conntrack::new(&cfg());
    let mut f = Flow::v4();
    track(&a, 0, &f.seg(true, S, 0));
    let tuple = tuple_of(&f.seg(true, A, 0));
    let b = Conntrack::new(&cfg());
    transfer(&a, &b, 0, 100);
    assert_eq!(state_of(&b, &tuple), TcpState::SynSent);
    // B also has a connection of its own, and learned expectations of A's FTP session.
    let (ff, m) = ftp_master(&a);
    a.lock(0).expect(t(10), data_expect(m, &ff, 50000)).unwrap();
    transfer(&a, &b, 10, 100);
    assert_eq!(b.expectation_count(), 1);
    let own = build::udp(ip("198.51.100.99"), ip("203.0.113.99"), 5000, 53, b"");
    track(&b, 10, &own);

    // B's bulk carries only B's own connection.
    let page = b.bulk_page(0, 100, t(11), BulkScope::Own);
    assert_eq!(page.next, None);
    assert_eq!(page.conns.len(), 1, "{page:?}");
    assert_eq!(page.conns[0].tuple, tuple_of(&own));
    assert!(page.expects.is_empty(), "{page:?}");
    // For a peer that restarted (and lost its table), what B learned goes back too: the
    // connection, the FTP master and its expectation, and B's own connection.
    let back = b.bulk_page(0, 100, t(11), BulkScope::OwnAndLearned);
    assert_eq!(back.conns.len(), 3, "{back:?}");
    assert!(back.conns.iter().any(|c| c.tuple == tuple));
    assert_eq!(back.expects.len(), 1, "{back:?}");

    // A's connection is reset; B's bulk arrives after: A keeps its own CLOSE entry.
    track(&a, 12, &f.seg(false, R | A, 0));
    assert_eq!(state_of(&a, &tuple), TcpState::Close);
    transfer(&b, &a, 12, 100);
    assert_eq!(state_of(&a, &tuple), TcpState::Close);
    let sh = a.lock(0);
    let st = sh.conn(sh.find(&tuple).unwrap()).unwrap().status;
    assert_eq!(st & status::FROM_PEER, 0, "still A's own");
    drop(sh);
    a.check_invariants().unwrap();
    b.check_invariants().unwrap();
}

/// Found by the `sync_wire` fuzz target: packets refresh a connection's timer here without
/// any state change, and the peer's copy learns timers only from items, so a UDP or ICMP flow
/// kept alive by traffic expired on the standby (a failover then dropped it). The tracker now
/// announces the refresh whenever the expiry crosses a multiple of (about) half the timeout:
/// the copy keeps at least half a timeout while packets flow, for a few updates per timeout.
#[test]
fn a_flow_kept_alive_by_packets_keeps_its_copy_alive_at_the_peer() {
    let a = Conntrack::new(&Config {
        event_queue: 1024,
        ..cfg()
    });
    let b = Conntrack::new(&cfg());
    let (c, s) = (ip("198.51.100.10"), ip("203.0.113.10"));
    let query = build::udp(c, s, 5000, 53, b"q");
    let tuple = tuple_of(&query);
    let mut updates = 0;
    let mut replay = |now: u64| {
        for ev in drain_all(&a) {
            match ev {
                Event::ConnCreated(x) => b.import_conn(t(now), &x).unwrap(),
                Event::ConnUpdated(u) => {
                    updates += 1;
                    b.apply_update(t(now), &u).unwrap()
                }
                other => panic!("{other:?}"),
            }
        }
    };
    track(&a, 0, &query);
    track(&a, 0, &build::udp(s, c, 53, 5000, b"r"));
    replay(0);
    let timeout = Timeouts::default().udp_replied * 1000;
    // Ten timeouts of one query a second, each side reaping as the workers do.
    let end = 10 * timeout;
    for now in (1000..=end).step_by(1000) {
        track(&a, now, &query);
        replay(now);
        a.handle_timeout(t(now), 0, 1, 1024);
        b.handle_timeout(t(now), 0, 1, 1024);
        let sh = b.lock_tuple(&tuple);
        let left = sh
            .find(&tuple)
            .and_then(|id| sh.snapshot(id, t(now)))
            .map(|x| x.expires_in_ms);
        assert!(
            left.is_some_and(|l| l >= timeout / 2),
            "at {now} ms the peer's copy has {left:?} ms left"
        );
    }
    // The state change (SEEN_REPLY, ASSURED) and then two to four refreshes per timeout, not
    // one per packet.
    assert!((20..=45).contains(&updates), "{updates} updates");
    a.check_invariants().unwrap();
    b.check_invariants().unwrap();
}

/// A bulk transfer flips between the "unacknowledged data" timeout (300 s) and the established
/// one (5 days) with nearly every ACK; that is no refresh to announce. Announcing it made an
/// update per packet and kept a busy pair's sync stream from catching up (caught end to end).
#[test]
fn a_bulk_transfer_flipping_timeout_classes_is_not_announced_per_packet() {
    let a = Conntrack::new(&Config {
        event_queue: 4096,
        ..cfg()
    });
    let mut f = Flow::v4();
    handshake(&a, &mut f);
    let _ = drain_all(&a);
    let mut updates = 0;
    for i in 0..2000u64 {
        let now = 10 + i;
        track(&a, now, &f.seg(true, A | P, 100));
        track(&a, now, &f.seg(false, A, 0));
        updates += drain_all(&a)
            .iter()
            .filter(|e| matches!(e, Event::ConnUpdated(_)))
            .count();
    }
    assert!(
        updates <= 2,
        "{updates} updates for 4000 packets of one transfer"
    );
}

/// The peer's copy must not inherit the short "unacknowledged data" timeout: the ACK that
/// lifts it on the master is not announced, so the copy of an FTP control connection idle
/// under a long download expired on the standby after 300 s (found by the HA demo) and the
/// download's final reply was dropped after a failover.
#[test]
fn a_copy_sent_with_data_in_flight_gets_the_states_own_timeout() {
    let a = Conntrack::new(&Config {
        event_queue: 4096,
        ..cfg()
    });
    let mut f = Flow::v4();
    let o = handshake(&a, &mut f);
    drain_all(&a);
    // The server's reply is in flight (unacknowledged): locally the 300 s limit applies.
    track(&a, 10, &f.seg(false, A | P, 100));
    let to = Config::default().timeouts;
    // More data 100 s later, still unacknowledged: the 300 s timer is refreshed, and the update
    // that announces the refresh carries the state's own timeout too.
    track(&a, 100_010, &f.seg(false, A | P, 100));
    let updates: Vec<u64> = drain_all(&a)
        .iter()
        .filter_map(|e| match e {
            Event::ConnUpdated(u) => Some(u.expires_in_ms),
            _ => None,
        })
        .collect();
    assert_eq!(updates, vec![to.tcp_established * 1000]);
    let sh = a.lock(0);
    let id = o.conn.unwrap();
    let listed = sh.snapshots(t(100_010)).next().unwrap();
    assert_eq!(
        listed.expires_in_ms,
        to.tcp_unacknowledged * 1000,
        "listing shows the real timer"
    );
    let copy = sh.snapshot(id, t(100_010)).unwrap();
    assert_eq!(
        copy.expires_in_ms,
        to.tcp_established * 1000,
        "the peer's copy would expire 300 s after the last packet"
    );
}

/// Every event queued in every shard.
fn drain_events(ct: &Conntrack) -> Vec<Event> {
    let mut v = Vec::new();
    for i in 0..ct.shard_count() {
        let mut sh = ct.lock(i);
        v.extend(std::iter::from_fn(|| sh.poll_event()));
    }
    v
}

fn killed(evs: &[Event]) -> Vec<Tuple> {
    evs.iter()
        .filter_map(|e| match e {
            Event::ConnDestroyed {
                tuple,
                reason: DestroyReason::Killed,
            } => Some(*tuple),
            _ => None,
        })
        .collect()
}

/// `fwctl ct delete`: the matching connections go with their expectations, over every shard,
/// each announced as killed; the others stay.
#[test]
fn delete_where_kills_the_matches_and_their_expectations() {
    let ct = Conntrack::new(&Config { shards: 8, ..cfg() });
    // An FTP control connection (in whichever shard its addresses hash to) announcing two
    // data connections.
    let mut f = Flow {
        sp: 21,
        ..Flow::v4()
    };
    let o = track(&ct, 0, &f.seg(true, S, 0));
    track(&ct, 1, &f.seg(false, S | A, 0));
    track(&ct, 2, &f.seg(true, A, 0));
    let m = o.conn.unwrap();
    {
        let mut sh = ct.lock_tuple(&Tuple::new(f.c, f.s, f.cp, f.sp, proto::TCP));
        sh.expect(t(10), data_expect(m, &f, 50000)).unwrap();
        sh.expect(t(10), data_expect(m, &f, 50001)).unwrap();
    }
    let flows = udp_flows(&ct, 10, 20);
    let mut web = Flow {
        cp: 40001,
        ..Flow::v4()
    };
    track(&ct, 10, &web.seg(true, S, 0));
    track(&ct, 10, &web.seg(false, S | A, 0));
    track(&ct, 10, &web.seg(true, A, 0));
    assert_eq!((ct.len(), ct.expectation_count()), (22, 2));
    drain_events(&ct);

    // Nothing matches: nothing goes, nothing is announced.
    assert_eq!(ct.delete_where(t(20), |c| c.tuple.dst_port == 9), (0, 0));
    assert!(drain_events(&ct).is_empty());

    // The FTP control connection and its two expectations.
    assert_eq!(ct.delete_where(t(20), |c| c.tuple.dst_port == 21), (1, 2));
    assert_eq!((ct.len(), ct.expectation_count()), (21, 0));
    let evs = drain_events(&ct);
    assert_eq!(killed(&evs).len(), 1, "{evs:?}");
    let gone = evs
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::ExpectDestroyed {
                    reason: ExpectEnd::MasterGone,
                    ..
                }
            )
        })
        .count();
    assert_eq!(gone, 2, "{evs:?}");

    // Five UDP flows by source port, over several shards.
    let want: Vec<Tuple> = flows[..5].to_vec();
    let n = ct.delete_where(t(20), |c| want.contains(&c.tuple));
    assert_eq!(n, (5, 0));
    let mut k = killed(&drain_events(&ct));
    k.sort_by_key(|t| t.src_port);
    assert_eq!(k, want);
    for tu in &flows[..5] {
        assert!(ct.lock_tuple(tu).find(tu).is_none());
    }
    for tu in &flows[5..] {
        assert!(ct.lock_tuple(tu).find(tu).is_some());
    }
    // The TCP session; its next segment finds no connection (pickup is off): INVALID.
    assert_eq!(
        ct.delete_where(t(21), |c| c.tuple.proto == proto::TCP),
        (1, 0)
    );
    invalid(
        &track(&ct, 22, &web.seg(true, A, 10)),
        InvalidReason::TcpNoConnection,
    );
    // Everything else.
    assert_eq!(ct.delete_where(t(22), |_| true), (15, 0));
    assert!(ct.is_empty());
    ct.check_invariants().unwrap();
}

/// A delete on the node that only learned a connection announces the kill too (a timeout of
/// a learned entry announces nothing); the receiving end removes its entry whoever owns it
/// (`kill_conn`), while `remove_conn` (a plain ConnGone) leaves what is used here.
#[test]
fn a_kill_reaches_learned_entries_and_removes_owned_ones_on_the_peer() {
    let a = Conntrack::new(&cfg());
    let flows = udp_flows(&a, 0, 3);
    let b = Conntrack::new(&cfg());
    transfer(&a, &b, 1, 100);
    drain_events(&a);
    assert!(drain_events(&b).is_empty(), "imports announce nothing");

    // b only learned flow 0 (FROM_PEER); its operator deletes it: announced as a kill.
    assert_eq!(b.delete_where(t(2), |c| c.tuple == flows[0]), (1, 0));
    assert_eq!(killed(&drain_events(&b)), vec![flows[0]]);
    // a (the owner) gets the kill: its own entry goes, announced as an ordinary end.
    assert!(a.kill_conn(&flows[0]));
    let evs = drain_events(&a);
    assert_eq!(
        evs,
        vec![Event::ConnDestroyed {
            tuple: flows[0],
            reason: DestroyReason::Removed,
        }]
    );
    // A plain ConnGone does not remove what a owns (the negative control)...
    assert!(!a.remove_conn(&flows[1]));
    assert!(a.lock_tuple(&flows[1]).find(&flows[1]).is_some());
    // ...a kill does, seen either way round; a learned entry goes quietly.
    assert!(a.kill_conn(&flows[1].reverse()));
    assert!(a.lock_tuple(&flows[1]).find(&flows[1]).is_none());
    drain_events(&a);
    assert!(b.kill_conn(&flows[2]));
    assert!(drain_events(&b).is_empty(), "no echo for a learned entry");
    assert!(!b.kill_conn(&flows[2]), "already gone");
    a.check_invariants().unwrap();
    b.check_invariants().unwrap();
}
