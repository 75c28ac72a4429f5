#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;

use super::*;
use crate::conntrack::tcp::{SeqNumber, TcpConn, TcpState};
use crate::packet::build::{self, TcpSpec};
use crate::packet::checksum::{self, Checksum};

const CLIENT: &str = "198.51.100.10";
const SERVER: &str = "203.0.113.10";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An established connection client:40000 → server:5201 whose table copy last saw
/// sequence numbers 1000 (client → server) and 9000 (server → client).
fn conn(client: &str, server: &str, state: TcpState) -> (Tuple, TcpConn) {
    let t = Tuple::new(ip(client), ip(server), 40000, 5201, proto::TCP);
    let mut c = TcpConn::default();
    c.state.set(state);
    c.dir[0].end = SeqNumber(1000);
    c.dir[1].end = SeqNumber(9000);
    (t, c)
}

fn drain(n: &mut Nudger, now: Timestamp) -> Vec<Transmit> {
    std::iter::from_fn(|| n.poll_transmit(now)).collect()
}

/// A bare ACK from `src:sport` to `dst:dport` with sequence number `seq`.
fn bare_ack(src: &str, dst: &str, sport: u16, dport: u16, seq: u32) -> Vec<u8> {
    let mut s = TcpSpec::new(sport, dport, TcpFlags::ACK);
    s.seq = seq;
    s.ack = 77;
    build::tcp(ip(src), ip(dst), &s)
}

fn answer(n: &mut Nudger, now: Timestamp, bytes: &[u8]) -> bool {
    let p = Packet::parse(bytes).unwrap();
    n.handle_answer(now, &p, bytes)
}

const T0: Timestamp = Timestamp::from_millis(10_000);

#[test]
fn a_takeover_probes_both_endpoints_with_a_bare_ack_outside_their_window() {
    let mut n = Nudger::new(1499);
    n.handle_takeover(T0, [conn(CLIENT, SERVER, TcpState::Established)], 0);
    let out = drain(&mut n, T0);
    assert_eq!(out.len(), 2);
    let mut seen = vec![];
    for t in &out {
        let Transmit::Probe { to, packet } = t else {
            panic!("expected probes first, got {t:?}")
        };
        let p = Packet::parse(packet).unwrap();
        assert_eq!(checksum::check(&p, packet), Checksum::Good);
        assert_eq!(p.dst, *to);
        let L4::Tcp(tcp) = p.l4 else { panic!() };
        assert_eq!(tcp.flags.0, TcpFlags::ACK);
        assert_eq!(tcp.payload_len, 0);
        assert_ne!(tcp.window, 0, "a probe must never close the window");
        seen.push((p.src, p.dst, tcp.seq, tcp.ack));
    }
    // To the server as from the client, and the other way; each half the sequence space away
    // from what the table saw in that direction.
    assert!(seen.contains(&(ip(CLIENT), ip(SERVER), 1000 + (1 << 31), 9000 + (1 << 31))));
    assert!(seen.contains(&(ip(SERVER), ip(CLIENT), 9000 + (1 << 31), 1000 + (1 << 31))));
    assert_eq!(n.counters().probes, 2);
}

#[test]
fn only_established_tcp_connections_are_probed() {
    let mut n = Nudger::new(1499);
    let (mut udp, c) = conn(CLIENT, SERVER, TcpState::Established);
    udp.proto = proto::UDP;
    n.handle_takeover(
        T0,
        [
            conn(CLIENT, SERVER, TcpState::SynSent),
            conn(CLIENT, SERVER, TcpState::TimeWait),
            (udp, c),
        ],
        0,
    );
    assert!(drain(&mut n, T0).is_empty());
}

#[test]
fn an_answer_gets_a_too_big_quoting_its_own_header_once() {
    let mut n = Nudger::new(1499);
    n.handle_takeover(T0, [conn(CLIENT, SERVER, TcpState::Established)], 0);
    let _ = drain(&mut n, T0);
    let now = T0.plus(std::time::Duration::from_millis(5));
    // The client answers its probe: a bare ACK carrying its snd_nxt.
    let a = bare_ack(CLIENT, SERVER, 40000, 5201, 123_456);
    assert!(answer(&mut n, now, &a));
    let out = drain(&mut n, now);
    let [Transmit::TooBig { to, message }] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(*to, ip(CLIENT));
    assert_eq!(
        &message[..2],
        &[3, 4],
        "destination unreachable, fragmentation needed"
    );
    assert_eq!(u16::from_be_bytes([message[6], message[7]]), 1499);
    assert_eq!(&message[8..], &a[..28], "the IP header and 8 bytes of TCP");
    assert_eq!(
        u32::from_be_bytes(message[8 + 24..8 + 28].try_into().unwrap()),
        123_456
    );
    assert_eq!(checksum::icmpv4(message), 0, "the checksum is right");
    // Once per endpoint and takeover.
    assert!(!answer(&mut n, now, &a));
    assert_eq!(n.counters().answers, 1);
    assert_eq!(n.counters().too_big, 1);
}

