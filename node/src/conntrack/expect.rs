//! Expectations: templates of connections a helper has announced (FTP data connections).
//!
//! Owns the expectation record, its matching rule and the request type helpers fill in.
//! Storage, limits and events live in the shard (`table.rs`); this file only defines what an
//! expectation is and when a packet matches one.

use std::net::IpAddr;
use std::time::Duration;

use super::helper_state::HelperKind;
use super::id::ConnId;
use super::tuple::{addr_bytes, Tuple};

/// What a helper asks for: "the next connection from `src` (any port unless given) to
/// `dst:dst_port` over `proto` is RELATED to `master`".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expectation {
    pub master: ConnId,
    pub proto: u8,
    pub src: IpAddr,
    pub src_port: Option<u16>,
    pub dst: IpAddr,
    pub dst_port: u16,
    pub timeout: Duration,
    /// Helper to attach to the expected connection, if it is itself a control connection.
    pub helper: Option<HelperKind>,
}

/// Why an expectation was not created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExpectError {
    #[error("master connection no longer exists")]
    NoMaster,
    #[error("expectation mixes address families")]
    FamilyMismatch,
    #[error("expectation table full")]
    TableFull,
    #[error(
        "expectation does not belong to the master's shard (addresses differ from the master's)"
    )]
    WrongShard,
}

/// Whether `expect` added an expectation or refreshed an identical one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectOutcome {
    Created,
    Refreshed,
}

/// A stored expectation.
#[derive(Clone, Debug)]
pub(crate) struct Expect {
    pub master: ConnId,
    pub master_tuple: Tuple,
    pub proto: u8,
    pub family: u8,
    pub src: [u8; 16],
    pub src_port: Option<u16>,
    pub dst: [u8; 16],
    pub dst_port: u16,
    pub created: u64,
    pub expires: u64,
    pub helper: Option<HelperKind>,
    /// Learned from a peer: its end is the peer's to announce, not ours.
    pub from_peer: bool,
    /// Learned and not refreshed since `Conntrack::begin_peer_bulk`.
    pub stale: bool,
    /// Learned from an earlier boot of the peer (`status::PEER_ORPHAN`): no sweep removes it.
    pub orphan: bool,
}

impl Expect {
    pub fn from_request(
        e: &Expectation,
        master_tuple: Tuple,
        now_ms: u64,
    ) -> Result<Self, ExpectError> {
        if e.src.is_ipv4() != e.dst.is_ipv4() {
            return Err(ExpectError::FamilyMismatch);
        }
        Ok(Expect {
            master: e.master,
            master_tuple,
            proto: e.proto,
            family: if e.src.is_ipv4() { 4 } else { 6 },
            src: addr_bytes(e.src),
            src_port: e.src_port,
            dst: addr_bytes(e.dst),
            dst_port: e.dst_port,
            created: now_ms,
            expires: now_ms.saturating_add(e.timeout.as_millis() as u64),
            helper: e.helper,
            from_peer: false,
            stale: false,
            orphan: false,
        })
    }

    /// The same template from the same master (a retransmitted or repeated announcement).
    pub fn same_as(&self, o: &Expect) -> bool {
        self.master == o.master
            && self.proto == o.proto
            && self.family == o.family
            && self.src == o.src
            && self.src_port == o.src_port
            && self.dst == o.dst
            && self.dst_port == o.dst_port
    }

    /// Does the first packet of a new connection with tuple `t` fulfil this expectation?
    #[inline]
    pub fn matches(&self, t: &Tuple) -> bool {
        self.proto == t.proto
            && self.family == t.family
            && self.dst_port == t.dst_port
            && self.src == t.src
            && self.dst == t.dst
            && self.src_port.is_none_or(|p| p == t.src_port)
    }
}
