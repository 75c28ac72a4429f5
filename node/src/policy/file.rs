//! The policy file format (TOML) and its validation.
//!
//! Why TOML: operators already edit TOML (our daemon config is TOML too), it has comments,
//! ordered arrays of tables (`[[rule]]`) read top to bottom like a rule list, and the parser
//! gives byte spans for every value, so each error names `file:line:column`, the rule and the
//! field. A home-grown nft-like language would need its own grammar, quoting and error recovery
//! for no gain in what can be expressed.
//!
//! Owns: text → `PolicyModel`, all-or-nothing. Any error rejects the whole file; the caller
//! keeps its running policy. Must not touch interfaces, compilation or I/O.
//!
//! ```toml
//! default = "drop"            # accept | drop | reject (default: drop, fail closed)
//! default_log = true          # log what the default decides (default: false)
//!
//! [[rule]]
//! name = "lan-to-web"         # optional, unique
//! in = "lan0"                 # input interface (optional); out = "wan0"
//! src = "198.51.100.0/24"     # CIDR or address, or a list of them (v4 and v6)
//! dst = ["203.0.113.0/24", "2001:db8:2::/64"]
//! proto = "tcp"               # tcp | udp | icmp | icmpv6 | a number 0-255
//! dport = [80, 443, "8000-8100"]   # tcp/udp only; sport likewise
//! icmp_type = ["echo-request", 3]  # icmp/icmpv6 only: names or numbers
//! ct = ["new"]                # new | established | related | invalid (default: any)
//! action = "accept"           # required
//! log = true                  # send matching packets to the NFLOG group (default: false)
//! ```

use std::collections::HashSet;
use std::net::IpAddr;
use std::ops::Range;

use ipnet::IpNet;
use serde::Deserialize;
use toml::{Spanned, Value};

use super::model::{Action, CtSet, PolicyModel, PortRange, Rule};
use crate::conntrack::CtState;
use crate::packet::proto;

/// A policy that could not be accepted, with the place and the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{origin}:{line}:{column}: {context}{message}")]
pub struct PolicyError {
    /// File name or other origin ("fwctl apply", "raft entry 12").
    pub origin: String,
    pub line: usize,
    pub column: usize,
    /// `rule[3] (name "web") field "dport": ` or empty.
    pub context: String,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    default: Option<Spanned<String>>,
    default_log: Option<Spanned<bool>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

type Field = Option<Spanned<Value>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<Spanned<String>>,
    #[serde(rename = "in")]
    iif: Option<Spanned<String>>,
    #[serde(rename = "out")]
    oif: Option<Spanned<String>>,
    src: Field,
    dst: Field,
    proto: Field,
    sport: Field,
    dport: Field,
    icmp_type: Field,
    ct: Field,
    action: Option<Spanned<String>>,
    log: Option<Spanned<bool>>,
}

struct Ctx<'a> {
    origin: &'a str,
    /// Byte offset where each line starts.
    line_starts: Vec<usize>,
}

impl Ctx<'_> {
    fn new<'a>(origin: &'a str, text: &str) -> Ctx<'a> {
        let starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1));
        Ctx {
            origin,
            line_starts: starts.collect(),
        }
    }
    /// 1-based line and column (in bytes) of a byte offset.
    fn line_col(&self, off: usize) -> (usize, usize) {
        let line = self.line_starts.partition_point(|&s| s <= off).max(1);
        (line, off - self.line_starts[line - 1] + 1)
    }
    fn err(&self, span: Range<usize>, context: String, message: impl Into<String>) -> PolicyError {
        let (line, column) = self.line_col(span.start);
        PolicyError {
            origin: self.origin.to_string(),
            line,
            column,
            context,
            message: message.into(),
        }
    }
}