#[test]
fn what_is_no_answer_gets_nothing() {
    let mut n = Nudger::new(1499);
    let a = bare_ack(CLIENT, SERVER, 40000, 5201, 5);
    // No takeover yet.
    assert!(!answer(&mut n, T0, &a));
    n.handle_takeover(T0, [conn(CLIENT, SERVER, TcpState::Established)], 0);
    // Not probed yet.
    assert!(!answer(&mut n, T0, &a));
    let _ = drain(&mut n, T0);
    // Another endpoint, another port, a segment with data, a SYN: not answers.
    assert!(!answer(
        &mut n,
        T0,
        &bare_ack("198.51.100.11", SERVER, 40000, 5201, 5)
    ));
    assert!(!answer(
        &mut n,
        T0,
        &bare_ack(CLIENT, SERVER, 40001, 5201, 5)
    ));
    let mut data = TcpSpec::new(40000, 5201, TcpFlags::ACK);
    data.payload = b"x".to_vec();
    assert!(!answer(
        &mut n,
        T0,
        &build::tcp(ip(CLIENT), ip(SERVER), &data)
    ));
    let syn = TcpSpec::new(40000, 5201, TcpFlags::SYN | TcpFlags::ACK);
    assert!(!answer(
        &mut n,
        T0,
        &build::tcp(ip(CLIENT), ip(SERVER), &syn)
    ));
    // Too late.
    let late = Timestamp::from_millis(T0.as_millis() + SPAN_MS + ANSWER_GRACE_MS);
    assert!(!n.listening(late));
    assert!(!answer(&mut n, late, &a));
    assert!(drain(&mut n, late).is_empty());
    // The positive case, for contrast.
    assert!(answer(&mut n, T0, &a));
}

#[test]
fn ipv6_probes_and_packet_too_big() {
    let mut n = Nudger::new(1000);
    n.handle_takeover(
        T0,
        [conn(
            "2001:db8:1::10",
            "2001:db8:2::10",
            TcpState::Established,
        )],
        0,
    );
    let out = drain(&mut n, T0);
    assert_eq!(out.len(), 2);
    for t in &out {
        let Transmit::Probe { packet, .. } = t else {
            panic!()
        };
        let p = Packet::parse(packet).unwrap();
        assert_eq!(checksum::check(&p, packet), Checksum::Good);
    }
    let a = bare_ack("2001:db8:2::10", "2001:db8:1::10", 5201, 40000, 42);
    assert!(answer(&mut n, T0, &a));
    let out = drain(&mut n, T0);
    let [Transmit::TooBig { to, message }] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(*to, ip("2001:db8:2::10"));
    assert_eq!(message[0], 2, "packet too big");
    assert_eq!(
        u32::from_be_bytes(message[4..8].try_into().unwrap()),
        1280,
        "never below the IPv6 minimum MTU"
    );
    assert_eq!(&message[8..], &a[..48]);
}

#[test]
fn probes_are_paced_and_bounded() {
    let mut n = Nudger::new(1499);
    let many = (0..MAX_CONNECTIONS as u16 + 3).map(|i| {
        let (mut t, c) = conn(CLIENT, SERVER, TcpState::Established);
        t.src_port = i;
        (t, c)
    });
    n.handle_takeover(T0, many, 10);
    assert_eq!(n.counters().skipped, 2 * (3 + 10));
    // RATE per second: RATE / 1000 in the first millisecond, then the next batch.
    assert_eq!(drain(&mut n, T0).len() as u64, RATE / 1000);
    let next = n.poll_timeout().unwrap();
    assert_eq!(next, T0.plus(std::time::Duration::from_millis(1)));
    assert_eq!(drain(&mut n, next).len() as u64, RATE / 1000);
    // Whatever is left when the answers stop counting is dropped, counted as skipped.
    let end = n.listen_until();
    n.handle_timeout(end);
    assert!(drain(&mut n, end).is_empty());
    assert_eq!(
        n.counters().probes + n.counters().skipped,
        2 * (MAX_CONNECTIONS as u64 + 3 + 10)
    );
    assert_eq!(n.poll_timeout(), None);
}

#[test]
fn a_second_takeover_replaces_the_first() {
    let mut n = Nudger::new(1499);
    n.handle_takeover(T0, [conn(CLIENT, SERVER, TcpState::Established)], 0);
    let _ = drain(&mut n, T0);
    let later = Timestamp::from_millis(T0.as_millis() + 100);
    n.handle_takeover(later, [], 0);
    assert!(!answer(
        &mut n,
        later,
        &bare_ack(CLIENT, SERVER, 40000, 5201, 5)
    ));
    assert_eq!(n.counters().takeovers, 2);
}
