//! The replication protocol's messages on the wire: `msg` types to `keepstate.v1.Sync` protobuf
//! and back.
//!
//! Owns the compact encodings (a tuple is one `bytes` field: family, protocol, addresses,
//! ports) and the *form* checks of everything a peer sends: address lengths, enum values, port
//! and lifetime ranges, line lengths. An item that fails them becomes `Item::Skipped(Invalid)`
//! and keeps its sequence number, so one bad entry neither reaches the table nor tears a gap in
//! the stream; an item or message kind from a newer build is skipped the same way. What an
//! entry means for the table (its shard, its master, proto/kind agreement) is checked on import
//! by the tracker. Must not touch the table or the network.

use keepstate_proto::v1 as pb;
use pb::sync_item::Kind as ItemKind;
use pb::sync_message::Kind as MsgKind;

use super::msg::{Hello, Item, Msg, Resume, Skip};
use crate::conntrack::event::status;
use crate::conntrack::helper_state::{HelperKind, HelperState, LineState, LINE_MAX};
use crate::conntrack::tcp::{
    SeqNumber, TcpConn, TcpDir, TcpState, TcpStateRepr, DIR_ALL, MAX_WSCALE,
};
use crate::conntrack::{ConnSnapshot, ConnUpdate, ExpectSnapshot, ProtoState, Tuple};

/// Status bits a peer may set; any other bit (a newer build's) is ignored.
const WIRE_STATUS: u16 = status::SEEN_REPLY | status::ASSURED | status::RELATED;

/// Longest lifetime an entry may claim (ms): the longest default timeout is 5 days; anything
/// beyond 30 days is a broken or hostile peer.
pub const MAX_EXPIRES_MS: u64 = 30 * 24 * 3600 * 1000;

// ---- encoding ------------------------------------------------------------------------------

/// The wire form of a tuple (see sync.proto): 14 bytes for IPv4, 38 for IPv6.
pub fn encode_tuple(t: &Tuple) -> Vec<u8> {
    let mut b = Vec::with_capacity(38);
    b.push(t.family);
    b.push(t.proto);
    b.extend(encode_addr(&t.src, t.family));
    b.extend(encode_addr(&t.dst, t.family));
    b.extend(t.src_port.to_be_bytes());
    b.extend(t.dst_port.to_be_bytes());
    b
}

fn encode_addr(a: &[u8; 16], family: u8) -> Vec<u8> {
    if family == 4 {
        a[12..].to_vec()
    } else {
        a.to_vec()
    }
}

fn encode_kind(p: &ProtoState) -> (pb::SyncConnKind, Option<pb::SyncTcp>) {
    match p {
        ProtoState::Tcp(c) => (pb::SyncConnKind::Tcp, Some(encode_tcp(c))),
        ProtoState::Udp => (pb::SyncConnKind::Udp, None),
        ProtoState::IcmpEcho => (pb::SyncConnKind::IcmpEcho, None),
        ProtoState::Generic => (pb::SyncConnKind::Generic, None),
    }
}

fn encode_tcp(c: &TcpConn) -> pb::SyncTcp {
    let dir = |d: &TcpDir| pb::SyncTcpDir {
        end: d.end.0,
        maxend: d.maxend.0,
        maxwin: d.maxwin,
        scale: u32::from(d.scale),
        flags: u32::from(d.flags),
    };
    pb::SyncTcp {
        state: u32::from(c.state.0),
        original: Some(dir(&c.dir[0])),
        reply: Some(dir(&c.dir[1])),
    }
}

fn encode_helper(h: &HelperState) -> pb::SyncHelper {
    let line = |l: &LineState| pb::SyncLine {
        next_seq: l.next_seq,
        partial: l.buf[..usize::from(l.len).min(LINE_MAX)].to_vec(),
        overflowed: l.overflowed,
    };
    pb::SyncHelper {
        kind: match h.kind {
            HelperKind::Ftp => pb::SyncHelperKind::Ftp as i32,
        },
        original: Some(line(&h.dir[0])),
        reply: Some(line(&h.dir[1])),
    }
}

