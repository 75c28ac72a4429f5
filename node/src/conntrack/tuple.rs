//! Connection tuples: the key a packet is looked up by, in one direction.
//!
//! Owns the compact, family-tagged address form (`[u8; 16]`, IPv4 mapped) and the derivation of a
//! tuple from a packet or from the packet an ICMP error quotes. Must not touch connection state.

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::packet::{proto, Family, IcmpKind, Inner, InnerL4, Packet, L4};

/// One direction of a connection. For ICMP echo both ports hold the identifier, so request
/// and reply map to the same entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// 4 or 6: keeps `::ffff:a.b.c.d` (a real IPv6 address) apart from `a.b.c.d`.
    pub family: u8,
}

/// Three words instead of the derived field-by-field hash (two length-prefixed byte slices and
/// four small integers): the index hashes every packet's tuple, and the derived hash was 8 % of
/// the established path's profile.
impl Hash for Tuple {
    #[inline]
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u128(u128::from_ne_bytes(self.src));
        h.write_u128(u128::from_ne_bytes(self.dst));
        h.write_u64(
            u64::from(self.src_port)
                | u64::from(self.dst_port) << 16
                | u64::from(self.proto) << 32
                | u64::from(self.family) << 40,
        );
    }
}

#[inline]
pub fn addr_bytes(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address a compact form stands for (`family` 4 or 6).
#[inline]
pub fn ip_from_bytes(b: [u8; 16], family: u8) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(b[12], b[13], b[14], b[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(b))
    }
}

impl Tuple {
    pub fn new(src: IpAddr, dst: IpAddr, src_port: u16, dst_port: u16, proto: u8) -> Self {
        Tuple {
            src: addr_bytes(src),
            dst: addr_bytes(dst),
            src_port,
            dst_port,
            proto,
            family: if src.is_ipv4() { 4 } else { 6 },
        }
    }

    #[inline]
    pub fn reverse(&self) -> Self {
        Tuple {
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.proto,
            family: self.family,
        }
    }

    fn ip(&self, b: [u8; 16]) -> IpAddr {
        ip_from_bytes(b, self.family)
    }
    pub fn src_ip(&self) -> IpAddr {
        self.ip(self.src)
    }
    pub fn dst_ip(&self) -> IpAddr {
        self.ip(self.dst)
    }

    /// The tuple a packet is looked up by. `None` for ICMP errors (use `of_inner`) and for
    /// ICMP messages that are not echo.
    #[inline]
    pub fn of_packet(p: &Packet) -> Option<Self> {
        let (sp, dp) = match p.l4 {
            L4::Tcp(t) => (t.src_port, t.dst_port),
            L4::Udp(u) => (u.src_port, u.dst_port),
            L4::Icmp(i) => match i.kind {
                IcmpKind::EchoRequest { id, .. } | IcmpKind::EchoReply { id, .. } => (id, id),
                _ => return None,
            },
            L4::Other { .. } => (0, 0),
        };
        let mut t = Tuple::new(p.src, p.dst, sp, dp, p.proto);
        t.family = match p.family {
            Family::V4 => 4,
            Family::V6 => 6,
        };
        Some(t)
    }

    /// The tuple of the packet quoted in an ICMP error, as its sender sent it.
    pub fn of_inner(inner: &Inner) -> Option<Self> {
        let (sp, dp) = match inner.l4 {
            InnerL4::Ports {
                src_port, dst_port, ..
            } => (src_port, dst_port),
            InnerL4::IcmpEcho { id, .. } => (id, id),
            InnerL4::Other => match inner.proto {
                proto::TCP | proto::UDP | proto::ICMP | proto::ICMPV6 => return None,
                _ => (0, 0),
            },
        };
        Some(Tuple::new(inner.src, inner.dst, sp, dp, inner.proto))
    }
}

/// A symmetric hash of (address pair, protocol): both directions of a connection, its ICMP
/// errors (by their quoted packet) and its FTP data connections land on the same shard.
#[inline]
pub fn shard_hash(a: &[u8; 16], b: &[u8; 16], proto: u8) -> u64 {
    shard_mix(
        fold(u128::from_le_bytes(*a)),
        fold(u128::from_le_bytes(*b)),
        proto,
    )
}

/// `shard_hash(&addr_bytes(a), &addr_bytes(b), proto)` without building the byte arrays: every
/// packet pays for it, and the byte-by-byte assembly of a mapped IPv4 address cost more than
/// the hash itself.
#[inline]
pub fn shard_hash_ip(a: IpAddr, b: IpAddr, proto: u8) -> u64 {
    #[inline]
    fn word(a: IpAddr) -> u128 {
        match a {
            // `::ffff:a.b.c.d` read little-endian: 0xffff in bytes 10-11, the octets in 12-15.
            IpAddr::V4(v4) => {
                (u128::from(u32::from_le_bytes(v4.octets())) << 96) | (0xffff_u128 << 80)
            }
            IpAddr::V6(v6) => u128::from_le_bytes(v6.octets()),
        }
    }
    shard_mix(fold(word(a)), fold(word(b)), proto)
}

#[inline]
fn fold(v: u128) -> u64 {
    let m = (v as u64 ^ (v >> 64) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    m ^ (m >> 29)
}

#[inline]
fn shard_mix(fa: u64, fb: u64, proto: u8) -> u64 {
    let h = fa.wrapping_add(fb) ^ u64::from(proto).wrapping_mul(0xff51_afd7_ed55_8ccd);
    (h ^ (h >> 32)).wrapping_mul(0xc4ce_b9fe_1a85_ec53)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packet path (`shard_hash_ip`) and the replication path (`shard_hash` on stored
    /// tuples) must route every address pair to the same shard.
    #[test]
    fn shard_hash_ip_matches_the_byte_form() {
        let addrs: [IpAddr; 6] = [
            "198.51.100.7".parse().unwrap(),
            "203.0.113.250".parse().unwrap(),
            "0.0.0.0".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
            "::ffff:198.51.100.7".parse().unwrap(),
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap(),
        ];
        for a in addrs {
            for b in addrs {
                for proto in [6, 17, 58, 255] {
                    assert_eq!(
                        shard_hash_ip(a, b, proto),
                        shard_hash(&addr_bytes(a), &addr_bytes(b), proto),
                        "{a} {b} {proto}"
                    );
                }
            }
        }
        // A mapped-form IPv6 address hashes like the IPv4 one (the tuple's family keeps them
        // apart in the table; the shard may be shared).
        let v4: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(addr_bytes(v4), addr_bytes(addrs[4]));
    }
}
