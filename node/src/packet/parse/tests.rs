use std::net::IpAddr;

use proptest::prelude::*;

use super::*;
use crate::packet::build::{self, TcpSpec};

fn a(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn syn() -> Vec<u8> {
    let mut t = TcpSpec::new(40000, 80, TcpFlags::SYN);
    t.seq = 1000;
    t.wscale = Some(7);
    build::tcp(a("198.51.100.10"), a("203.0.113.10"), &t)
}

#[test]
fn tcp_syn_v4_with_options() {
    let b = syn();
    let p = Packet::parse(&b).unwrap();
    assert_eq!(p.family, Family::V4);
    assert_eq!(p.src, a("198.51.100.10"));
    assert_eq!(p.proto, proto::TCP);
    let L4::Tcp(t) = p.l4 else { panic!("not tcp") };
    assert_eq!((t.src_port, t.dst_port, t.seq), (40000, 80, 1000));
    assert!(t.flags.syn() && !t.flags.ack());
    assert_eq!(t.options.window_scale, Some(7));
    assert_eq!(t.options.mss, Some(1460));
    assert_eq!(t.payload_len, 0);
    assert!(p.fragment.is_none());
}

#[test]
fn tcp_data_v6() {
    let mut t = TcpSpec::new(1, 2, TcpFlags::ACK | TcpFlags::PSH);
    t.payload = b"hello".to_vec();
    let b = build::tcp(a("2001:db8:1::10"), a("2001:db8:2::10"), &t);
    let p = Packet::parse(&b).unwrap();
    assert_eq!(p.family, Family::V6);
    let L4::Tcp(t) = p.l4 else { panic!() };
    assert_eq!(t.payload, b"hello");
    assert_eq!(t.payload_len, 5);
    assert_eq!(t.options, TcpOptions::default());
}

#[test]
fn truncated_capture_keeps_real_payload_length() {
    let mut t = TcpSpec::new(1, 2, TcpFlags::ACK);
    t.payload = vec![7; 1000];
    let b = build::tcp(a("198.51.100.10"), a("203.0.113.10"), &t);
    let p = Packet::parse_truncated(&b[..64], b.len() as u32).unwrap();
    let L4::Tcp(t) = p.l4 else { panic!() };
    assert_eq!(t.payload_len, 1000);
    assert_eq!(t.payload.len(), 64 - 40);
    // Headers cut by the capture are an error, not a guess.
    assert_eq!(
        Packet::parse_truncated(&b[..30], b.len() as u32).unwrap_err(),
        ParseError::Truncated(Layer::Tcp)
    );
}

#[test]
fn trailing_bytes_beyond_ip_length_are_ignored() {
    let mut b = build::udp(a("198.51.100.10"), a("203.0.113.10"), 5, 6, b"abc");
    b.extend_from_slice(&[0; 10]);
    let p = Packet::parse(&b).unwrap();
    let L4::Udp(u) = p.l4 else { panic!() };
    assert_eq!(u.payload, b"abc");
}

#[test]
fn ip_errors() {
    assert_eq!(Packet::parse(&[]).unwrap_err(), ParseError::Empty);
    assert_eq!(
        Packet::parse(&[0x55; 40]).unwrap_err(),
        ParseError::BadVersion(5)
    );
    assert_eq!(
        Packet::parse(&[0x45; 10]).unwrap_err(),
        ParseError::Truncated(Layer::Ip)
    );
    let mut b = syn();
    b[0] = 0x44;
    assert_eq!(Packet::parse(&b).unwrap_err(), ParseError::BadIhl);
    let mut b = syn();
    b[0] = 0x4f; // 60-byte header in a 44-byte packet
    assert_eq!(
        Packet::parse(&b).unwrap_err(),
        ParseError::Truncated(Layer::Ip)
    );
    let mut b = syn();
    b[2] = 0xff; // total length beyond the packet
    assert_eq!(Packet::parse(&b).unwrap_err(), ParseError::BadTotalLength);
    let mut b = syn();
    b[2] = 0;
    b[3] = 0; // total length 0
    assert_eq!(Packet::parse(&b).unwrap_err(), ParseError::BadTotalLength);
    let mut b = build::udp(a("2001:db8:1::10"), a("2001:db8:2::10"), 5, 6, b"abc");
    b[5] = 200; // payload length beyond the packet
    assert_eq!(Packet::parse(&b).unwrap_err(), ParseError::BadTotalLength);
}

#[test]
fn tcp_errors() {
    let mut b = syn();
    b[20 + 12] = 0x40; // data offset 16 bytes
    assert_eq!(Packet::parse(&b).unwrap_err(), ParseError::BadDataOffset);
    let mut b = syn();
    b[20 + 12] = 0xf0; // 60 bytes, beyond the segment
    assert_eq!(Packet::parse(&b).unwrap_err(), ParseError::BadDataOffset);
    let mut b = syn();
    b[40 + 1] = 9; // MSS option with a length running past the options
    assert_eq!(Packet::parse(&b).unwrap_err(), ParseError::BadTcpOption);
    let mut b = syn();
    b[40 + 1] = 3; // MSS option with a wrong length
    assert_eq!(Packet::parse(&b).unwrap_err(), ParseError::BadTcpOption);
    let b = &syn()[..30];
    let mut b = b.to_vec();
    b[2] = 0;
    b[3] = 30;
    assert_eq!(
        Packet::parse(&b).unwrap_err(),
        ParseError::Truncated(Layer::Tcp)
    );
}

#[test]
fn udp_length_must_match() {
    let mut b = build::udp(a("198.51.100.10"), a("203.0.113.10"), 5, 6, b"abc");
    b[20 + 5] = 9;
    assert_eq!(Packet::parse(&b).unwrap_err(), ParseError::BadUdpLength);
    b[20 + 5] = 7;
    assert_eq!(Packet::parse(&b).unwrap_err(), ParseError::BadUdpLength);
}

#[test]
fn fragments_are_flagged() {
    let mut b = build::udp(a("198.51.100.10"), a("203.0.113.10"), 5, 6, &[1; 100]);
    b[6] = 0x20; // MF, offset 0: first fragment, full UDP header present
    let p = Packet::parse(&b).unwrap();
    assert_eq!(
        p.fragment,
        Some(Fragment {
            offset: 0,
            more_fragments: true,
            id: 0x1234
        })
    );
    assert!(matches!(p.l4, L4::Udp(_)));
    b[6] = 0x00;
    b[7] = 0x10; // offset 128 bytes, last fragment: no L4 header
    let p = Packet::parse(&b).unwrap();
    assert_eq!(
        p.fragment,
        Some(Fragment {
            offset: 128,
            more_fragments: false,
            id: 0x1234
        })
    );
    assert!(matches!(p.l4, L4::Other { .. }));
}

#[test]
fn tiny_first_fragment_is_rejected() {
    // A first fragment carrying only 8 bytes of a TCP header (RFC 1858).
    let full = syn();
    let mut b = full[..28].to_vec();
    b[2] = 0;
    b[3] = 28;
    b[6] = 0x20;
    assert_eq!(Packet::parse(&b).unwrap_err(), ParseError::TinyFragment);
}

#[test]
fn ipv6_extension_headers_and_fragment() {
    let udp = build::udp(a("2001:db8:1::10"), a("2001:db8:2::10"), 5, 6, b"xyz");
    let l4 = &udp[40..];
    // hop-by-hop (8 bytes) then fragment header (offset 0, M=1) then UDP.
    let mut ext = vec![44, 0, 1, 4, 0, 0, 0, 0];
    ext.extend_from_slice(&[17, 0, 0, 1, 0, 0, 0, 9]);
    ext.extend_from_slice(l4);
    let mut b = build::ip(a("2001:db8:1::10"), a("2001:db8:2::10"), 0, &ext);
    let p = Packet::parse(&b).unwrap();
    assert_eq!(p.proto, proto::UDP);
    assert_eq!(
        p.fragment,
        Some(Fragment {
            offset: 0,
            more_fragments: true,
            id: 9
        })
    );
    assert!(matches!(p.l4, L4::Udp(_)));
    // A chain longer than the bound is refused.
    let mut long = vec![];
    for _ in 0..9 {
        long.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]);
    }
    long.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
    b = build::ip(a("2001:db8:1::10"), a("2001:db8:2::10"), 60, &long);
    assert_eq!(
        Packet::parse(&b).unwrap_err(),
        ParseError::TooManyExtHeaders
    );
}

