//! The local tracker for the control API: the one connection filter that listing, counting and
//! an operator's delete share, and the conversion of snapshots to `keepstate.v1` messages.
//!
//! Counting builds no snapshot; listing and deleting go page by page
//! (`Conntrack::count_where`, `snapshots_page`, `delete_where`): one shard lock at a time,
//! dropped every few thousand slots, so a walk over a million entries never stalls the datapath
//! for long. The only change it makes to the table is `delete` (an operator's `fwctl ct
//! delete`); the rest is read-only.

use std::net::IpAddr;

use keepstate_proto::v1;

use crate::conntrack::event::status;
use crate::conntrack::helper_state::HelperKind;
use crate::conntrack::tuple::ip_from_bytes;
use crate::conntrack::{ConnInfo, ConnSnapshot, Conntrack, ExpectSnapshot, ListCursor, ProtoState};
use crate::time::Timestamp;

/// A parsed `ConnectionFilter`. `addr`/`port` match either end of the original tuple,
/// `src`/`dst`/`sport`/`dport` one end.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Filter {
    proto: Option<u8>,
    addr: Option<IpAddr>,
    port: Option<u16>,
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    sport: Option<u16>,
    dport: Option<u16>,
    state: Option<String>,
    /// `Some(true)`: learned from a peer and not used here yet; `Some(false)`: the others.
    from_peer: Option<bool>,
}

fn parse_addr(what: &str, a: &str) -> Result<Option<IpAddr>, String> {
    match a {
        "" => Ok(None),
        a => a
            .parse()
            .map(Some)
            .map_err(|_| format!("{what} {a:?} is not an IP address")),
    }
}

