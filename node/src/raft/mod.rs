//! The Raft-replicated cluster state: policy versions, members and HA settings.
//!
//! `state` is the deterministic state machine (pure, unit-tested); `store` persists the Raft log,
//! vote and snapshots in one redb file per node and hosts the state machine for openraft;
//! `network` carries openraft's RPCs over tonic. This module owns the openraft type
//! configuration. It must not touch the datapath: applied policies leave through
//! [`PolicySink`], which the daemon wires to the live `PolicyStore`.

pub mod network;
pub mod state;
pub mod store;

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use state::{ClusterState, HaSettings, PolicyRecord, Request, Response};

/// A member's Raft id (unique, never reused: pick it when adding the node).
pub type NodeId = u64;

/// What a member does besides voting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Forwards traffic: datapath and policy.
    #[default]
    Gateway,
    /// Votes so that a gateway pair keeps a quorum; forwards nothing.
    Witness,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Witness => "witness",
        }
    }
}

/// A member as recorded in the Raft membership: how to reach it and what it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// `host:port` of its gRPC listener (Raft transport and control API).
    pub addr: String,
    pub role: Role,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{} ({})", self.name, self.addr, self.role.name())
    }
}

openraft::declare_raft_types!(
    /// openraft type configuration of the keepstate cluster.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;

/// Raft's metrics as openraft publishes them.
pub type Metrics = openraft::RaftMetrics<NodeId, Member>;

/// Does this node have a Raft quorum, as far as it can tell from its metrics? The one place
/// that decides it: writes are refused without one (`api::write`), and a gateway whose
/// cluster requires one gives up its VIPs (`ha`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quorum {
    /// This node leads and heard from a majority within the limit (or is the only voter).
    Leader,
    /// This node leads but has not heard from a majority for this long (`None`: ever).
    LeaderAlone(Option<u64>),
    /// Another node leads: this follower heard from it within its election timeout (a
    /// follower that does not starts an election and knows no leader until one wins).
    Follower(NodeId),
    /// No leader known: an election is under way or no majority is reachable.
    NoLeader,
    /// openraft stopped this node's Raft core ([`stopped`] says why, e.g. the store could not
    /// be written): it neither votes nor replicates until fwnode is restarted.
    Stopped,
}

impl Quorum {
    /// `limit`: how long a leader may go without a majority's ack (2 x the election timeout).
    pub fn of(m: &Metrics, me: NodeId, limit: std::time::Duration) -> Quorum {
        // A stopped core's last metrics still name the leader it knew.
        if m.running_state.is_err() {
            return Quorum::Stopped;
        }
        match m.current_leader {
            Some(l) if l == me => {
                let voters = m.membership_config.membership().voter_ids().count();
                match m.millis_since_quorum_ack {
                    _ if voters <= 1 => Quorum::Leader,
                    Some(ms) if ms <= limit.as_millis() as u64 => Quorum::Leader,
                    ms => Quorum::LeaderAlone(ms),
                }
            }
            Some(l) => Quorum::Follower(l),
            None => Quorum::NoLeader,
        }
    }

    pub fn reached(self) -> bool {
        matches!(self, Quorum::Leader | Quorum::Follower(_))
    }
}

/// Why openraft stopped this node's Raft core (`None` while it runs): the fatal error, e.g. a
/// write to the store that failed, or "stopped" after a clean shutdown.
pub fn stopped(m: &Metrics) -> Option<String> {
    m.running_state.as_ref().err().map(|e| e.to_string())
}

/// Where applied policies go: the daemon compiles and swaps them into the datapath.
///
/// Called from the state machine after a batch of entries is applied, after a snapshot is
/// installed, and once on start with the restored state. Implementations must not block for
/// long (a compile of 10 000 rules takes tens of milliseconds).
pub trait PolicySink: Send + Sync + 'static {
    fn enforce(&self, policy: &PolicyRecord);

    /// The HA settings, at the same three points (start, a batch that changed them, a
    /// snapshot installed). Must be quick: it runs on Raft's runtime (work on the table goes
    /// to a thread of its own: `HaHandle::apply_settings`).
    fn ha(&self, _settings: &HaSettings) {}
}