/// Parse and validate a policy. `origin` names the source in error messages.
pub fn parse(text: &str, origin: &str) -> Result<PolicyModel, PolicyError> {
    let cx = Ctx::new(origin, text);
    let raw: RawPolicy = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let msg = e.message().trim();
        // The parser says nothing at all for some inputs, such as a key without a value.
        let msg = if msg.is_empty() {
            "malformed TOML here (a missing or unreadable value?)"
        } else {
            msg
        };
        cx.err(span, String::new(), msg)
    })?;
    let default = match &raw.default {
        None => Action::Drop,
        Some(d) => action(d.get_ref()).ok_or_else(|| {
            cx.err(
                d.span(),
                "default: ".into(),
                format!("unknown action {:?} (accept, drop, reject)", d.get_ref()),
            )
        })?,
    };
    let mut names = HashSet::new();
    let mut rules = Vec::with_capacity(raw.rule.len());
    for (i, r) in raw.rule.iter().enumerate() {
        let rule_span = r.span();
        let r = r.get_ref();
        let label = match &r.name {
            Some(n) => format!("rule[{i}] (name {:?})", n.get_ref()),
            None => format!("rule[{i}]"),
        };
        let fe = |span: Range<usize>, field: &str, msg: String| {
            cx.err(span, format!("{label} field {field:?}: "), msg)
        };
        if let Some(n) = &r.name {
            if n.get_ref().is_empty() {
                return Err(fe(n.span(), "name", "must not be empty".into()));
            }
            if !names.insert(n.get_ref().clone()) {
                return Err(fe(
                    n.span(),
                    "name",
                    format!("duplicate rule name {:?}", n.get_ref()),
                ));
            }
        }
        let action = match &r.action {
            None => {
                return Err(cx.err(rule_span, format!("{label}: "), "missing field \"action\""))
            }
            Some(a) => action(a.get_ref()).ok_or_else(|| {
                fe(
                    a.span(),
                    "action",
                    format!("unknown action {:?} (accept, drop, reject)", a.get_ref()),
                )
            })?,
        };
        let proto = match &r.proto {
            None => None,
            Some(p) => Some(protocol(p.get_ref()).map_err(|m| fe(p.span(), "proto", m))?),
        };
        let nets = |f: &Field, name: &str| -> Result<Vec<IpNet>, PolicyError> {
            match f {
                None => Ok(vec![]),
                Some(v) => list(v.get_ref())
                    .and_then(|items| items.iter().map(cidr).collect())
                    .map_err(|m| fe(v.span(), name, m)),
            }
        };
        let src = nets(&r.src, "src")?;
        let dst = nets(&r.dst, "dst")?;
        let ports = |f: &Field, name: &str| -> Result<Vec<PortRange>, PolicyError> {
            let Some(v) = f else { return Ok(vec![]) };
            if !matches!(proto, Some(proto::TCP | proto::UDP)) {
                return Err(fe(
                    v.span(),
                    name,
                    "ports need proto = \"tcp\" or \"udp\"".into(),
                ));
            }
            list(v.get_ref())
                .and_then(|items| items.iter().map(port_range).collect())
                .map_err(|m| fe(v.span(), name, m))
        };
        let sport = ports(&r.sport, "sport")?;
        let dport = ports(&r.dport, "dport")?;
        let icmp_type = match &r.icmp_type {
            None => vec![],
            Some(v) => {
                let v6 = match proto {
                    Some(proto::ICMP) => false,
                    Some(proto::ICMPV6) => true,
                    _ => {
                        return Err(fe(
                            v.span(),
                            "icmp_type",
                            "needs proto = \"icmp\" or \"icmpv6\"".into(),
                        ))
                    }
                };
                list(v.get_ref())
                    .and_then(|items| items.iter().map(|x| icmp_type(x, v6)).collect())
                    .map_err(|m| fe(v.span(), "icmp_type", m))?
            }
        };
        let ct = match &r.ct {
            None => None,
            Some(v) => Some(ct_set(v.get_ref()).map_err(|m| fe(v.span(), "ct", m))?),
        };
        // Rules that can never match are mistakes: say so instead of silently ignoring them.
        let fam = |n: &[IpNet]| {
            (
                n.iter().any(|x| x.addr().is_ipv4()),
                n.iter().any(|x| x.addr().is_ipv6()),
            )
        };
        let (s4, s6) = if src.is_empty() {
            (true, true)
        } else {
            fam(&src)
        };
        let (d4, d6) = if dst.is_empty() {
            (true, true)
        } else {
            fam(&dst)
        };
        let (p4, p6) = match proto {
            Some(proto::ICMP) => (true, false),
            Some(proto::ICMPV6) => (false, true),
            _ => (true, true),
        };
        if !((s4 && d4 && p4) || (s6 && d6 && p6)) {
            let span = r
                .dst
                .as_ref()
                .or(r.src.as_ref())
                .map(|v| v.span())
                .unwrap_or(rule_span.clone());
            return Err(fe(
                span,
                "dst",
                "address families of src, dst and proto never match together".into(),
            ));
        }
        let iif = r
            .iif
            .as_ref()
            .map(|s| s.get_ref().clone())
            .filter(|s| s != "*");
        let oif = r
            .oif
            .as_ref()
            .map(|s| s.get_ref().clone())
            .filter(|s| s != "*");
        for (f, n) in [(&r.iif, "in"), (&r.oif, "out")] {
            if let Some(s) = f {
                let v = s.get_ref();
                if v.is_empty() || v.len() > 15 || v.contains(['/', ' ']) {
                    return Err(fe(s.span(), n, format!("{v:?} is not an interface name")));
                }
            }
        }
        rules.push(Rule {
            name: r.name.as_ref().map(|n| n.get_ref().clone()),
            line: cx.line_col(rule_span.start).0,
            iif,
            oif,
            src,
            dst,
            proto,
            sport,
            dport,
            icmp_type,
            ct,
            action,
            log: r.log.as_ref().is_some_and(|l| *l.get_ref()),
        });
    }
    let default_log = raw
        .default_log
        .as_ref()
        .filter(|l| *l.get_ref())
        .map(|l| cx.line_col(l.span().start).0);
    Ok(PolicyModel {
        default,
        default_log,
        rules,
    })
}