#[test]
fn icmp_echo_and_errors() {
    let e = build::echo(a("198.51.100.10"), a("203.0.113.10"), false, 77, 1);
    let L4::Icmp(i) = Packet::parse(&e).unwrap().l4 else {
        panic!()
    };
    assert!(matches!(i.kind, IcmpKind::EchoRequest { id: 77, seq: 1 }));
    let e6 = build::echo(a("2001:db8:2::10"), a("2001:db8:1::10"), true, 78, 2);
    let L4::Icmp(i) = Packet::parse(&e6).unwrap().l4 else {
        panic!()
    };
    assert!(matches!(i.kind, IcmpKind::EchoReply { id: 78, seq: 2 }));

    let offending = build::udp(a("198.51.100.10"), a("203.0.113.10"), 5000, 53, b"q");
    let err = build::icmp_error(a("203.0.113.10"), a("198.51.100.10"), 3, 3, &offending);
    let L4::Icmp(i) = Packet::parse(&err).unwrap().l4 else {
        panic!()
    };
    let IcmpKind::Error(inner) = i.kind else {
        panic!()
    };
    assert_eq!(inner.src, a("198.51.100.10"));
    assert_eq!(inner.proto, proto::UDP);
    assert_eq!(
        inner.l4,
        InnerL4::Ports {
            src_port: 5000,
            dst_port: 53,
            tcp_seq: 0
        }
    );

    let mut t = TcpSpec::new(1234, 80, TcpFlags::SYN);
    t.seq = 99;
    let off6 = build::tcp(a("2001:db8:1::10"), a("2001:db8:2::10"), &t);
    let err6 = build::icmp_error(a("2001:db8:2::1"), a("2001:db8:1::10"), 1, 4, &off6);
    let L4::Icmp(i) = Packet::parse(&err6).unwrap().l4 else {
        panic!()
    };
    let IcmpKind::Error(inner) = i.kind else {
        panic!()
    };
    assert_eq!(
        inner.l4,
        InnerL4::Ports {
            src_port: 1234,
            dst_port: 80,
            tcp_seq: 99
        }
    );

    // An error quoting an error is malformed; so is a quote too short for the ports.
    let err_of_err = build::icmp_error(a("198.51.100.1"), a("203.0.113.10"), 3, 1, &err);
    assert_eq!(
        Packet::parse(&err_of_err).unwrap_err(),
        ParseError::BadIcmpInner
    );
    let short = build::icmp(
        a("203.0.113.10"),
        a("198.51.100.10"),
        3,
        3,
        [0; 4],
        &offending[..22],
    );
    assert_eq!(Packet::parse(&short).unwrap_err(), ParseError::BadIcmpInner);
}