fn parse_port(what: &str, p: u32) -> Result<Option<u16>, String> {
    match p {
        0 => Ok(None),
        p => u16::try_from(p)
            .map(Some)
            .map_err(|_| format!("{what} {p} is not 1..=65535")),
    }
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
        let state = (!f.tcp_state.is_empty()).then(|| f.tcp_state.to_ascii_uppercase());
        let from_peer = match f.origin.as_str() {
            "" => None,
            "peer" => Some(true),
            "local" => Some(false),
            o => return Err(format!("origin {o:?} is not \"local\" or \"peer\"")),
        };
        Ok(Filter {
            proto,
            addr: parse_addr("addr", &f.addr)?,
            port: parse_port("port", f.port)?,
            src: parse_addr("src", &f.src)?,
            dst: parse_addr("dst", &f.dst)?,
            sport: parse_port("src_port", f.src_port)?,
            dport: parse_port("dst_port", f.dst_port)?,
            state,
            from_peer,
        })
    }

    /// No condition at all: matches every connection.
    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    fn matches(&self, c: &ConnInfo) -> bool {
        let t = &c.tuple;
        self.proto.is_none_or(|p| p == t.proto)
            && self.addr.is_none_or(|a| a == t.src_ip() || a == t.dst_ip())
            && self.port.is_none_or(|p| p == t.src_port || p == t.dst_port)
            && self.src.is_none_or(|a| a == t.src_ip())
            && self.dst.is_none_or(|a| a == t.dst_ip())
            && self.sport.is_none_or(|p| p == t.src_port)
            && self.dport.is_none_or(|p| p == t.dst_port)
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

/// An operator's delete: kill the connections `f` matches, here and (replicated as kills) on
/// the peers; how many connections and expectations went here. `all` must be said explicitly:
/// an empty filter is refused, and `all` with a filter is too (one of them is a mistake).
pub fn delete(ct: &Conntrack, now: Timestamp, f: &Filter, all: bool) -> Result<(u64, u64), String> {
    match (all, f.is_empty()) {
        (false, true) => Err(
            "a delete needs at least one filter (protocol, address, port, state, origin), or \
             `all` to delete every connection"
                .into(),
        ),
        (true, false) => Err("`all` deletes every connection: give it without a filter".into()),
        _ => Ok(ct.delete_where(now, |c| f.matches(c))),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::Config;
    use crate::packet::build::{self, TcpSpec};
    use crate::packet::{Packet, TcpFlags};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A table with a TCP SYN 198.51.100.10:40000 → 203.0.113.10:80, a UDP flow
    /// 198.51.100.11:5353 → 203.0.113.10:53, and one over IPv6 2001:db8:1::10:40001 →
    /// 2001:db8:2::10:443.
    fn table() -> Conntrack {
        let ct = Conntrack::new(&Config {
            shards: 4,
            ..Config::default()
        });
        let pkts = [
            build::tcp(
                ip("198.51.100.10"),
                ip("203.0.113.10"),
                &TcpSpec::new(40000, 80, TcpFlags::SYN),
            ),
            build::udp(ip("198.51.100.11"), ip("203.0.113.10"), 5353, 53, b""),
            build::tcp(
                ip("2001:db8:1::10"),
                ip("2001:db8:2::10"),
                &TcpSpec::new(40001, 443, TcpFlags::SYN),
            ),
        ];
        for b in &pkts {
            let p = Packet::parse(b).unwrap();
            assert!(ct.track(Timestamp::from_millis(0), &p).created);
        }
        ct
    }

    fn filter(f: v1::ConnectionFilter) -> Filter {
        Filter::parse(Some(f)).unwrap()
    }

    fn n(ct: &Conntrack, f: v1::ConnectionFilter) -> u64 {
        count(ct, Timestamp::from_millis(1), &filter(f))
    }

    #[test]
    fn filters_match_either_end_or_one_end() {
        let ct = table();
        let f = v1::ConnectionFilter::default;
        assert_eq!(n(&ct, f()), 3);
        let cases: [(v1::ConnectionFilter, u64); 12] = [
            (v1::ConnectionFilter { protocol: 6, ..f() }, 2),
            (
                v1::ConnectionFilter {
                    addr: "203.0.113.10".into(),
                    ..f()
                },
                2,
            ),
            (v1::ConnectionFilter { port: 53, ..f() }, 1),
            (v1::ConnectionFilter { port: 5353, ..f() }, 1),
            // One end: the server is the destination of every original tuple, never the source.
            (
                v1::ConnectionFilter {
                    dst: "203.0.113.10".into(),
                    ..f()
                },
                2,
            ),
            (
                v1::ConnectionFilter {
                    src: "203.0.113.10".into(),
                    ..f()
                },
                0,
            ),
            (
                v1::ConnectionFilter {
                    src: "2001:db8:1::10".into(),
                    ..f()
                },
                1,
            ),
            (
                v1::ConnectionFilter {
                    dst_port: 80,
                    ..f()
                },
                1,
            ),
            (
                v1::ConnectionFilter {
                    src_port: 80,
                    ..f()
                },
                0,
            ),
            (
                v1::ConnectionFilter {
                    src_port: 40000,
                    dst_port: 80,
                    ..f()
                },
                1,
            ),
            (
                v1::ConnectionFilter {
                    protocol: 17,
                    dst_port: 80,
                    ..f()
                },
                0,
            ),
            (
                v1::ConnectionFilter {
                    tcp_state: "syn_sent".into(),
                    ..f()
                },
                2,
            ),
        ];
        for (i, (c, want)) in cases.into_iter().enumerate() {
            assert_eq!(n(&ct, c.clone()), want, "case {i}: {c:?}");
        }
        for bad in [
            v1::ConnectionFilter {
                src: "nope".into(),
                ..f()
            },
            v1::ConnectionFilter {
                dst_port: 70000,
                ..f()
            },
            v1::ConnectionFilter {
                origin: "both".into(),
                ..f()
            },
        ] {
            assert!(Filter::parse(Some(bad)).is_err());
        }
        assert!(Filter::parse(None).unwrap().is_empty());
        assert!(filter(f()).is_empty());
        assert!(!filter(v1::ConnectionFilter { dst_port: 1, ..f() }).is_empty());
    }

    #[test]
    fn a_delete_needs_a_filter_or_all_but_not_both() {
        let ct = table();
        let now = Timestamp::from_millis(1);
        let f = v1::ConnectionFilter::default;
        let e = delete(&ct, now, &filter(f()), false).unwrap_err();
        assert!(e.contains("at least one filter"), "{e}");
        let dport = filter(v1::ConnectionFilter {
            dst_port: 80,
            ..f()
        });
        let e = delete(&ct, now, &dport, true).unwrap_err();
        assert!(e.contains("without a filter"), "{e}");
        assert_eq!(ct.len(), 3, "a refused delete deletes nothing");
        let none = filter(v1::ConnectionFilter { dst_port: 9, ..f() });
        assert_eq!(delete(&ct, now, &none, false), Ok((0, 0)));
        assert_eq!(delete(&ct, now, &dport, false), Ok((1, 0)));
        assert_eq!(ct.len(), 2);
        assert_eq!(delete(&ct, now, &filter(f()), true), Ok((2, 0)));
        assert!(ct.is_empty());
    }
}