fn encode_conn(s: &ConnSnapshot) -> pb::SyncConn {
    let (kind, tcp) = encode_kind(&s.proto);
    pb::SyncConn {
        tuple: encode_tuple(&s.tuple),
        kind: kind as i32,
        tcp,
        status: u32::from(s.status & WIRE_STATUS),
        master: s.master.as_ref().map(encode_tuple).unwrap_or_default(),
        expires_in_ms: s.expires_in_ms,
        helper: s.helper.as_deref().map(encode_helper),
    }
}

fn encode_expect(x: &ExpectSnapshot) -> pb::SyncExpect {
    pb::SyncExpect {
        master: encode_tuple(&x.master),
        protocol: u32::from(x.proto),
        family: u32::from(x.family),
        src: encode_addr(&x.src, x.family),
        src_port: x.src_port.map(u32::from),
        dst: encode_addr(&x.dst, x.family),
        dst_port: u32::from(x.dst_port),
        expires_in_ms: x.expires_in_ms,
        helper: match x.helper {
            Some(HelperKind::Ftp) => pb::SyncHelperKind::Ftp as i32,
            None => pb::SyncHelperKind::None as i32,
        },
    }
}

/// The wire form of one item. `Item::Skipped` (what a receiver could not use; a sender never
/// has one) becomes an item without a kind.
pub fn encode_item(i: &Item) -> pb::SyncItem {
    let kind = match i {
        Item::Conn(s) => Some(ItemKind::Conn(encode_conn(s))),
        Item::Update(u) => {
            let (kind, tcp) = encode_kind(&u.proto);
            Some(ItemKind::Update(pb::SyncUpdate {
                tuple: encode_tuple(&u.tuple),
                kind: kind as i32,
                tcp,
                status: u32::from(u.status & WIRE_STATUS),
                expires_in_ms: u.expires_in_ms,
            }))
        }
        Item::ConnGone(t) => Some(ItemKind::ConnGone(encode_tuple(t))),
        Item::ConnKilled(t) => Some(ItemKind::ConnKilled(encode_tuple(t))),
        Item::Expect(x) => Some(ItemKind::Expect(encode_expect(x))),
        Item::ExpectGone(x) => Some(ItemKind::ExpectGone(encode_expect(x))),
        // Keeps its place in a batch as an empty item, which the peer skips in turn.
        Item::Skipped(_) => None,
    };
    pb::SyncItem { kind }
}

pub fn encode(m: &Msg) -> pb::SyncMessage {
    let items = |v: &[Item]| v.iter().map(encode_item).collect();
    let kind = match m {
        Msg::Hello(h) => MsgKind::Hello(pb::SyncHello {
            version: h.version,
            node_id: h.node_id,
            boot_id: h.boot_id,
            resume: h.resume.map(|r| pb::SyncResume {
                boot_id: r.boot_id,
                seq: r.seq,
            }),
        }),
        Msg::Batch {
            first_seq,
            items: v,
        } => MsgKind::Batch(pb::SyncBatch {
            first_seq: *first_seq,
            items: items(v),
        }),
        Msg::Ack { seq } => MsgKind::Ack(pb::SyncAck { seq: *seq }),
        Msg::Nack { from } => MsgKind::Nack(pb::SyncNack { from: *from }),
        Msg::Heartbeat => MsgKind::Heartbeat(pb::SyncHeartbeat {}),
        Msg::BulkStart { id, seq, estimate } => MsgKind::BulkStart(pb::SyncBulkStart {
            id: *id,
            seq: *seq,
            estimate: *estimate,
        }),
        Msg::BulkChunk {
            id,
            index,
            items: v,
        } => MsgKind::BulkChunk(pb::SyncBulkChunk {
            id: *id,
            index: *index,
            items: items(v),
        }),
        Msg::BulkEnd { id, chunks } => MsgKind::BulkEnd(pb::SyncBulkEnd {
            id: *id,
            chunks: *chunks,
        }),
        Msg::BulkAck { id, index } => MsgKind::BulkAck(pb::SyncBulkAck {
            id: *id,
            index: *index,
        }),
        Msg::BulkNack { id, index } => MsgKind::BulkNack(pb::SyncBulkNack {
            id: *id,
            index: *index,
        }),
        Msg::BulkRequest => MsgKind::BulkRequest(pb::SyncBulkRequest {}),
        Msg::Need { tuples } => MsgKind::Need(pb::SyncNeed {
            tuples: tuples.iter().map(encode_tuple).collect(),
        }),
    };
    pb::SyncMessage { kind: Some(kind) }
}