#[test]
fn counter_indices_are_dense_and_named() {
    let all = [
        ParseError::Empty,
        ParseError::BadVersion(0),
        ParseError::Truncated(Layer::Ip),
        ParseError::BadIhl,
        ParseError::BadTotalLength,
        ParseError::TinyFragment,
        ParseError::TooManyExtHeaders,
        ParseError::BadDataOffset,
        ParseError::BadTcpOption,
        ParseError::BadUdpLength,
        ParseError::BadIcmpInner,
    ];
    let mut seen = [false; Malformed::COUNT];
    for e in all {
        seen[e.reason() as usize] = true;
    }
    assert!(seen.iter().all(|&s| s));
}

fn samples() -> Vec<Vec<u8>> {
    let mut t = TcpSpec::new(1, 2, TcpFlags::ACK);
    t.payload = b"data".to_vec();
    let off = build::udp(a("198.51.100.10"), a("203.0.113.10"), 5000, 53, b"q");
    vec![
        syn(),
        build::tcp(a("2001:db8:1::10"), a("2001:db8:2::10"), &t),
        off.clone(),
        build::echo(a("198.51.100.10"), a("203.0.113.10"), false, 1, 1),
        build::icmp_error(a("203.0.113.10"), a("198.51.100.10"), 3, 3, &off),
    ]
}

