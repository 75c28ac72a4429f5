//! Listing the local tracker for the control API: filters and the conversion of snapshots to
//! `keepstate.v1` messages.
//!
//! Owns only read-side views. Counting builds no snapshot and listing goes page by page
//! (`Conntrack::count_where`, `snapshots_page`): one shard lock at a time, dropped every few
//! thousand slots, so a listing of a million entries never stalls the datapath for long. Must
//! never modify the table.

use std::net::IpAddr;

use keepstate_proto::v1;

use crate::conntrack::event::status;
use crate::conntrack::helper_state::HelperKind;
use crate::conntrack::tuple::ip_from_bytes;
use crate::conntrack::{ConnInfo, ConnSnapshot, Conntrack, ExpectSnapshot, ListCursor, ProtoState};
use crate::time::Timestamp;

/// A parsed `ConnectionFilter`.
#[derive(Debug, Default)]
pub struct Filter {
    proto: Option<u8>,
    addr: Option<IpAddr>,
    port: Option<u16>,
    state: Option<String>,
    /// `Some(true)`: learned from a peer and not used here yet; `Some(false)`: the others.
    from_peer: Option<bool>,
}

impl Filter {
    pub fn parse(f: Option<v1::ConnectionFilter>) -> Result<Filter, String> {
        let Some(f) = f else {
            return Ok(Filter::default());
        };
        let proto = match f.protocol {
            0 => None,
            p => Some(u8::try_from(p).map_err(|_| format!("protocol {p} is not 0..=255"))?),
        };
        let addr = match f.addr.as_str() {
            "" => None,
            a => Some(
                a.parse()
                    .map_err(|_| format!("addr {a:?} is not an IP address"))?,
            ),
        };
        let port = match f.port {
            0 => None,
            p => Some(u16::try_from(p).map_err(|_| format!("port {p} is not 1..=65535"))?),
        };
        let state = (!f.tcp_state.is_empty()).then(|| f.tcp_state.to_ascii_uppercase());
        let from_peer = match f.origin.as_str() {
            "" => None,
            "peer" => Some(true),
            "local" => Some(false),
            o => return Err(format!("origin {o:?} is not \"local\" or \"peer\"")),
        };
        Ok(Filter {
            proto,
            addr,
            port,
            state,
            from_peer,
        })
    }

    fn matches(&self, c: &ConnInfo) -> bool {
        let t = &c.tuple;
        self.proto.is_none_or(|p| p == t.proto)
            && self.addr.is_none_or(|a| a == t.src_ip() || a == t.dst_ip())
            && self.port.is_none_or(|p| p == t.src_port || p == t.dst_port)
            && self
                .state
                .as_deref()
                .is_none_or(|s| s == state_name(&c.proto))
            && self
                .from_peer
                .is_none_or(|p| p == (c.status & status::FROM_PEER != 0))
    }
}

fn state_name(p: &ProtoState) -> &'static str {
    match p {
        ProtoState::Tcp(t) => t.state.get().name(),
        _ => "-",
    }
}

fn helper_name(h: Option<HelperKind>) -> String {
    match h {
        Some(HelperKind::Ftp) => "ftp".into(),
        None => String::new(),
    }
}

fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 132 | 136)
}

fn to_proto(c: &ConnSnapshot) -> v1::Connection {
    let t = &c.tuple;
    let ports = has_ports(t.proto);
    v1::Connection {
        protocol: u32::from(t.proto),
        src: t.src_ip().to_string(),
        dst: t.dst_ip().to_string(),
        src_port: if ports { u32::from(t.src_port) } else { 0 },
        dst_port: if ports { u32::from(t.dst_port) } else { 0 },
        state: state_name(&c.proto).into(),
        assured: c.status & status::ASSURED != 0,
        seen_reply: c.status & status::SEEN_REPLY != 0,
        related: c.status & status::RELATED != 0,
        from_peer: c.status & status::FROM_PEER != 0,
        expires_in_ms: c.expires_in_ms,
        helper: helper_name(c.helper.as_ref().map(|h| h.kind)),
    }
}

/// One page of up to `limit` matching connections from `page_token` (0 = the start), and the
/// token of the next page (0 = the listing is complete).
pub fn list(
    ct: &Conntrack,
    now: Timestamp,
    f: &Filter,
    limit: usize,
    page_token: u64,
) -> (Vec<v1::Connection>, u64) {
    let page = ct.snapshots_page(ListCursor::from_token(page_token), limit, now, |c| {
        f.matches(c)
    });
    let conns = page.conns.iter().map(to_proto).collect();
    // Token 0 is the start, so a cursor at the very start (an empty first page) is never a
    // "next" token; `snapshots_page` always moves forward, so this cannot happen after a page.
    let next = page.next.map_or(0, |c| c.to_token().max(1));
    (conns, next)
}

pub fn count(ct: &Conntrack, now: Timestamp, f: &Filter) -> u64 {
    ct.count_where(now, |c| f.matches(c))
}

fn expect_to_proto(e: &ExpectSnapshot) -> v1::Expectation {
    v1::Expectation {
        protocol: u32::from(e.proto),
        src: ip_from_bytes(e.src, e.family).to_string(),
        src_port: e.src_port.map_or(0, u32::from),
        dst: ip_from_bytes(e.dst, e.family).to_string(),
        dst_port: u32::from(e.dst_port),
        expires_in_ms: e.expires_in_ms,
        helper: helper_name(e.helper),
        master_src: e.master.src_ip().to_string(),
        master_dst: e.master.dst_ip().to_string(),
        master_src_port: u32::from(e.master.src_port),
        master_dst_port: u32::from(e.master.dst_port),
    }
}

pub fn expectations(ct: &Conntrack, now: Timestamp) -> Vec<v1::Expectation> {
    let mut out = Vec::new();
    for i in 0..ct.shard_count() {
        out.extend(ct.lock(i).expectations(now).map(|e| expect_to_proto(&e)));
    }
    out
}
