//! The validating parser behind `Packet::parse`.
//!
//! Hand-written rather than built on a crate: NFQUEUE's header-only copy mode hands us a prefix of
//! the packet plus its real length, and the tracker needs the *real* TCP payload length while every
//! header must lie inside the captured prefix. ICMP errors quote a packet whose own length fields
//! describe bytes that were never quoted. Both are awkward to express with general-purpose
//! parsers, and this is the hot path: a handful of bounds-checked big-endian reads, no allocation.
//! Every read goes through `be16`/`be32`/`get`, which check bounds; nothing here can panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::label::label_enum;

use super::{
    proto, Family, Fragment, Icmp, IcmpKind, Inner, InnerL4, Packet, Tcp, TcpFlags, TcpOptions,
    Udp, L4,
};

/// Why a packet could not be parsed. Every variant maps to an INVALID counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("packet is empty")]
    Empty,
    #[error("IP version {0} is neither 4 nor 6")]
    BadVersion(u8),
    #[error("truncated {0} header")]
    Truncated(Layer),
    #[error("IPv4 header length field below 20 bytes")]
    BadIhl,
    #[error("IP length field disagrees with the packet length")]
    BadTotalLength,
    #[error("first fragment too short to hold the transport header (RFC 1858)")]
    TinyFragment,
    #[error("IPv6 extension header chain too long")]
    TooManyExtHeaders,
    #[error("TCP data offset below 20 bytes or beyond the segment")]
    BadDataOffset,
    #[error("malformed TCP option")]
    BadTcpOption,
    #[error("UDP length field disagrees with the IP payload")]
    BadUdpLength,
    #[error("ICMP error quotes a malformed packet")]
    BadIcmpInner,
}

/// The layer a truncation was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    Ip,
    Ipv6Ext,
    Tcp,
    Udp,
    Icmp,
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layer::Ip => "IP",
            Layer::Ipv6Ext => "IPv6 extension",
            Layer::Tcp => "TCP",
            Layer::Udp => "UDP",
            Layer::Icmp => "ICMP",
        })
    }
}

label_enum! {
    /// A [`ParseError`] without its details: what the malformed-packet counters are kept by
    /// (`keepstate_malformed_packets_total{reason}`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Malformed {
        Empty => "empty",
        BadVersion => "bad_version",
        Truncated => "truncated",
        BadIhl => "bad_ihl",
        BadTotalLength => "bad_total_length",
        TinyFragment => "tiny_fragment",
        TooManyExtHeaders => "too_many_ext_headers",
        BadDataOffset => "bad_data_offset",
        BadTcpOption => "bad_tcp_option",
        BadUdpLength => "bad_udp_length",
        BadIcmpInner => "bad_icmp_inner",
    }
}

impl ParseError {
    /// The counter this error is kept under.
    pub fn reason(self) -> Malformed {
        match self {
            ParseError::Empty => Malformed::Empty,
            ParseError::BadVersion(_) => Malformed::BadVersion,
            ParseError::Truncated(_) => Malformed::Truncated,
            ParseError::BadIhl => Malformed::BadIhl,
            ParseError::BadTotalLength => Malformed::BadTotalLength,
            ParseError::TinyFragment => Malformed::TinyFragment,
            ParseError::TooManyExtHeaders => Malformed::TooManyExtHeaders,
            ParseError::BadDataOffset => Malformed::BadDataOffset,
            ParseError::BadTcpOption => Malformed::BadTcpOption,
            ParseError::BadUdpLength => Malformed::BadUdpLength,
            ParseError::BadIcmpInner => Malformed::BadIcmpInner,
        }
    }
}

/// Bound on the IPv6 extension headers we walk before giving up.
const MAX_EXT_HEADERS: usize = 8;