fn payload_within(p: &Packet, data: &[u8]) -> bool {
    let within = |s: &[u8]| {
        let (b, e) = (data.as_ptr() as usize, data.as_ptr() as usize + data.len());
        s.is_empty() || (s.as_ptr() as usize >= b && s.as_ptr() as usize + s.len() <= e)
    };
    match p.l4 {
        L4::Tcp(t) => within(t.payload),
        L4::Udp(u) => within(u.payload),
        L4::Icmp(Icmp {
            kind: IcmpKind::Other { body },
            ..
        }) => within(body),
        L4::Icmp(_) => true,
        L4::Other { payload } => within(payload),
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200), extra in 0u32..2000) {
        if let Ok(p) = Packet::parse(&data) {
            prop_assert!(payload_within(&p, &data));
        }
        let _ = Packet::parse_truncated(&data, data.len() as u32 + extra);
    }

    #[test]
    fn mutated_valid_packets_never_panic(which in 0usize..5, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6), cut in any::<usize>()) {
        let mut b = samples()[which].clone();
        for (i, v) in flips {
            let n = b.len();
            b[i % n] = v;
        }
        let cut = cut % (b.len() + 1);
        if let Ok(p) = Packet::parse(&b[..cut]) {
            prop_assert!(payload_within(&p, &b[..cut]));
        }
        if let Ok(p) = Packet::parse_truncated(&b[..cut], b.len() as u32) {
            prop_assert!(payload_within(&p, &b[..cut]));
        }
    }
}

/// AH's length counts 4-octet units minus 2 (RFC 4302); Mobility, HIP and Shim6 use the
/// common extension format (RFC 7045). Read wrongly, the TCP header would be looked for in
/// the wrong place and the packet judged by garbage ports.
#[test]
fn ipv6_ah_mobility_hip_and_shim6_headers_are_walked() {
    let mut t = TcpSpec::new(40000, 443, TcpFlags::SYN);
    t.seq = 7;
    let tcp = build::tcp(a("2001:db8:1::10"), a("2001:db8:2::10"), &t);
    let l4 = &tcp[40..];
    // AH with a 12-byte ICV: payload length field 4 → (4 + 2) * 4 = 24 bytes.
    let mut ah = vec![135, 4, 0, 0];
    ah.extend_from_slice(&[0; 20]);
    // Mobility (8 bytes) → HIP (16 bytes) → Shim6 (8 bytes) → TCP.
    let mut chain = ah;
    chain.extend_from_slice(&[139, 0, 0, 0, 0, 0, 0, 0]);
    chain.extend_from_slice(&[140, 1]);
    chain.extend_from_slice(&[0; 14]);
    chain.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 0]);
    chain.extend_from_slice(l4);
    let b = build::ip(a("2001:db8:1::10"), a("2001:db8:2::10"), 51, &chain);
    let p = Packet::parse(&b).unwrap();
    assert_eq!(p.proto, proto::TCP);
    let L4::Tcp(t) = p.l4 else { panic!("not tcp") };
    assert_eq!((t.src_port, t.dst_port, t.seq), (40000, 443, 7));
    // A chain cut inside AH is truncated, not misread.
    let cut = build::ip(a("2001:db8:1::10"), a("2001:db8:2::10"), 51, &chain[..20]);
    assert_eq!(
        Packet::parse(&cut).unwrap_err(),
        ParseError::Truncated(Layer::Ipv6Ext)
    );
}

/// BIG TCP: GSO packets over 64 KiB have IPv4 total length 0 / IPv6 payload length 0; the
/// wire length is their real length (as Linux's iph_totlen / ipv6_payload_len).
#[test]
fn big_tcp_packets_take_their_length_from_the_wire() {
    for (src, dst) in [
        (a("198.51.100.10"), a("203.0.113.10")),
        (a("2001:db8:1::10"), a("2001:db8:2::10")),
    ] {
        let mut t = TcpSpec::new(1, 2, TcpFlags::ACK);
        t.payload = vec![1; 100];
        let mut b = build::tcp(src, dst, &t);
        let len_at = if src.is_ipv4() { 2 } else { 4 };
        b[len_at] = 0;
        b[len_at + 1] = 0;
        let wire = 70_000u32;
        let p = Packet::parse_truncated(&b, wire).unwrap();
        let L4::Tcp(t) = p.l4 else { panic!("not tcp") };
        let ip_hdr = if src.is_ipv4() { 20 } else { 40 };
        assert_eq!(t.payload_len, wire - ip_hdr - 20, "{src}");
        // Length 0 on a packet that fits 64 KiB is still malformed.
        assert!(
            Packet::parse_truncated(&b, b.len() as u32).is_err(),
            "{src}"
        );
    }
}