/// Refuse a policy that logs more rules (`log = true`, and the default with `default_log`) than
/// the datapath can tell apart: `max` is what its log mark bits can number
/// (`datapath.log_mark`). The error names the first rule (or the `default_log` line) beyond it.
pub fn check_logged(model: &PolicyModel, origin: &str, max: usize) -> Result<(), PolicyError> {
    let too_many = |line: usize, context: String| PolicyError {
        origin: origin.to_string(),
        line,
        column: 1,
        context,
        message: format!(
            "more than {max} logged rules (log = true, default_log counts as one); the \
             datapath's log mark bits (datapath.log_mark) number at most {max}: log fewer \
             rules or give datapath.log_mark more bits"
        ),
    };
    let mut n = 0;
    for (i, r) in model.rules.iter().enumerate().filter(|(_, r)| r.log) {
        n += 1;
        if n > max {
            let label = match &r.name {
                Some(name) => format!("rule[{i}] (name {name:?}) field \"log\": "),
                None => format!("rule[{i}] field \"log\": "),
            };
            return Err(too_many(r.line, label));
        }
    }
    match model.default_log {
        Some(line) if n + 1 > max => Err(too_many(line, "default_log: ".into())),
        _ => Ok(()),
    }
}

fn action(s: &str) -> Option<Action> {
    match s {
        "accept" => Some(Action::Accept),
        "drop" => Some(Action::Drop),
        "reject" => Some(Action::Reject),
        _ => None,
    }
}

