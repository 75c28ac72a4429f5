//! Tracker settings: table bounds, per-state timeouts (Linux's defaults), TCP leniency options,
//! helper ports and expectation limits. Deserialized from the daemon's `[conntrack]` section.

use serde::Deserialize;

use super::helper_state::HelperKind;
use super::tcp::TcpState;
use crate::packet::proto;

/// Timeouts in seconds, named as Linux's sysctls (`nf_conntrack_tcp_timeout_*`, ...).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    pub tcp_syn_sent: u64,
    pub tcp_syn_recv: u64,
    pub tcp_established: u64,
    pub tcp_fin_wait: u64,
    pub tcp_close_wait: u64,
    pub tcp_last_ack: u64,
    pub tcp_time_wait: u64,
    pub tcp_close: u64,
    /// Used instead of a longer state timeout while data is unacknowledged.
    pub tcp_unacknowledged: u64,
    pub udp_unreplied: u64,
    pub udp_replied: u64,
    pub icmp: u64,
    pub generic: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_syn_sent: 120,
            tcp_syn_recv: 60,
            tcp_established: 5 * 24 * 3600,
            tcp_fin_wait: 120,
            tcp_close_wait: 60,
            tcp_last_ack: 30,
            tcp_time_wait: 120,
            tcp_close: 10,
            tcp_unacknowledged: 300,
            udp_unreplied: 30,
            udp_replied: 120,
            icmp: 30,
            generic: 600,
        }
    }
}

impl Timeouts {
    pub fn tcp(&self, s: TcpState) -> u64 {
        match s {
            TcpState::None | TcpState::SynSent | TcpState::SynSent2 => self.tcp_syn_sent,
            TcpState::SynRecv => self.tcp_syn_recv,
            TcpState::Established => self.tcp_established,
            TcpState::FinWait => self.tcp_fin_wait,
            TcpState::CloseWait => self.tcp_close_wait,
            TcpState::LastAck => self.tcp_last_ack,
            TcpState::TimeWait => self.tcp_time_wait,
            TcpState::Close => self.tcp_close,
        }
    }

    /// The longest of all timeouts, in seconds: no entry lives longer without a packet, so
    /// neither may one a peer sends us.
    pub fn longest(&self) -> u64 {
        [
            self.tcp_syn_sent,
            self.tcp_syn_recv,
            self.tcp_established,
            self.tcp_fin_wait,
            self.tcp_close_wait,
            self.tcp_last_ack,
            self.tcp_time_wait,
            self.tcp_close,
            self.tcp_unacknowledged,
            self.udp_unreplied,
            self.udp_replied,
            self.icmp,
            self.generic,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }
}

/// A port an application helper is attached to.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HelperPort {
    /// IP protocol number (6 = TCP).
    pub proto: u8,
    pub port: u16,
    pub helper: HelperKindName,
}

/// Helper names as written in configuration.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HelperKindName {
    Ftp,
}

impl From<HelperKindName> for HelperKind {
    fn from(n: HelperKindName) -> Self {
        match n {
            HelperKindName::Ftp => HelperKind::Ftp,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Most connections tracked at once, over all shards.
    pub max_entries: u32,
    /// Number of independently locked shards (rounded up to a power of two).
    pub shards: u32,
    pub timeouts: Timeouts,
    /// Accept TCP segments outside the tracked window (the state machine still applies).
    pub tcp_liberal: bool,
    /// Let a non-SYN TCP segment create a connection (picking up existing streams).
    pub tcp_pickup: bool,
    /// Ports whose new connections get an application helper.
    pub helper_ports: Vec<HelperPort>,
    /// Expectations one master connection may own; the oldest is evicted beyond it.
    pub max_expect_per_master: u32,
    /// Expectations over all shards; new ones are refused beyond it.
    pub max_expectations: u32,
    /// Events buffered per shard for the replication sender before overflow is counted.
    pub event_queue: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_entries: 262_144,
            shards: 64,
            timeouts: Timeouts::default(),
            tcp_liberal: false,
            tcp_pickup: false,
            helper_ports: vec![HelperPort {
                proto: proto::TCP,
                port: 21,
                helper: HelperKindName::Ftp,
            }],
            max_expect_per_master: 4,
            max_expectations: 4096,
            event_queue: 4096,
        }
    }
}