#[inline]
fn get(d: &[u8], i: usize) -> Option<u8> {
    d.get(i).copied()
}
#[inline]
fn be16(d: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*d.get(i)?, *d.get(i + 1)?]))
}
#[inline]
fn be32(d: &[u8], i: usize) -> Option<u32> {
    let b = d.get(i..i + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}
#[inline]
fn v4(d: &[u8], i: usize) -> Option<IpAddr> {
    let b = d.get(i..i + 4)?;
    Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
}
#[inline]
fn v6(d: &[u8], i: usize) -> Option<IpAddr> {
    let b: [u8; 16] = d.get(i..i + 16)?.try_into().ok()?;
    Some(IpAddr::V6(Ipv6Addr::from(b)))
}

/// The IP layer of a packet: addresses, where the upper layer starts and how long it really is.
struct IpLayer {
    family: Family,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    /// Offset of the upper-layer header within the buffer.
    l4_off: usize,
    /// Real length of the upper layer (header + payload) from the IP length fields.
    l4_len: u32,
    fragment: Option<Fragment>,
}

/// Parse the IP header(s). `wire_len` bounds the length fields; `strict_len` requires the
/// IP length to be consistent with `wire_len` (false for quoted packets inside ICMP errors).
fn ip_layer(d: &[u8], wire_len: u32, strict_len: bool) -> Result<IpLayer, ParseError> {
    let first = get(d, 0).ok_or(ParseError::Empty)?;
    match first >> 4 {
        4 => {
            if d.len() < 20 {
                return Err(ParseError::Truncated(Layer::Ip));
            }
            let ihl = usize::from(first & 0x0f) * 4;
            if ihl < 20 {
                return Err(ParseError::BadIhl);
            }
            if d.len() < ihl {
                return Err(ParseError::Truncated(Layer::Ip));
            }
            let mut total = u32::from(be16(d, 2).ok_or(ParseError::Truncated(Layer::Ip))?);
            // BIG TCP: a GSO packet over 64 KiB carries total length 0 and its real length is
            // the wire length (Linux's iph_totlen).
            if total == 0 && strict_len && wire_len > 0xffff {
                total = wire_len;
            }
            if total < ihl as u32 || (strict_len && total > wire_len) {
                return Err(ParseError::BadTotalLength);
            }
            let frag = be16(d, 6).ok_or(ParseError::Truncated(Layer::Ip))?;
            let offset = u32::from(frag & 0x1fff) * 8;
            let more = frag & 0x2000 != 0;
            let fragment = (offset != 0 || more).then(|| Fragment {
                offset,
                more_fragments: more,
                id: u32::from(be16(d, 4).unwrap_or(0)),
            });
            Ok(IpLayer {
                family: Family::V4,
                src: v4(d, 12).ok_or(ParseError::Truncated(Layer::Ip))?,
                dst: v4(d, 16).ok_or(ParseError::Truncated(Layer::Ip))?,
                proto: get(d, 9).ok_or(ParseError::Truncated(Layer::Ip))?,
                l4_off: ihl,
                l4_len: total - ihl as u32,
                fragment,
            })
        }
        6 => {
            if d.len() < 40 {
                return Err(ParseError::Truncated(Layer::Ip));
            }
            let mut payload_len = u32::from(be16(d, 4).ok_or(ParseError::Truncated(Layer::Ip))?);
            // BIG TCP over IPv6: payload length 0 on a GSO packet over 64 KiB (the kernel has
            // already removed the jumbo option); the real length is the wire length.
            if payload_len == 0 && strict_len && wire_len > 0xffff + 40 {
                payload_len = wire_len - 40;
            }
            if strict_len && payload_len + 40 > wire_len {
                return Err(ParseError::BadTotalLength);
            }
            let src = v6(d, 8).ok_or(ParseError::Truncated(Layer::Ip))?;
            let dst = v6(d, 24).ok_or(ParseError::Truncated(Layer::Ip))?;
            let mut next = get(d, 6).ok_or(ParseError::Truncated(Layer::Ip))?;
            let mut off = 40usize;
            let mut fragment = None;
            let mut walked = 0;
            loop {
                match next {
                    // Extension headers of the common format (next, length in 8-octet units
                    // minus 1): hop-by-hop, routing, destination options, and (RFC 7045's
                    // list) Mobility, HIP and Shim6; plus AH, whose length counts 4-octet
                    // units minus 2 (RFC 4302). ESP ends the chain: what follows is encrypted.
                    0 | 43 | 60 | 135 | 139 | 140 | 51 => {
                        walked += 1;
                        if walked > MAX_EXT_HEADERS {
                            return Err(ParseError::TooManyExtHeaders);
                        }
                        let nh = get(d, off).ok_or(ParseError::Truncated(Layer::Ipv6Ext))?;
                        let len = usize::from(
                            get(d, off + 1).ok_or(ParseError::Truncated(Layer::Ipv6Ext))?,
                        );
                        let size = if next == 51 {
                            (len + 2) * 4
                        } else {
                            (len + 1) * 8
                        };
                        next = nh;
                        off += size;
                        if off > d.len() {
                            return Err(ParseError::Truncated(Layer::Ipv6Ext));
                        }
                    }
                    // Fragment header: fixed 8 bytes.
                    44 => {
                        walked += 1;
                        if walked > MAX_EXT_HEADERS {
                            return Err(ParseError::TooManyExtHeaders);
                        }
                        let nh = get(d, off).ok_or(ParseError::Truncated(Layer::Ipv6Ext))?;
                        let fo = be16(d, off + 2).ok_or(ParseError::Truncated(Layer::Ipv6Ext))?;
                        let id = be32(d, off + 4).ok_or(ParseError::Truncated(Layer::Ipv6Ext))?;
                        let offset = u32::from(fo >> 3) * 8;
                        let more = fo & 1 != 0;
                        // An atomic fragment (offset 0, no more) is a whole packet (RFC 6946).
                        if offset != 0 || more {
                            fragment = Some(Fragment {
                                offset,
                                more_fragments: more,
                                id,
                            });
                        }
                        next = nh;
                        off += 8;
                    }
                    _ => break,
                }
            }
            let ext_len = (off - 40) as u32;
            if ext_len > payload_len {
                return Err(ParseError::BadTotalLength);
            }
            Ok(IpLayer {
                family: Family::V6,
                src,
                dst,
                proto: next,
                l4_off: off,
                l4_len: payload_len - ext_len,
                fragment,
            })
        }
        v => Err(ParseError::BadVersion(v)),
    }
}

/// Captured bytes of the upper layer, limited to what the IP length fields claim.
#[inline]
fn l4_slice<'a>(d: &'a [u8], ip: &IpLayer) -> &'a [u8] {
    let end = ip.l4_off.saturating_add(ip.l4_len as usize).min(d.len());
    d.get(ip.l4_off..end).unwrap_or(&[])
}