// ---- decoding ------------------------------------------------------------------------------

/// A malformed field (the item that holds it is skipped).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed {0}")]
pub struct Malformed(pub &'static str);

fn addr(b: &[u8], family: u8, what: &'static str) -> Result<[u8; 16], Malformed> {
    match (family, b.len()) {
        (4, 4) => {
            let mut a = [0u8; 16];
            a[10] = 0xff;
            a[11] = 0xff;
            a[12..].copy_from_slice(b);
            Ok(a)
        }
        (6, 16) => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            Ok(a)
        }
        _ => Err(Malformed(what)),
    }
}

/// A tuple from its wire form; every length and the family are checked.
pub fn decode_tuple(b: &[u8]) -> Result<Tuple, Malformed> {
    let bad = Malformed("tuple");
    let (&family, rest) = b.split_first().ok_or(bad)?;
    let (&proto, rest) = rest.split_first().ok_or(bad)?;
    let n = match family {
        4 => 4,
        6 => 16,
        _ => return Err(bad),
    };
    if rest.len() != 2 * n + 4 {
        return Err(bad);
    }
    let (s, rest) = rest.split_at(n);
    let (d, p) = rest.split_at(n);
    let t = Tuple {
        src: addr(s, family, "tuple")?,
        dst: addr(d, family, "tuple")?,
        src_port: u16::from_be_bytes([p[0], p[1]]),
        dst_port: u16::from_be_bytes([p[2], p[3]]),
        proto,
        family,
    };
    if t == t.reverse() {
        return Err(bad);
    }
    Ok(t)
}

fn decode_tcp(t: Option<&pb::SyncTcp>) -> Result<TcpConn, Malformed> {
    let t = t.ok_or(Malformed("tcp state"))?;
    let state = u8::try_from(t.state)
        .ok()
        .filter(|&s| s != TcpState::None as u8 && usize::from(s) < TcpState::ALL.len())
        .ok_or(Malformed("tcp state"))?;
    let dir = |d: Option<&pb::SyncTcpDir>| -> Result<TcpDir, Malformed> {
        let d = d.ok_or(Malformed("tcp direction"))?;
        if d.scale > u32::from(MAX_WSCALE) {
            return Err(Malformed("tcp direction"));
        }
        Ok(TcpDir {
            end: SeqNumber(d.end),
            maxend: SeqNumber(d.maxend),
            maxwin: d.maxwin,
            scale: d.scale as u8,
            // Bits this build does not know (a newer peer's) are dropped, as status bits are:
            // a rolling upgrade must not turn every entry into a malformed one.
            flags: (d.flags & u32::from(DIR_ALL)) as u8,
        })
    };
    Ok(TcpConn {
        state: TcpStateRepr(state),
        dir: [dir(t.original.as_ref())?, dir(t.reply.as_ref())?],
    })
}

fn decode_proto(kind: i32, tcp: Option<&pb::SyncTcp>, t: &Tuple) -> Result<ProtoState, Malformed> {
    use crate::packet::proto::{ICMP, ICMPV6, TCP, UDP};
    let p = match pb::SyncConnKind::try_from(kind) {
        Ok(pb::SyncConnKind::Tcp) if t.proto == TCP => ProtoState::Tcp(decode_tcp(tcp)?),
        Ok(pb::SyncConnKind::Udp) if t.proto == UDP => ProtoState::Udp,
        Ok(pb::SyncConnKind::IcmpEcho)
            if matches!((t.proto, t.family), (ICMP, 4) | (ICMPV6, 6)) =>
        {
            ProtoState::IcmpEcho
        }
        Ok(pb::SyncConnKind::Generic) if !matches!(t.proto, TCP | UDP | ICMP | ICMPV6) => {
            ProtoState::Generic
        }
        _ => return Err(Malformed("connection kind")),
    };
    Ok(p)
}

