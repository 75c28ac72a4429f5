//! Builders of raw IP packets for tests, benchmarks, fuzz seeds and the takeover nudge's
//! probes (`datapath::nudge`, sent through a raw socket).
//!
//! Owns only byte assembly of well-formed IPv4/IPv6 + TCP/UDP/ICMP packets, with correct
//! transport checksums (the IPv4 header checksum is left zero: the kernel fills it in for a raw
//! socket and checks it on input, not us). Not used on the packet path; allocates freely.

use std::net::IpAddr;

use super::proto;

/// A TCP segment description.
#[derive(Clone, Debug)]
pub struct TcpSpec {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// Window scale option (only emitted on SYN).
    pub wscale: Option<u8>,
    /// SACK-permitted option (only emitted on SYN).
    pub sack_perm: bool,
    /// SACK blocks `(left, right)` (only emitted without SYN).
    pub sack: Vec<(u32, u32)>,
    pub payload: Vec<u8>,
}

impl TcpSpec {
    pub fn new(sport: u16, dport: u16, flags: u8) -> Self {
        TcpSpec {
            sport,
            dport,
            seq: 0,
            ack: 0,
            flags,
            window: 65535,
            wscale: None,
            sack_perm: false,
            sack: vec![],
            payload: vec![],
        }
    }
}

/// An IP header around `l4` (`proto` is the upper-layer protocol): IPv4 when both addresses
/// are, else IPv6 (an IPv4 address as IPv4-mapped).
pub fn ip(src: IpAddr, dst: IpAddr, protocol: u8, l4: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = (20 + l4.len()) as u16;
            let mut p = vec![0x45, 0];
            p.extend_from_slice(&total.to_be_bytes());
            p.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, protocol, 0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(l4);
            super::checksum::fill(&mut p);
            p
        }
        (s, d) => {
            let mut p = vec![0x60, 0, 0, 0];
            p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            p.extend_from_slice(&[protocol, 64]);
            p.extend_from_slice(&v6(s).octets());
            p.extend_from_slice(&v6(d).octets());
            p.extend_from_slice(l4);
            super::checksum::fill(&mut p);
            p
        }
    }
}

fn v6(a: IpAddr) -> std::net::Ipv6Addr {
    match a {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}

pub fn tcp_segment(t: &TcpSpec) -> Vec<u8> {
    let mut opts = vec![];
    if t.flags & 0x02 != 0 {
        opts.extend_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
        if let Some(ws) = t.wscale {
            opts.extend_from_slice(&[1, 3, 3, ws]);
        }
        if t.sack_perm {
            opts.extend_from_slice(&[1, 1, 4, 2]);
        }
    } else if !t.sack.is_empty() {
        opts.extend_from_slice(&[1, 1, 5, (2 + 8 * t.sack.len()) as u8]);
        for (l, r) in &t.sack {
            opts.extend_from_slice(&l.to_be_bytes());
            opts.extend_from_slice(&r.to_be_bytes());
        }
    }
    let doff = ((20 + opts.len()) / 4) as u8;
    let mut s = vec![];
    s.extend_from_slice(&t.sport.to_be_bytes());
    s.extend_from_slice(&t.dport.to_be_bytes());
    s.extend_from_slice(&t.seq.to_be_bytes());
    s.extend_from_slice(&t.ack.to_be_bytes());
    s.extend_from_slice(&[doff << 4, t.flags]);
    s.extend_from_slice(&t.window.to_be_bytes());
    s.extend_from_slice(&[0, 0, 0, 0]);
    s.extend_from_slice(&opts);
    s.extend_from_slice(&t.payload);
    s
}

pub fn tcp(src: IpAddr, dst: IpAddr, t: &TcpSpec) -> Vec<u8> {
    ip(src, dst, proto::TCP, &tcp_segment(t))
}

pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut s = vec![];
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(payload);
    ip(src, dst, proto::UDP, &s)
}

fn icmp_proto(src: IpAddr) -> u8 {
    if src.is_ipv4() {
        proto::ICMP
    } else {
        proto::ICMPV6
    }
}

/// An ICMP/ICMPv6 message of type `ty`/`code` with a 4-byte rest-of-header and a body.
pub fn icmp(src: IpAddr, dst: IpAddr, ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut s = vec![ty, code, 0, 0];
    s.extend_from_slice(&rest);
    s.extend_from_slice(body);
    ip(src, dst, icmp_proto(src), &s)
}

/// An echo request (`reply == false`) or reply with identifier `id`.
pub fn echo(src: IpAddr, dst: IpAddr, reply: bool, id: u16, seq: u16) -> Vec<u8> {
    let ty = match (src.is_ipv4(), reply) {
        (true, false) => 8,
        (true, true) => 0,
        (false, false) => 128,
        (false, true) => 129,
    };
    let mut rest = [0; 4];
    rest[..2].copy_from_slice(&id.to_be_bytes());
    rest[2..].copy_from_slice(&seq.to_be_bytes());
    icmp(src, dst, ty, 0, rest, b"ping")
}

/// An ICMP error of type/code from `src` to `dst` quoting the first bytes of `offending`.
pub fn icmp_error(src: IpAddr, dst: IpAddr, ty: u8, code: u8, offending: &[u8]) -> Vec<u8> {
    let hdr = if offending.first().is_some_and(|b| b >> 4 == 4) {
        usize::from(offending[0] & 0xf) * 4
    } else {
        40
    };
    let quote = &offending[..offending.len().min(hdr + 8)];
    icmp(src, dst, ty, code, [0; 4], quote)
}