pub(super) fn parse(data: &[u8], wire_len: u32) -> Result<Packet<'_>, ParseError> {
    let ip = ip_layer(data, wire_len, true)?;
    let seg = l4_slice(data, &ip);
    let non_first_fragment = ip.fragment.is_some_and(|f| f.offset != 0);
    let l4 = if non_first_fragment {
        L4::Other { payload: seg }
    } else {
        let is_first_fragment = ip.fragment.is_some();
        let r = match (ip.proto, ip.family) {
            (proto::TCP, _) => tcp(seg, ip.l4_len).map(L4::Tcp),
            (proto::UDP, _) => udp(seg, ip.l4_len, ip.fragment.is_some()).map(L4::Udp),
            (proto::ICMP, Family::V4) | (proto::ICMPV6, Family::V6) => {
                icmp(seg, ip.family).map(L4::Icmp)
            }
            _ => Ok(L4::Other { payload: seg }),
        };
        match r {
            // RFC 1858: a first fragment must carry the whole transport header.
            Err(ParseError::Truncated(_)) if is_first_fragment => {
                return Err(ParseError::TinyFragment)
            }
            r => r?,
        }
    };
    Ok(Packet {
        family: ip.family,
        src: ip.src,
        dst: ip.dst,
        proto: ip.proto,
        wire_len,
        fragment: ip.fragment,
        l4_offset: ip.l4_off as u32,
        l4_len: ip.l4_len,
        l4,
    })
}

const TRUNC_TCP: ParseError = ParseError::Truncated(Layer::Tcp);

/// `seg` is the captured TCP segment; `real_len` its length on the wire.
fn tcp(seg: &[u8], real_len: u32) -> Result<Tcp<'_>, ParseError> {
    if seg.len() < 20 || real_len < 20 {
        return Err(ParseError::Truncated(Layer::Tcp));
    }
    let doff = usize::from(get(seg, 12).ok_or(TRUNC_TCP)? >> 4) * 4;
    if doff < 20 || doff as u32 > real_len {
        return Err(ParseError::BadDataOffset);
    }
    if doff > seg.len() {
        return Err(ParseError::Truncated(Layer::Tcp));
    }
    let flags = TcpFlags(get(seg, 13).ok_or(TRUNC_TCP)?);
    let opts = seg.get(20..doff).unwrap_or(&[]);
    let options = if flags.syn() {
        tcp_options(opts)?
    } else {
        TcpOptions::default()
    };
    Ok(Tcp {
        src_port: be16(seg, 0).ok_or(TRUNC_TCP)?,
        dst_port: be16(seg, 2).ok_or(TRUNC_TCP)?,
        seq: be32(seg, 4).ok_or(TRUNC_TCP)?,
        ack: be32(seg, 8).ok_or(TRUNC_TCP)?,
        flags,
        window: be16(seg, 14).ok_or(TRUNC_TCP)?,
        options,
        opts,
        payload_len: real_len - doff as u32,
        payload: seg.get(doff..).unwrap_or(&[]),
    })
}

