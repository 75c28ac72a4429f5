//! Per-rule counters of a compiled policy: packets, bytes and the last match of every rule and
//! of the default action, and which of them a new policy version carries over.
//!
//! Owns the striped counter cells the datapath adds to (a stripe per worker thread, so the rule
//! every packet hits does not bounce a cache line between the workers; adding allocates
//! nothing and takes no lock), their reading (sums over the stripes, the latest match), and
//! the carry-over: a rule of a new version equal to a rule of the version it replaces (same
//! match and action; its `name` and source `line` do not count) keeps that rule's counts, equal
//! rules pairing up in order; the default keeps its counts when the default action is
//! unchanged; everything else starts at zero. The counts are this node's own, kept in memory
//! only. Must not touch I/O or read a clock: times are the `Timestamp`s the datapath passes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use ipnet::IpNet;

use super::model::{Action, CtSet, PolicyModel, PortRange, Rule};
use crate::time::Timestamp;

/// One counter's totals as read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Count {
    pub packets: u64,
    /// Bytes of those packets as they were on the wire (IP header included).
    pub bytes: u64,
    /// When the latest of them was judged (the datapath's clock); `None`: no packet yet.
    pub last: Option<Timestamp>,
}

impl Count {
    fn merge(self, o: Count) -> Count {
        Count {
            packets: self.packets.wrapping_add(o.packets),
            bytes: self.bytes.wrapping_add(o.bytes),
            last: self.last.max(o.last),
        }
    }
}

/// One counter in one stripe. `last` is the latest match's millisecond plus one (0: none).
#[derive(Debug, Default)]
#[repr(align(32))]
struct Cell {
    packets: AtomicU64,
    bytes: AtomicU64,
    last: AtomicU64,
}

/// Two counters per cache line, so a stripe never shares a line with another.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Line([Cell; 2]);

/// Stripes per policy; threads beyond it share stripes (still correct, only slower).
const STRIPES: usize = 8;

thread_local! {
    static STRIPE: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Relaxed) % STRIPES
    };
}

/// The cells of one policy version: `STRIPES` stripes of `lines` cache lines each. Shared
/// (`Arc`) with the next version, which reads what workers still add here after the swap.
#[derive(Clone, Debug)]
struct Stripes {
    lines: usize,
    cells: Arc<[Line]>,
}

impl Stripes {
    fn new(counters: usize) -> Self {
        let lines = counters.div_ceil(2).max(1);
        Stripes {
            lines,
            cells: (0..lines * STRIPES).map(|_| Line::default()).collect(),
        }
    }

    #[inline]
    fn add(&self, i: usize, bytes: u32, now: Timestamp) {
        let stripe = STRIPE.with(|s| *s);
        if let Some(l) = self.cells.get(stripe * self.lines + i / 2) {
            let c = &l.0[i % 2];
            c.packets.fetch_add(1, Relaxed);
            c.bytes.fetch_add(u64::from(bytes), Relaxed);
            // A worker's clock only moves forward; the time changes once per batch, so most
            // packets write nothing here.
            let t = now.as_millis().saturating_add(1);
            if c.last.load(Relaxed) < t {
                c.last.store(t, Relaxed);
            }
        }
    }

    fn get(&self, i: usize) -> Count {
        (0..STRIPES)
            .filter_map(|s| self.cells.get(s * self.lines + i / 2))
            .map(|l| {
                let c = &l.0[i % 2];
                let last = c.last.load(Relaxed);
                Count {
                    packets: c.packets.load(Relaxed),
                    bytes: c.bytes.load(Relaxed),
                    last: last.checked_sub(1).map(Timestamp::from_millis),
                }
            })
            .fold(Count::default(), Count::merge)
    }
}

/// The counters of one policy version: one per rule, in order, then the default's.
#[derive(Debug)]
pub struct Counters {
    live: Stripes,
    /// Counts carried from the versions before the previous one, fixed when this version was
    /// built (nothing adds to those versions any more).
    base: Box<[Count]>,
    /// The previous version's cells (workers that loaded it before the swap may still add to
    /// them) and, per counter of ours, the one it carries there.
    prev: Option<(Stripes, Box<[Option<u32>]>)>,
}

impl Counters {
    /// `counters` counters at zero.
    pub fn new(counters: usize) -> Self {
        Counters {
            live: Stripes::new(counters),
            base: vec![Count::default(); counters].into_boxed_slice(),
            prev: None,
        }
    }

    /// Count a packet of `bytes` judged at `now` against counter `i`.
    #[inline]
    pub fn add(&self, i: usize, bytes: u32, now: Timestamp) {
        self.live.add(i, bytes, now);
    }

    /// What counter `i` carried from older versions, but what the previous one adds.
    fn carried(&self, i: usize) -> Count {
        let base = self.base.get(i).copied().unwrap_or_default();
        match &self.prev {
            Some((cells, of)) => match of.get(i).copied().flatten() {
                Some(j) => base.merge(cells.get(j as usize)),
                None => base,
            },
            None => base,
        }
    }

    /// Counter `i`'s totals (zero for an index it does not have).
    pub fn get(&self, i: usize) -> Count {
        if i >= self.base.len() {
            return Count::default();
        }
        self.carried(i).merge(self.live.get(i))
    }

    /// Carry `old`'s counters into these: `map[i]` is the counter of `old` that our counter
    /// `i` continues (see `carry_map`).
    pub fn carry_from(&mut self, old: &Counters, map: &[Option<usize>]) {
        self.base = (0..self.base.len())
            .map(|i| match map.get(i).copied().flatten() {
                Some(j) => old.carried(j),
                None => Count::default(),
            })
            .collect();
        let of = (0..self.base.len())
            .map(|i| map.get(i).copied().flatten().map(|j| j as u32))
            .collect();
        self.prev = Some((old.live.clone(), of));
    }
}

/// What of a rule decides which packets it takes and what it does with them: all but its name
/// and its line. Listing the fields (no `..`) makes a new field of `Rule` a compile error here.
#[derive(Hash, PartialEq, Eq)]
struct Key<'a> {
    iif: &'a Option<String>,
    oif: &'a Option<String>,
    src: &'a [IpNet],
    dst: &'a [IpNet],
    proto: Option<u8>,
    sport: &'a [PortRange],
    dport: &'a [PortRange],
    icmp_type: &'a [u8],
    ct: Option<CtSet>,
    action: Action,
}

fn key(r: &Rule) -> Key<'_> {
    let Rule {
        name: _,
        line: _,
        // Logging a rule changes what is logged, not what it matches: its counts go on.
        log: _,
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
    } = r;
    Key {
        iif,
        oif,
        src,
        dst,
        proto: *proto,
        sport,
        dport,
        icmp_type,
        ct: *ct,
        action: *action,
    }
}

/// Which counter of `old` each counter of `new` continues: one entry per rule of `new`, then
/// the default's. A rule continues the first not yet taken rule of `old` with the same match
/// and action (names and lines aside), so identical rules pair up in order; the default
/// continues the old default when the action is the same. `None`: starts at zero.
pub fn carry_map(old: &PolicyModel, new: &PolicyModel) -> Vec<Option<usize>> {
    let mut free: HashMap<Key<'_>, VecDeque<usize>> = HashMap::new();
    for (i, r) in old.rules.iter().enumerate() {
        free.entry(key(r)).or_default().push_back(i);
    }
    let mut map: Vec<Option<usize>> = new
        .rules
        .iter()
        .map(|r| free.get_mut(&key(r)).and_then(VecDeque::pop_front))
        .collect();
    map.push((old.default == new.default).then_some(old.rules.len()));
    map
}