fn list(v: &Value) -> Result<Vec<Value>, String> {
    match v {
        Value::Array(a) if a.is_empty() => {
            Err("empty list (leave the field out to match any)".into())
        }
        Value::Array(a) => Ok(a.clone()),
        other => Ok(vec![other.clone()]),
    }
}

fn protocol(v: &Value) -> Result<u8, String> {
    match v {
        Value::String(s) => match s.as_str() {
            "tcp" => Ok(proto::TCP),
            "udp" => Ok(proto::UDP),
            "icmp" => Ok(proto::ICMP),
            "icmpv6" | "ipv6-icmp" => Ok(proto::ICMPV6),
            _ => Err(format!(
                "unknown protocol {s:?} (tcp, udp, icmp, icmpv6 or a number)"
            )),
        },
        Value::Integer(n) => {
            u8::try_from(*n).map_err(|_| format!("protocol {n} out of range 0-255"))
        }
        _ => Err("expected a protocol name or number".into()),
    }
}

fn cidr(v: &Value) -> Result<IpNet, String> {
    let Value::String(s) = v else {
        return Err("expected an address or CIDR string".into());
    };
    parse_net(s)
}

/// An address (a /32 or /128) or a network in CIDR notation without host bits, as the policy
/// and the config files write them.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(a) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(a));
    }
    let n: IpNet = s
        .parse()
        .map_err(|_| format!("{s:?} is not an address or CIDR"))?;
    if n.trunc() != n {
        return Err(format!(
            "{s:?} has host bits set; did you mean \"{}\"?",
            n.trunc()
        ));
    }
    Ok(n)
}

fn port(n: i64) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(format!("port {n} out of range 1-65535")),
    }
}

fn port_range(v: &Value) -> Result<PortRange, String> {
    match v {
        Value::Integer(n) => port(*n).map(|p| PortRange { lo: p, hi: p }),
        Value::String(s) => {
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            let num = |x: &str| {
                x.trim()
                    .parse::<i64>()
                    .map_err(|_| format!("{s:?} is not a port or range like \"1024-65535\""))
            };
            let (lo, hi) = (port(num(a)?)?, port(num(b)?)?);
            if lo > hi {
                return Err(format!("range {s:?} is inverted"));
            }
            Ok(PortRange { lo, hi })
        }
        _ => Err("expected a port number or a \"lo-hi\" range".into()),
    }
}

fn icmp_type(v: &Value, v6: bool) -> Result<u8, String> {
    match v {
        Value::Integer(n) => {
            u8::try_from(*n).map_err(|_| format!("icmp type {n} out of range 0-255"))
        }
        Value::String(s) => {
            let t = match (s.as_str(), v6) {
                ("echo-reply", false) => 0,
                ("destination-unreachable", false) => 3,
                ("redirect", false) => 5,
                ("echo-request", false) => 8,
                ("time-exceeded", false) => 11,
                ("parameter-problem", false) => 12,
                ("destination-unreachable", true) => 1,
                ("packet-too-big", true) => 2,
                ("time-exceeded", true) => 3,
                ("parameter-problem", true) => 4,
                ("echo-request", true) => 128,
                ("echo-reply", true) => 129,
                _ => {
                    return Err(format!(
                        "unknown {} type {s:?}",
                        if v6 { "icmpv6" } else { "icmp" }
                    ))
                }
            };
            Ok(t)
        }
        _ => Err("expected an icmp type name or number".into()),
    }
}

fn ct_set(v: &Value) -> Result<CtSet, String> {
    let mut set = CtSet::default();
    for x in list(v)? {
        let Value::String(s) = &x else {
            return Err("expected ct state names".into());
        };
        set.insert(match s.as_str() {
            "new" => CtState::New,
            "established" => CtState::Established,
            "related" => CtState::Related,
            "invalid" => CtState::Invalid,
            _ => {
                return Err(format!(
                    "unknown ct state {s:?} (new, established, related, invalid)"
                ))
            }
        });
    }
    Ok(set)
}