fn tcp_options(mut o: &[u8]) -> Result<TcpOptions, ParseError> {
    let mut opts = TcpOptions::default();
    while let Some(&kind) = o.first() {
        match kind {
            0 => break,
            1 => o = &o[1..],
            _ => {
                let len = usize::from(*o.get(1).ok_or(ParseError::BadTcpOption)?);
                if len < 2 || len > o.len() {
                    return Err(ParseError::BadTcpOption);
                }
                match (kind, len) {
                    (2, 4) => opts.mss = be16(o, 2),
                    (3, 3) => opts.window_scale = o.get(2).map(|&s| s.min(14)),
                    (4, 2) => opts.sack_permitted = true,
                    (2, _) | (3, _) | (4, _) => return Err(ParseError::BadTcpOption),
                    _ => {}
                }
                o = &o[len..];
            }
        }
    }
    Ok(opts)
}

fn udp(seg: &[u8], real_len: u32, fragmented: bool) -> Result<Udp<'_>, ParseError> {
    if seg.len() < 8 || real_len < 8 {
        return Err(ParseError::Truncated(Layer::Udp));
    }
    let ulen = u32::from(be16(seg, 4).ok_or(ParseError::Truncated(Layer::Udp))?);
    // In a first fragment the UDP length covers the reassembled datagram; UDP length 0 is an
    // IPv6 jumbogram, which we do not accept.
    if ulen < 8 || (!fragmented && ulen != real_len) {
        return Err(ParseError::BadUdpLength);
    }
    Ok(Udp {
        src_port: be16(seg, 0).ok_or(ParseError::Truncated(Layer::Udp))?,
        dst_port: be16(seg, 2).ok_or(ParseError::Truncated(Layer::Udp))?,
        payload: seg.get(8..).unwrap_or(&[]),
    })
}

fn is_error_type(family: Family, ty: u8) -> bool {
    match family {
        Family::V4 => matches!(ty, 3 | 4 | 5 | 11 | 12),
        Family::V6 => matches!(ty, 1..=4),
    }
}

fn icmp(seg: &[u8], family: Family) -> Result<Icmp<'_>, ParseError> {
    if seg.len() < 8 {
        return Err(ParseError::Truncated(Layer::Icmp));
    }
    let ty = seg[0];
    let code = seg[1];
    let (req, rep) = match family {
        Family::V4 => (8, 0),
        Family::V6 => (128, 129),
    };
    let id = be16(seg, 4).unwrap_or(0);
    let sq = be16(seg, 6).unwrap_or(0);
    let kind = if ty == req {
        IcmpKind::EchoRequest { id, seq: sq }
    } else if ty == rep {
        IcmpKind::EchoReply { id, seq: sq }
    } else if is_error_type(family, ty) {
        IcmpKind::Error(inner(seg.get(8..).unwrap_or(&[]), family)?)
    } else {
        IcmpKind::Other {
            body: seg.get(4..).unwrap_or(&[]),
        }
    };
    Ok(Icmp {
        icmp_type: ty,
        code,
        kind,
    })
}

/// The packet quoted by an ICMP error: a full IP header and at least 8 bytes of its upper layer.
/// An error quoting an ICMP error, or a fragment that is not the first, is malformed (RFC 1122
/// forbids sending errors about errors or non-first fragments).
fn inner(q: &[u8], family: Family) -> Result<Inner, ParseError> {
    let ip = ip_layer(q, q.len() as u32, false).map_err(|_| ParseError::BadIcmpInner)?;
    if ip.family != family || ip.fragment.is_some_and(|f| f.offset != 0) {
        return Err(ParseError::BadIcmpInner);
    }
    let l4 = q.get(ip.l4_off..).unwrap_or(&[]);
    let l4 = match ip.proto {
        proto::TCP | proto::UDP => {
            let (Some(src_port), Some(dst_port)) = (be16(l4, 0), be16(l4, 2)) else {
                return Err(ParseError::BadIcmpInner);
            };
            let tcp_seq = if ip.proto == proto::TCP {
                be32(l4, 4).unwrap_or(0)
            } else {
                0
            };
            InnerL4::Ports {
                src_port,
                dst_port,
                tcp_seq,
            }
        }
        proto::ICMP | proto::ICMPV6 => {
            let ty = get(l4, 0).ok_or(ParseError::BadIcmpInner)?;
            if is_error_type(family, ty) {
                return Err(ParseError::BadIcmpInner);
            }
            let id = be16(l4, 4).ok_or(ParseError::BadIcmpInner)?;
            InnerL4::IcmpEcho { icmp_type: ty, id }
        }
        _ => InnerL4::Other,
    };
    Ok(Inner {
        src: ip.src,
        dst: ip.dst,
        proto: ip.proto,
        l4,
    })
}

#[cfg(test)]
mod tests;