fn decode_expires(ms: u64) -> Result<u64, Malformed> {
    (ms <= MAX_EXPIRES_MS)
        .then_some(ms)
        .ok_or(Malformed("lifetime"))
}

fn decode_helper_kind(k: i32) -> Result<Option<HelperKind>, Malformed> {
    match pb::SyncHelperKind::try_from(k) {
        Ok(pb::SyncHelperKind::None) => Ok(None),
        Ok(pb::SyncHelperKind::Ftp) => Ok(Some(HelperKind::Ftp)),
        Err(_) => Err(Malformed("helper kind")),
    }
}

fn decode_helper(h: &pb::SyncHelper) -> Result<Option<Box<HelperState>>, Malformed> {
    let Some(kind) = decode_helper_kind(h.kind)? else {
        return Ok(None);
    };
    let line = |l: Option<&pb::SyncLine>| -> Result<LineState, Malformed> {
        let mut s = LineState::default();
        if let Some(l) = l {
            if l.partial.len() > LINE_MAX {
                return Err(Malformed("helper line"));
            }
            s.next_seq = l.next_seq;
            s.len = l.partial.len() as u16;
            s.buf[..l.partial.len()].copy_from_slice(&l.partial);
            s.overflowed = l.overflowed;
        }
        Ok(s)
    };
    Ok(Some(Box::new(HelperState {
        kind,
        dir: [line(h.original.as_ref())?, line(h.reply.as_ref())?],
    })))
}

fn decode_conn(c: &pb::SyncConn) -> Result<ConnSnapshot, Malformed> {
    let tuple = decode_tuple(&c.tuple)?;
    let master = if c.master.is_empty() {
        None
    } else {
        Some(decode_tuple(&c.master)?)
    };
    Ok(ConnSnapshot {
        tuple,
        proto: decode_proto(c.kind, c.tcp.as_ref(), &tuple)?,
        status: (c.status as u16) & WIRE_STATUS,
        master,
        expires_in_ms: decode_expires(c.expires_in_ms)?,
        helper: match &c.helper {
            Some(h) => decode_helper(h)?,
            None => None,
        },
    })
}

fn decode_expect(x: &pb::SyncExpect) -> Result<ExpectSnapshot, Malformed> {
    let family = match x.family {
        4 => 4,
        6 => 6,
        _ => return Err(Malformed("expectation family")),
    };
    let port = |p: u32| {
        u16::try_from(p)
            .ok()
            .filter(|&p| p != 0)
            .ok_or(Malformed("expectation port"))
    };
    let master = decode_tuple(&x.master)?;
    if master.family != family {
        return Err(Malformed("expectation family"));
    }
    Ok(ExpectSnapshot {
        master,
        proto: u8::try_from(x.protocol).map_err(|_| Malformed("expectation protocol"))?,
        src: addr(&x.src, family, "expectation address")?,
        src_port: x.src_port.map(port).transpose()?,
        dst: addr(&x.dst, family, "expectation address")?,
        dst_port: port(x.dst_port)?,
        family,
        expires_in_ms: decode_expires(x.expires_in_ms)?,
        helper: decode_helper_kind(x.helper)?,
    })
}

/// One item as the core sees it: a malformed one is `Skipped(Invalid)`, an unknown kind
/// `Skipped(UnknownKind)`.
pub fn decode_item(i: &pb::SyncItem) -> Item {
    let r = match &i.kind {
        None => return Item::Skipped(Skip::UnknownKind),
        Some(ItemKind::Conn(c)) => decode_conn(c).map(Item::Conn),
        Some(ItemKind::Update(u)) => decode_tuple(&u.tuple).and_then(|tuple| {
            Ok(Item::Update(ConnUpdate {
                tuple,
                proto: decode_proto(u.kind, u.tcp.as_ref(), &tuple)?,
                status: (u.status as u16) & WIRE_STATUS,
                expires_in_ms: decode_expires(u.expires_in_ms)?,
            }))
        }),
        Some(ItemKind::ConnGone(t)) => decode_tuple(t).map(Item::ConnGone),
        Some(ItemKind::ConnKilled(t)) => decode_tuple(t).map(Item::ConnKilled),
        Some(ItemKind::Expect(x)) => decode_expect(x).map(Item::Expect),
        Some(ItemKind::ExpectGone(x)) => decode_expect(x).map(Item::ExpectGone),
    };
    r.unwrap_or(Item::Skipped(Skip::Invalid))
}

