//! Transport checksums (RFC 1071 ones' complement sum) with the IPv4/IPv6 pseudo-header.
//!
//! Owns: checking a packet's TCP, UDP, ICMP or ICMPv6 checksum when the whole packet was
//! captured, and computing one for a packet fwnode builds. Must not touch: connection state,
//! policy, I/O. Like Linux conntrack, the datapath asks only for packets the kernel has not
//! verified already (NFQUEUE's `NFQA_SKB_CSUM_NOTVERIFIED`); the IPv4 header checksum is
//! always verified by the kernel before the packet reaches any hook, so it is not checked here.
//!
//! Hand-written: it is a dozen lines over a byte slice, on the hot path, and needs the packet's
//! own layout (pseudo-header, extension headers) that the parser already knows.

use std::net::IpAddr;

use super::{proto, Packet, L4};

/// What a checksum check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checksum {
    Good,
    Bad,
    /// Not checkable: the capture holds only part of the packet, a fragment, a protocol
    /// without a checksum we know, or a UDP datagram sent without one (checksum 0).
    Unchecked,
}

/// Sum of 16-bit big-endian words, folded later. Processes 8 bytes per step.
fn sum(mut acc: u64, d: &[u8]) -> u64 {
    let mut chunks = d.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        // Add the two 32-bit halves: no carry is lost in a u64 for any packet size we see.
        acc += (w >> 32) + (w & 0xffff_ffff);
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for c in &mut rest {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = rest.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn pseudo(src: IpAddr, dst: IpAddr, protocol: u8, len: u32) -> u64 {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let acc = sum(sum(0, &s.octets()), &d.octets());
            acc + u64::from(protocol) + u64::from(len)
        }
        (s, d) => {
            let (s, d) = (ip6_octets(s), ip6_octets(d));
            let acc = sum(sum(0, &s), &d);
            acc + u64::from(len >> 16) + u64::from(len & 0xffff) + u64::from(protocol)
        }
    }
}

fn ip6_octets(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

/// Check `pkt`'s transport checksum; `data` is the buffer it was parsed from.
pub fn check(pkt: &Packet, data: &[u8]) -> Checksum {
    let (off, len) = (pkt.l4_offset as usize, pkt.l4_len as usize);
    let Some(seg) = data.get(off..off.saturating_add(len)) else {
        return Checksum::Unchecked; // header-only capture: the payload is not here
    };
    if pkt.fragment.is_some() {
        return Checksum::Unchecked;
    }
    let acc = match pkt.l4 {
        L4::Tcp(_) => pseudo(pkt.src, pkt.dst, proto::TCP, pkt.l4_len),
        L4::Udp(_) => {
            if seg.get(6..8) == Some(&[0, 0]) {
                return Checksum::Unchecked; // sent without a checksum
            }
            pseudo(pkt.src, pkt.dst, proto::UDP, pkt.l4_len)
        }
        L4::Icmp(_) if pkt.proto == proto::ICMPV6 => {
            pseudo(pkt.src, pkt.dst, proto::ICMPV6, pkt.l4_len)
        }
        L4::Icmp(_) => 0, // ICMPv4 has no pseudo-header
        L4::Other { .. } => return Checksum::Unchecked,
    };
    if fold(sum(acc, seg)) == 0xffff {
        Checksum::Good
    } else {
        Checksum::Bad
    }
}

/// The checksum to write into an ICMPv4 message whose checksum field is zero (ICMPv4 has no
/// pseudo-header).
pub fn icmpv4(message: &[u8]) -> u16 {
    !fold(sum(0, message))
}

/// Write the transport checksum of a packet we built (see `build`). Leaves packets it cannot
/// parse alone.
pub(super) fn fill(p: &mut [u8]) {
    let Ok(pkt) = Packet::parse(p) else { return };
    let field = match pkt.l4 {
        L4::Tcp(_) => 16,
        L4::Udp(_) => 6,
        L4::Icmp(_) => 2,
        L4::Other { .. } => return,
    };
    let at = pkt.l4_offset as usize + field;
    let udp = matches!(pkt.l4, L4::Udp(_));
    let (src, dst, protocol, len) = (pkt.src, pkt.dst, pkt.proto, pkt.l4_len);
    let (off, end) = (
        pkt.l4_offset as usize,
        (pkt.l4_offset + pkt.l4_len) as usize,
    );
    let Some(slot) = p.get_mut(at..at + 2) else {
        return;
    };
    slot.copy_from_slice(&[0, 0]);
    let acc = if protocol == proto::ICMP {
        0
    } else {
        pseudo(src, dst, protocol, len)
    };
    let mut c = !fold(sum(acc, p.get(off..end).unwrap_or(&[])));
    if udp && c == 0 {
        c = 0xffff; // RFC 768: zero means "no checksum"
    }
    p[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::build::{self, TcpSpec};
    use crate::packet::TcpFlags;

    fn v4(a: [u8; 4]) -> IpAddr {
        IpAddr::from(a)
    }

    #[test]
    fn built_packets_check_good_and_any_flipped_bit_checks_bad() {
        let c4 = v4([198, 51, 100, 10]);
        let s4 = v4([203, 0, 113, 10]);
        let c6: IpAddr = "2001:db8:1::10".parse().unwrap();
        let s6: IpAddr = "2001:db8:2::10".parse().unwrap();
        let mut t = TcpSpec::new(40000, 80, TcpFlags::ACK | TcpFlags::PSH);
        t.payload = b"GET / HTTP/1.0\r\n\r\n odd".to_vec();
        let packets = [
            build::tcp(c4, s4, &t),
            build::tcp(c6, s6, &t),
            build::udp(c4, s4, 5000, 53, b"query!!"),
            build::udp(c6, s6, 5000, 53, b"query"),
            build::echo(c4, s4, false, 7, 1),
            build::echo(c6, s6, false, 7, 1),
        ];
        for p in &packets {
            let pkt = Packet::parse(p).unwrap();
            assert_eq!(check(&pkt, p), Checksum::Good, "{pkt:?}");
            let l4 = pkt.l4_offset as usize;
            for i in l4..p.len() {
                let mut bad = p.clone();
                bad[i] ^= 0x10;
                let Ok(pkt) = Packet::parse(&bad) else {
                    continue; // the flip broke a length field
                };
                if matches!(pkt.l4, L4::Udp(_)) && bad[l4 + 6..l4 + 8] == [0, 0] {
                    continue;
                }
                assert_eq!(check(&pkt, &bad), Checksum::Bad, "byte {i} of {pkt:?}");
            }
        }
    }

    #[test]
    fn what_cannot_be_checked_is_unchecked() {
        let c4 = v4([198, 51, 100, 10]);
        let s4 = v4([203, 0, 113, 10]);
        let mut t = TcpSpec::new(40000, 80, TcpFlags::ACK);
        t.payload = vec![b'x'; 1000];
        let p = build::tcp(c4, s4, &t);
        let pkt = Packet::parse_truncated(&p[..128], p.len() as u32).unwrap();
        assert_eq!(check(&pkt, &p[..128]), Checksum::Unchecked);
        let mut u = build::udp(c4, s4, 5000, 53, b"q");
        u[26] = 0;
        u[27] = 0;
        let pkt = Packet::parse(&u).unwrap();
        assert_eq!(check(&pkt, &u), Checksum::Unchecked);
    }
}
