//! Compilation of a `PolicyModel` into a `CompiledPolicy`, and its first-match evaluation.
//!
//! Owns the matcher layout: rules become fixed-size records whose address, port and ICMP lists
//! are ranges into three flat arrays, and the rules are pre-partitioned by protocol so a packet
//! only visits the rules that can match its protocol, in order. Interface names become slots of
//! the shared `Interfaces` registry, read at evaluation time, so a rule follows its interface as
//! it appears, disappears or is re-created. Evaluation counts the packet against the rule that
//! decided (`counters`), allocates nothing and takes no lock. Keeps the model it was compiled
//! from, for the rules' names and the counters' carry-over. Must not touch I/O, the tracker or
//! the file format.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::counters::{carry_map, Count, Counters};
use super::ifaces::{IfSlot, Interfaces};
use super::model::{Action, CtSet, PolicyModel};
use crate::conntrack::CtState;
use crate::packet::proto;
use crate::time::Timestamp;

/// What the datapath knows about a packet when it asks the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketMeta {
    /// Input and output interface indexes (0 = unknown).
    pub iif: u32,
    pub oif: u32,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub icmp_type: Option<u8>,
    pub ct: CtState,
    /// The packet's length on the wire (IP header included), for the rule's byte counter.
    pub len: u32,
    /// When the datapath judged it, for the rule's last match.
    pub now: Timestamp,
}

/// The policy's answer: the action and the rule that decided (`None` = default action).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub rule: Option<u32>,
}

/// An address prefix in a family-tagged 128-bit form.
#[derive(Clone, Copy, Debug)]
struct Net {
    addr: u128,
    mask: u128,
    v6: bool,
}

#[derive(Clone, Copy, Debug)]
struct Span {
    start: u32,
    len: u32,
}

impl Span {
    #[inline]
    fn of<T>(self, v: &[T]) -> &[T] {
        let s = self.start as usize;
        v.get(s..s + self.len as usize).unwrap_or(&[])
    }
}

#[derive(Clone, Copy, Debug)]
struct CRule {
    /// Interfaces: 0 = any, else 1 + an index into `CompiledPolicy::ifaces`.
    iif: u32,
    oif: u32,
    ct: u8,
    /// Bit 0: may match IPv4; bit 1: may match IPv6.
    families: u8,
    src: Span,
    dst: Span,
    sport: Span,
    dport: Span,
    icmp: Span,
    action: Action,
}

/// Protocol buckets: each holds the rules (in order) that can match that protocol.
const BUCKETS: usize = 5;
#[inline]
fn bucket(p: u8) -> usize {
    match p {
        proto::TCP => 0,
        proto::UDP => 1,
        proto::ICMP => 2,
        proto::ICMPV6 => 3,
        _ => 4,
    }
}

/// A compiled, immutable policy with per-rule counters.
#[derive(Debug)]
pub struct CompiledPolicy {
    rules: Vec<CRule>,
    /// The exact protocol of rules in bucket 4 ("other"), or 0x100 for any.
    protos: Vec<u16>,
    buckets: [Vec<u32>; BUCKETS],
    nets: Vec<Net>,
    ports: Vec<(u16, u16)>,
    icmp: Vec<u8>,
    /// The registry slots the rules name, each once.
    ifaces: Box<[Arc<IfSlot>]>,
    default: Action,
    /// One counter per rule, in order, then the default's.
    counters: Counters,
    /// What this was compiled from.
    model: PolicyModel,
    /// The log slot of each rule, then of the default (0: not logged; see `log_slot`).
    log_slots: Box<[u16]>,
    /// Whether any rule or the default is logged: the one branch the datapath pays for
    /// logging when nothing is logged.
    logs: bool,
    log_entries: Vec<LogEntry>,
}

/// A logged rule (or the default), as the kernel's NFLOG rules name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// 1, 2, ...: the logged rules in order, then the default.
    pub slot: u16,
    /// The rule's index (`None`: the default action).
    pub rule: Option<u32>,
    pub name: Option<String>,
    pub action: Action,
}

#[inline]
fn key(a: IpAddr) -> (u128, bool) {
    match a {
        IpAddr::V4(v) => (u128::from(u32::from(v)), false),
        IpAddr::V6(v) => (u128::from(v), true),
    }
}