/// A message as the core sees it; `None` for a message kind this build does not know (a newer
/// peer's), which the shell counts and skips. Tuples in a `Need` that do not decode are dropped
/// (the peer asks again with its next update).
pub fn decode(m: &pb::SyncMessage) -> Option<Msg> {
    let items = |v: &[pb::SyncItem]| v.iter().map(decode_item).collect();
    Some(match m.kind.as_ref()? {
        MsgKind::Hello(h) => Msg::Hello(Hello {
            version: h.version,
            node_id: h.node_id,
            boot_id: h.boot_id,
            resume: h.resume.as_ref().map(|r| Resume {
                boot_id: r.boot_id,
                seq: r.seq,
            }),
        }),
        MsgKind::Batch(b) => Msg::Batch {
            first_seq: b.first_seq,
            items: items(&b.items),
        },
        MsgKind::Ack(a) => Msg::Ack { seq: a.seq },
        MsgKind::Nack(n) => Msg::Nack { from: n.from },
        MsgKind::Heartbeat(_) => Msg::Heartbeat,
        MsgKind::BulkStart(b) => Msg::BulkStart {
            id: b.id,
            seq: b.seq,
            estimate: b.estimate,
        },
        MsgKind::BulkChunk(c) => Msg::BulkChunk {
            id: c.id,
            index: c.index,
            items: items(&c.items),
        },
        MsgKind::BulkEnd(e) => Msg::BulkEnd {
            id: e.id,
            chunks: e.chunks,
        },
        MsgKind::BulkAck(a) => Msg::BulkAck {
            id: a.id,
            index: a.index,
        },
        MsgKind::BulkNack(n) => Msg::BulkNack {
            id: n.id,
            index: n.index,
        },
        MsgKind::BulkRequest(_) => Msg::BulkRequest,
        MsgKind::Need(n) => Msg::Need {
            tuples: n
                .tuples
                .iter()
                .filter_map(|t| decode_tuple(t).ok())
                .collect(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::tcp::DIR_WSCALE;
    use prost::Message;
    use std::net::IpAddr;

    fn tuple(src: &str, dst: &str, sp: u16, dp: u16, proto: u8) -> Tuple {
        Tuple::new(
            src.parse::<IpAddr>().unwrap(),
            dst.parse::<IpAddr>().unwrap(),
            sp,
            dp,
            proto,
        )
    }

    fn ftp_conn() -> ConnSnapshot {
        let mut h = HelperState::new(HelperKind::Ftp);
        h.dir[0].next_seq = Some(1000);
        h.dir[0].len = 4;
        h.dir[0].buf[..4].copy_from_slice(b"PORT");
        h.dir[1].next_seq = Some(u32::MAX);
        let mut c = TcpConn::default();
        c.state.set(TcpState::Established);
        c.dir[0] = TcpDir {
            end: SeqNumber(1),
            maxend: SeqNumber(2),
            maxwin: 3,
            scale: 7,
            flags: DIR_WSCALE,
        };
        ConnSnapshot {
            tuple: tuple("198.51.100.10", "203.0.113.10", 40000, 21, 6),
            proto: ProtoState::Tcp(c),
            status: status::SEEN_REPLY | status::ASSURED,
            master: None,
            expires_in_ms: 432_000_000,
            helper: Some(Box::new(h)),
        }
    }

    fn every_msg() -> Vec<Msg> {
        let conn = ftp_conn();
        let data = ConnSnapshot {
            tuple: tuple("2001:db8:2::10", "2001:db8:1::10", 20, 50000, 6),
            master: Some(tuple("2001:db8:1::10", "2001:db8:2::10", 40000, 21, 6)),
            status: status::RELATED,
            helper: None,
            ..conn.clone()
        };
        let x = ExpectSnapshot {
            master: conn.tuple,
            proto: 6,
            src: conn.tuple.dst,
            src_port: None,
            dst: conn.tuple.src,
            dst_port: 50001,
            family: 4,
            expires_in_ms: 300_000,
            helper: None,
        };
        let items = vec![
            Item::Conn(conn.clone()),
            Item::Conn(data),
            Item::Update(ConnUpdate {
                tuple: tuple("198.51.100.10", "203.0.113.10", 5353, 53, 17),
                proto: ProtoState::Udp,
                status: status::SEEN_REPLY,
                expires_in_ms: 180_000,
            }),
            Item::Update(ConnUpdate {
                tuple: tuple("198.51.100.10", "203.0.113.10", 7, 7, 1),
                proto: ProtoState::IcmpEcho,
                status: 0,
                expires_in_ms: 30_000,
            }),
            Item::Update(ConnUpdate {
                tuple: tuple("198.51.100.10", "203.0.113.10", 0, 0, 47),
                proto: ProtoState::Generic,
                status: 0,
                expires_in_ms: 600_000,
            }),
            Item::ConnGone(conn.tuple),
            Item::ConnKilled(tuple("2001:db8:1::10", "2001:db8:2::10", 40000, 21, 6)),
            Item::Expect(x.clone()),
            Item::ExpectGone(ExpectSnapshot {
                src_port: Some(20),
                helper: Some(HelperKind::Ftp),
                ..x
            }),
        ];
        vec![
            Msg::Hello(Hello {
                version: 1,
                node_id: 2,
                boot_id: 0xdead_beef,
                resume: Some(Resume { boot_id: 7, seq: 9 }),
            }),
            Msg::Hello(Hello {
                version: 1,
                node_id: 2,
                boot_id: 1,
                resume: None,
            }),
            Msg::Batch {
                first_seq: 17,
                items: items.clone(),
            },
            Msg::Ack { seq: 5 },
            Msg::Nack { from: 6 },
            Msg::Heartbeat,
            Msg::BulkStart {
                id: 3,
                seq: 100,
                estimate: 1_000_000,
            },
            Msg::BulkChunk {
                id: 3,
                index: 4,
                items,
            },
            Msg::BulkEnd { id: 3, chunks: 5 },
            Msg::BulkAck { id: 3, index: 5 },
            Msg::BulkNack { id: 3, index: 2 },
            Msg::BulkRequest,
            Msg::Need {
                tuples: vec![conn.tuple],
            },
        ]
    }

    #[test]
    fn every_message_round_trips_through_protobuf_bytes() {
        for m in every_msg() {
            let bytes = encode(&m).encode_to_vec();
            let back = pb::SyncMessage::decode(bytes.as_slice()).unwrap();
            assert_eq!(decode(&back), Some(m));
        }
    }

    #[test]
    fn tuples_are_compact_and_strictly_checked() {
        let v4 = tuple("198.51.100.10", "203.0.113.10", 1, 2, 6);
        let v6 = tuple("2001:db8::1", "2001:db8::2", 1, 2, 17);
        assert_eq!(encode_tuple(&v4).len(), 14);
        assert_eq!(encode_tuple(&v6).len(), 38);
        for t in [v4, v6] {
            let b = encode_tuple(&t);
            assert_eq!(decode_tuple(&b), Ok(t));
            assert!(decode_tuple(&b[..b.len() - 1]).is_err(), "short");
            let mut long = b.clone();
            long.push(0);
            assert!(decode_tuple(&long).is_err(), "long");
            let mut fam = b.clone();
            fam[0] = 5;
            assert!(decode_tuple(&fam).is_err(), "family");
        }
        // An IPv4 tuple with IPv6-length addresses is refused, not reinterpreted.
        let mut mixed = encode_tuple(&v6);
        mixed[0] = 4;
        assert!(decode_tuple(&mixed).is_err());
        // Both ends the same: no connection looks like that.
        let same = tuple("198.51.100.10", "198.51.100.10", 5, 5, 6);
        assert!(decode_tuple(&encode_tuple(&same)).is_err());
        assert!(decode_tuple(&[]).is_err());
    }

    /// A newer peer's direction flag is dropped, the entry kept (a rolling upgrade must not
    /// turn every entry into a malformed one); the flags this build knows all survive.
    #[test]
    fn unknown_direction_flags_are_dropped_known_ones_kept() {
        let mut c = match encode_item(&Item::Conn(ftp_conn())).kind {
            Some(ItemKind::Conn(c)) => c,
            _ => unreachable!(),
        };
        c.tcp.as_mut().unwrap().reply.as_mut().unwrap().flags = 0x80 | u32::from(DIR_ALL);
        let item = decode_item(&pb::SyncItem {
            kind: Some(ItemKind::Conn(c)),
        });
        match item {
            Item::Conn(s) => match s.proto {
                ProtoState::Tcp(t) => assert_eq!(t.dir[1].flags, DIR_ALL),
                p => panic!("not tcp: {p:?}"),
            },
            other => panic!("refused: {other:?}"),
        }
    }

    /// Each corruption of a valid item makes it `Skipped(Invalid)`, never something else.
    #[test]
    fn a_malformed_item_is_skipped_and_keeps_its_place() {
        let good = match encode_item(&Item::Conn(ftp_conn())).kind {
            Some(ItemKind::Conn(c)) => c,
            _ => unreachable!(),
        };
        type Corrupt = fn(&mut pb::SyncConn);
        let corruptions: Vec<(&str, Corrupt)> = vec![
            ("tcp state 0", |c| c.tcp.as_mut().unwrap().state = 0),
            ("tcp state 10", |c| c.tcp.as_mut().unwrap().state = 10),
            ("no tcp", |c| c.tcp = None),
            ("wscale 15", |c| {
                c.tcp.as_mut().unwrap().original.as_mut().unwrap().scale = 15
            }),
            ("kind udp on tcp", |c| c.kind = pb::SyncConnKind::Udp as i32),
            ("kind 99", |c| c.kind = 99),
            ("bad tuple", |c| c.tuple.truncate(5)),
            ("bad master", |c| c.master = vec![4, 6, 1]),
            ("lifetime", |c| c.expires_in_ms = MAX_EXPIRES_MS + 1),
            ("helper kind", |c| c.helper.as_mut().unwrap().kind = 7),
            ("long line", |c| {
                c.helper
                    .as_mut()
                    .unwrap()
                    .original
                    .as_mut()
                    .unwrap()
                    .partial = vec![b'x'; LINE_MAX + 1]
            }),
        ];
        for (what, corrupt) in corruptions {
            let mut c = good.clone();
            corrupt(&mut c);
            let m = pb::SyncMessage {
                kind: Some(MsgKind::Batch(pb::SyncBatch {
                    first_seq: 1,
                    items: vec![
                        pb::SyncItem {
                            kind: Some(ItemKind::Conn(c)),
                        },
                        encode_item(&Item::Conn(ftp_conn())),
                    ],
                })),
            };
            let bytes = m.encode_to_vec();
            let m = decode(&pb::SyncMessage::decode(bytes.as_slice()).unwrap());
            match m {
                Some(Msg::Batch {
                    first_seq: 1,
                    items,
                }) => {
                    assert_eq!(items[0], Item::Skipped(Skip::Invalid), "{what}");
                    assert_eq!(items[1], Item::Conn(ftp_conn()), "{what}");
                }
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    #[test]
    fn malformed_expectations_are_skipped() {
        let x = ExpectSnapshot {
            master: tuple("198.51.100.10", "203.0.113.10", 40000, 21, 6),
            proto: 6,
            src: tuple("203.0.113.10", "203.0.113.10", 0, 0, 6).src,
            src_port: None,
            dst: tuple("198.51.100.10", "198.51.100.10", 0, 0, 6).src,
            dst_port: 50001,
            family: 4,
            expires_in_ms: 1000,
            helper: None,
        };
        let good = match encode_item(&Item::Expect(x.clone())).kind {
            Some(ItemKind::Expect(e)) => e,
            _ => unreachable!(),
        };
        assert_eq!(
            decode_item(&pb::SyncItem {
                kind: Some(ItemKind::Expect(good.clone()))
            }),
            Item::Expect(x)
        );
        let corruptions: Vec<fn(&mut pb::SyncExpect)> = vec![
            |e| e.family = 6,
            |e| e.family = 0,
            |e| e.dst_port = 0,
            |e| e.dst_port = 70000,
            |e| e.src_port = Some(65536),
            |e| e.protocol = 300,
            |e| e.src = vec![1, 2, 3],
            |e| e.helper = 3,
            |e| e.master.clear(),
        ];
        for (i, corrupt) in corruptions.iter().enumerate() {
            let mut e = good.clone();
            corrupt(&mut e);
            let item = pb::SyncItem {
                kind: Some(ItemKind::ExpectGone(e)),
            };
            assert_eq!(decode_item(&item), Item::Skipped(Skip::Invalid), "case {i}");
        }
    }

    /// Status bits a peer must not set (FROM_PEER is the receiver's own mark; unknown bits
    /// belong to a newer build) are dropped on the way in.
    #[test]
    fn only_wire_status_bits_cross() {
        let mut c = ftp_conn();
        c.status = 0xffff;
        let bytes = encode(&Msg::Batch {
            first_seq: 1,
            items: vec![Item::Conn(c)],
        })
        .encode_to_vec();
        let mut m = pb::SyncMessage::decode(bytes.as_slice()).unwrap();
        if let Some(MsgKind::Batch(b)) = &mut m.kind {
            if let Some(ItemKind::Conn(c)) = &mut b.items[0].kind {
                assert_eq!(c.status, u32::from(WIRE_STATUS));
                c.status = 0xffff_ffff;
            }
        }
        match decode(&m) {
            Some(Msg::Batch { items, .. }) => match &items[0] {
                Item::Conn(c) => assert_eq!(c.status, WIRE_STATUS),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    /// Rolling upgrade: a newer peer's message kinds, item kinds and fields are skipped by
    /// this build. The "newer" messages are hand-encoded protobuf with field numbers this build
    /// does not define.
    #[test]
    fn a_newer_peers_unknown_kinds_and_fields_are_skipped() {
        // A SyncMessage whose oneof is field 15 (a kind from the future): decodes to no kind.
        let mut future_msg = vec![(15 << 3) | 2, 2, 0x08, 0x01];
        let m = pb::SyncMessage::decode(future_msg.as_slice()).unwrap();
        assert_eq!(decode(&m), None);

        // A batch of [unknown item kind 14, a known item], plus an unknown field 15 in the
        // batch: the unknown item keeps seq 7, the known one is seq 8.
        let known = encode_item(&Item::ConnGone(tuple(
            "198.51.100.1",
            "203.0.113.1",
            1,
            2,
            6,
        )))
        .encode_to_vec();
        let unknown_item = vec![14 << 3, 1];
        let mut batch = vec![0x08, 7]; // first_seq = 7
        for it in [&unknown_item, &known] {
            batch.push((2 << 3) | 2);
            batch.push(it.len() as u8);
            batch.extend_from_slice(it);
        }
        batch.extend_from_slice(&[15 << 3, 3]);
        future_msg.clear();
        future_msg.push((2 << 3) | 2);
        future_msg.push(batch.len() as u8);
        future_msg.extend_from_slice(&batch);
        let m = pb::SyncMessage::decode(future_msg.as_slice()).unwrap();
        assert_eq!(
            decode(&m),
            Some(Msg::Batch {
                first_seq: 7,
                items: vec![
                    Item::Skipped(Skip::UnknownKind),
                    Item::ConnGone(tuple("198.51.100.1", "203.0.113.1", 1, 2, 6)),
                ]
            })
        );

        // A Hello from version 7 with an unknown field 12: read, version reported as is (the
        // core decides what it accepts).
        let mut hello = pb::SyncHello {
            version: 7,
            node_id: 1,
            boot_id: 2,
            resume: None,
        }
        .encode_to_vec();
        hello.extend_from_slice(&[12 << 3, 1]);
        let mut m = vec![(1 << 3) | 2, hello.len() as u8];
        m.extend_from_slice(&hello);
        let m = pb::SyncMessage::decode(m.as_slice()).unwrap();
        assert!(matches!(
            decode(&m),
            Some(Msg::Hello(Hello { version: 7, .. }))
        ));
    }
}
