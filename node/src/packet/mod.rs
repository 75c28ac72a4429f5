//! Zero-copy view of one IP packet as NFQUEUE hands it to us (no link-layer header).
//!
//! Owns: validating an IPv4/IPv6 packet once at the edge (`Packet::parse`) and exposing the
//! fields the tracker, the helpers and the policy need, borrowing the payload from the buffer.
//! Must not touch: connection state, policy, I/O. Nothing here allocates.
//!
//! Truncated captures are first-class: in header-only copy mode the kernel hands us the first
//! bytes of a packet plus its real length. `wire_len` is that real length; every length field is
//! checked against it, and `Tcp::payload_len` is the segment's real payload length even when
//! `payload` holds only the captured part of it.

use std::net::IpAddr;

pub mod build;
pub mod checksum;
mod parse;

pub use parse::{Layer, Malformed, ParseError};

/// IP version of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

/// IP protocol numbers we know by name.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// A parsed, validated packet. Cheap to copy; borrows the capture buffer.
#[derive(Clone, Copy, Debug)]
pub struct Packet<'a> {
    pub family: Family,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Upper-layer protocol number (after IPv6 extension headers).
    pub proto: u8,
    /// Real length of the whole IP packet on the wire (may exceed the captured bytes).
    pub wire_len: u32,
    /// `Some` when this packet is an IP fragment (first or not).
    pub fragment: Option<Fragment>,
    /// Where the upper layer starts in the buffer (after IPv6 extension headers), and its
    /// length on the wire (from the IP length fields).
    pub l4_offset: u32,
    pub l4_len: u32,
    pub l4: L4<'a>,
}

/// IP fragmentation facts. A non-first fragment carries no L4 header (`L4::Other`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    /// Fragment offset in bytes.
    pub offset: u32,
    pub more_fragments: bool,
    /// IPv4 identification (16 bit) or IPv6 fragment header identification (32 bit).
    pub id: u32,
}

/// The transport layer, when the packet carries one we track.
#[derive(Clone, Copy, Debug)]
pub enum L4<'a> {
    Tcp(Tcp<'a>),
    Udp(Udp<'a>),
    Icmp(Icmp<'a>),
    /// Unknown protocol, or a non-first fragment: the bytes after the IP header(s).
    Other {
        payload: &'a [u8],
    },
}

/// TCP flag bits as in the header's flags byte.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;

    #[inline]
    pub fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
    #[inline]
    pub fn syn(self) -> bool {
        self.has(Self::SYN)
    }
    #[inline]
    pub fn ack(self) -> bool {
        self.has(Self::ACK)
    }
    #[inline]
    pub fn fin(self) -> bool {
        self.has(Self::FIN)
    }
    #[inline]
    pub fn rst(self) -> bool {
        self.has(Self::RST)
    }
}

/// TCP options the tracker needs (parsed only on SYN segments; zeroed otherwise).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpOptions {
    pub window_scale: Option<u8>,
    pub sack_permitted: bool,
    pub mss: Option<u16>,
}

#[derive(Clone, Copy, Debug)]
pub struct Tcp<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: TcpFlags,
    /// Raw (unscaled) window field.
    pub window: u16,
    pub options: TcpOptions,
    /// The raw option bytes (captured; well-formed only if `flags` has SYN, where `options` was
    /// parsed from them). The tracker reads SACK blocks from them, and only when it needs to.
    pub opts: &'a [u8],
    /// Real payload length of the segment (from the IP length fields).
    pub payload_len: u32,
    /// Captured payload bytes (a prefix of the real payload in header-only copy mode).
    pub payload: &'a [u8],
}

#[derive(Clone, Copy, Debug)]
pub struct Udp<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: &'a [u8],
}

/// ICMP (IPv4) or ICMPv6 message. `Packet::family` tells which numbering `icmp_type` uses.
#[derive(Clone, Copy, Debug)]
pub struct Icmp<'a> {
    pub icmp_type: u8,
    pub code: u8,
    pub kind: IcmpKind<'a>,
}

#[derive(Clone, Copy, Debug)]
pub enum IcmpKind<'a> {
    EchoRequest {
        id: u16,
        seq: u16,
    },
    EchoReply {
        id: u16,
        seq: u16,
    },
    /// An error (dest unreachable, time exceeded, parameter problem, packet too big (v6),
    /// source quench/redirect (v4)) quoting the start of the offending packet.
    Error(Inner),
    /// Anything else (router/neighbour discovery, timestamps, ...). `body` is after the 4-byte header.
    Other {
        body: &'a [u8],
    },
}

/// The packet quoted inside an ICMP error, as the original sender sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inner {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub l4: InnerL4,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InnerL4 {
    /// TCP or UDP ports (and the TCP sequence number when quoted, else 0).
    Ports {
        src_port: u16,
        dst_port: u16,
        tcp_seq: u32,
    },
    /// A quoted ICMP/ICMPv6 echo request or reply.
    IcmpEcho { icmp_type: u8, id: u16 },
    /// Too little quoted, or a protocol we do not track.
    Other,
}

impl<'a> Packet<'a> {
    /// Parse and validate a whole captured IP packet (`wire_len == data.len()`).
    #[inline]
    pub fn parse(data: &'a [u8]) -> Result<Self, ParseError> {
        parse::parse(data, data.len() as u32)
    }

    /// Parse a possibly truncated capture whose real length on the wire is `wire_len`.
    /// All headers must be inside `data`; payload beyond it is accounted for but not visible.
    #[inline]
    pub fn parse_truncated(data: &'a [u8], wire_len: u32) -> Result<Self, ParseError> {
        parse::parse(data, wire_len)
    }

    /// Source and destination ports for TCP/UDP; `(0, 0)` otherwise.
    #[inline]
    pub fn ports(&self) -> (u16, u16) {
        match self.l4 {
            L4::Tcp(t) => (t.src_port, t.dst_port),
            L4::Udp(u) => (u.src_port, u.dst_port),
            _ => (0, 0),
        }
    }
}