impl CompiledPolicy {
    /// Compile `model`, interning its interface names in `ifs`. A rule naming an interface that
    /// does not exist now is kept (it matches once the interface appears) and a warning says so.
    pub fn compile(model: &PolicyModel, ifs: &Interfaces) -> (Self, Vec<String>) {
        let mut warnings = vec![];
        let mut slots: Vec<Arc<IfSlot>> = vec![];
        let mut slot_of: HashMap<String, u32> = HashMap::new();
        let mut c = CompiledPolicy {
            rules: Vec::with_capacity(model.rules.len()),
            protos: Vec::with_capacity(model.rules.len()),
            buckets: Default::default(),
            nets: vec![],
            ports: vec![],
            icmp: vec![],
            ifaces: Box::new([]),
            default: model.default,
            log_slots: Box::new([]),
            logs: false,
            log_entries: vec![],
            counters: Counters::new(model.rules.len() + 1),
            model: model.clone(),
        };
        for (i, r) in model.rules.iter().enumerate() {
            let mut ifx = |name: &Option<String>, what: &str| {
                let Some(n) = name else { return 0 };
                let id = match slot_of.get(n.as_str()) {
                    Some(&id) => id,
                    None => {
                        slots.push(ifs.intern(n));
                        slot_of.insert(n.clone(), slots.len() as u32);
                        slots.len() as u32
                    }
                };
                if slots.get(id as usize - 1).is_some_and(|s| s.get() == 0) {
                    let rule = match &r.name {
                        Some(name) => format!("rule[{i}] (name {name:?}, line {})", r.line),
                        None => format!("rule[{i}] (line {})", r.line),
                    };
                    warnings.push(format!(
                        "{rule}: {what} interface {n:?} does not exist now; the rule is kept and \
                         matches once the interface appears"
                    ));
                }
                id
            };
            let iif = ifx(&r.iif, "input");
            let oif = ifx(&r.oif, "output");
            let push_nets = |nets: &mut Vec<Net>, list: &[ipnet::IpNet]| {
                let start = nets.len() as u32;
                for n in list {
                    let (addr, v6) = key(n.network());
                    let (mask, _) = key(n.netmask());
                    nets.push(Net { addr, mask, v6 });
                }
                Span {
                    start,
                    len: list.len() as u32,
                }
            };
            let src = push_nets(&mut c.nets, &r.src);
            let dst = push_nets(&mut c.nets, &r.dst);
            let push_ports = |ports: &mut Vec<(u16, u16)>, list: &[super::model::PortRange]| {
                let start = ports.len() as u32;
                ports.extend(list.iter().map(|p| (p.lo, p.hi)));
                Span {
                    start,
                    len: list.len() as u32,
                }
            };
            let sport = push_ports(&mut c.ports, &r.sport);
            let dport = push_ports(&mut c.ports, &r.dport);
            let icmp = Span {
                start: c.icmp.len() as u32,
                len: r.icmp_type.len() as u32,
            };
            c.icmp.extend_from_slice(&r.icmp_type);
            let fam = |l: &[ipnet::IpNet]| {
                if l.is_empty() {
                    3
                } else {
                    l.iter()
                        .fold(0u8, |f, n| f | if n.addr().is_ipv4() { 1 } else { 2 })
                }
            };
            let mut families = fam(&r.src) & fam(&r.dst);
            match r.proto {
                Some(proto::ICMP) => families &= 1,
                Some(proto::ICMPV6) => families &= 2,
                _ => {}
            }
            c.rules.push(CRule {
                iif,
                oif,
                ct: r.ct.unwrap_or(CtSet::ANY).0,
                families,
                src,
                dst,
                sport,
                dport,
                icmp,
                action: r.action,
            });
            c.protos.push(r.proto.map_or(0x100, u16::from));
            match r.proto {
                Some(p) => c.buckets[bucket(p)].push(i as u32),
                None => c.buckets.iter_mut().for_each(|b| b.push(i as u32)),
            }
        }
        c.ifaces = slots.into_boxed_slice();
        let logged = model
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| (Some(i as u32), r.log, r.name.clone(), r.action))
            .chain(std::iter::once((
                None,
                model.default_log.is_some(),
                None,
                model.default,
            )));
        let mut log_slots = Vec::with_capacity(model.rules.len() + 1);
        for (rule, log, name, action) in logged {
            // More than u16::MAX logged rules never reach here: the store refuses a policy
            // with more than its log mark can number (`file::check_logged`).
            let slot = if log {
                u16::try_from(c.log_entries.len() + 1).unwrap_or(0)
            } else {
                0
            };
            if slot != 0 {
                c.log_entries.push(LogEntry {
                    slot,
                    rule,
                    name,
                    action,
                });
            }
            log_slots.push(slot);
        }
        c.logs = !c.log_entries.is_empty();
        c.log_slots = log_slots.into_boxed_slice();
        (c, warnings)
    }

    /// Does the rule's interface reference `r` (0 = any) admit packet ifindex `x`?
    #[inline]
    fn if_ok(&self, r: u32, x: u32) -> bool {
        r == 0
            || self
                .ifaces
                .get(r as usize - 1)
                .is_some_and(|s| s.matches(x))
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    pub fn default_action(&self) -> Action {
        self.default
    }

    /// The model this was compiled from (names, actions, source lines).
    pub fn model(&self) -> &PolicyModel {
        &self.model
    }

    /// First matching rule's action, else the default. Counts the packet against it.
    #[inline]
    pub fn eval(&self, m: &PacketMeta) -> Decision {
        let (s, v6) = key(m.src);
        let (d, _) = key(m.dst);
        let fam_bit = if v6 { 2 } else { 1 };
        let ct_bit = CtSet::bit(m.ct);
        let b = bucket(m.proto);
        for &i in &self.buckets[b] {
            let r = &self.rules[i as usize];
            if r.ct & ct_bit == 0 || r.families & fam_bit == 0 {
                continue;
            }
            if b == 4
                && self.protos[i as usize] != 0x100
                && self.protos[i as usize] != u16::from(m.proto)
            {
                continue;
            }
            if !self.if_ok(r.iif, m.iif) || !self.if_ok(r.oif, m.oif) {
                continue;
            }
            let in_nets = |sp: Span, a: u128| {
                sp.len == 0
                    || sp
                        .of(&self.nets)
                        .iter()
                        .any(|n| n.v6 == v6 && a & n.mask == n.addr)
            };
            if !in_nets(r.src, s) || !in_nets(r.dst, d) {
                continue;
            }
            let in_ports = |sp: Span, p: u16| {
                sp.len == 0
                    || sp
                        .of(&self.ports)
                        .iter()
                        .any(|&(lo, hi)| lo <= p && p <= hi)
            };
            if !in_ports(r.sport, m.sport) || !in_ports(r.dport, m.dport) {
                continue;
            }
            if r.icmp.len != 0
                && !m
                    .icmp_type
                    .is_some_and(|t| r.icmp.of(&self.icmp).contains(&t))
            {
                continue;
            }
            self.counters.add(i as usize, m.len, m.now);
            return Decision {
                action: r.action,
                rule: Some(i),
            };
        }
        self.counters.add(self.rules.len(), m.len, m.now);
        Decision {
            action: self.default,
            rule: None,
        }
    }

    /// Whether any rule (or the default) is logged.
    #[inline]
    pub fn logs(&self) -> bool {
        self.logs
    }

    /// The log slot of what decided (`Decision::rule`; `None`: the default), 0 when it is not
    /// logged.
    #[inline]
    pub fn log_slot(&self, rule: Option<u32>) -> u16 {
        let i = rule.map_or(self.rules.len(), |r| r as usize);
        self.log_slots.get(i).copied().unwrap_or(0)
    }

    /// The logged rules (and the default), by slot.
    pub fn log_entries(&self) -> &[LogEntry] {
        &self.log_entries
    }

    /// Counts per rule (in order) and of the default action.
    pub fn counts(&self) -> (Vec<Count>, Count) {
        let n = self.rules.len();
        (
            (0..n).map(|i| self.counters.get(i)).collect(),
            self.counters.get(n),
        )
    }

    /// Packets per rule (in order) and of the default action: `counts`' packets.
    pub fn hits(&self) -> (Vec<u64>, u64) {
        let (rules, default) = self.counts();
        (rules.iter().map(|c| c.packets).collect(), default.packets)
    }

    /// Continue the counters of `old` (the version this one replaces) for the rules and the
    /// default that did not change (`counters::carry_map`); the others start at zero.
    pub fn carry_from(&mut self, old: &CompiledPolicy) {
        let map = carry_map(&old.model, &self.model);
        self.counters.carry_from(&old.counters, &map);
    }
}
