//! The typed policy model: an ordered list of rules and a default action.
//!
//! Owns the meaning of a rule, independent of any file syntax or matcher layout. Produced by
//! `file` (from text), consumed by `compile`. Must not touch I/O or the datapath.

use ipnet::IpNet;

use crate::conntrack::CtState;

/// What happens to a packet a rule (or the default) decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Accept,
    Drop,
    /// Drop and tell the sender: TCP reset for TCP, ICMP port unreachable otherwise.
    Reject,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Accept => "accept",
            Action::Drop => "drop",
            Action::Reject => "reject",
        }
    }
}

/// A set of connection-tracking states as a bit mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtSet(pub u8);

impl CtSet {
    pub const ANY: CtSet = CtSet(0x0f);

    #[inline]
    pub fn bit(s: CtState) -> u8 {
        match s {
            CtState::New => 1,
            CtState::Established => 2,
            CtState::Related => 4,
            CtState::Invalid => 8,
        }
    }
    pub fn insert(&mut self, s: CtState) {
        self.0 |= Self::bit(s);
    }
    #[inline]
    pub fn contains(self, s: CtState) -> bool {
        self.0 & Self::bit(s) != 0
    }
}

/// An inclusive port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

/// One rule. Empty lists and `None` mean "any".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: Option<String>,
    /// 1-based line of the rule in its source, for messages.
    pub line: usize,
    pub iif: Option<String>,
    pub oif: Option<String>,
    pub src: Vec<IpNet>,
    pub dst: Vec<IpNet>,
    pub proto: Option<u8>,
    pub sport: Vec<PortRange>,
    pub dport: Vec<PortRange>,
    pub icmp_type: Vec<u8>,
    pub ct: Option<CtSet>,
    pub action: Action,
    /// `log = true`: matching packets are also sent to the datapath's NFLOG group.
    pub log: bool,
}

/// A whole policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyModel {
    pub default: Action,
    /// `default_log = true`: packets the default decides are logged too; the line of that
    /// key, for messages.
    pub default_log: Option<usize>,
    pub rules: Vec<Rule>,
}
