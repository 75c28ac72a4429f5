//! The `keepstate.v1.Control` gRPC service: what `fwctl` talks to.
//!
//! Owns the mapping between operator requests and the node's parts: reads are answered from
//! this node's applied Raft state, policy store and tracker; writes are validated here, then
//! proposed to Raft on the leader or forwarded to it once (`write`). Must not decide about
//! packets or hold a lock across an await.

pub mod conntrack;
mod ha;
mod write;

use std::sync::Arc;
use std::time::{Duration, Instant};

use keepstate_proto::v1::{self, control_server::Control};
use openraft::ServerState;
use parking_lot::RwLock;
use tonic::{Request, Response, Status};

use crate::conntrack::Conntrack;
use crate::ha::{HaHandle, Role as HaRole};
use crate::policy::PolicyStore;
use crate::raft::store::SmData;
use crate::raft::{Member, NodeId, PolicyRecord, Raft, Role};
use crate::time::Timestamp;
use crate::tls::{self, Members, OperatorRole};
use crate::transport::Transport;

/// Datapath counters the status call reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct DatapathCounters {
    pub packets: u64,
    pub accepted: u64,
    pub dropped: u64,
    pub rejected: u64,
    pub invalid: u64,
}

/// What a gateway node exposes of its datapath (witnesses have none).
#[derive(Clone)]
pub struct Datapath {
    pub ct: Arc<Conntrack>,
    /// The origin of the tracker's timestamps.
    pub origin: Instant,
    pub counters: Arc<dyn Fn() -> DatapathCounters + Send + Sync>,
    /// The gateway's HA role machine (`[ha]`); `None` reports `STANDALONE`.
    pub ha: Option<HaHandle>,
    /// State replication, when `[sync]` is configured.
    pub sync: Option<SyncView>,
}

/// What the control API sees of state replication: its status, and a resync trigger.
#[derive(Clone)]
pub struct SyncView {
    pub status: Arc<dyn Fn() -> v1::SyncStatusReply + Send + Sync>,
    pub resync: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for SyncView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncView").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath").finish_non_exhaustive()
    }
}

/// Limits of write handling.
#[derive(Clone, Copy, Debug)]
pub struct WriteLimits {
    /// A proposal not committed within this time fails with DEADLINE_EXCEEDED.
    pub commit_timeout: Duration,
    /// A leader that has not heard from a quorum for this long refuses writes at once.
    pub quorum_timeout: Duration,
}

/// The control service of one node.
pub struct ControlService {
    pub id: NodeId,
    pub me: Member,
    pub raft: Raft,
    pub sm: Arc<RwLock<SmData>>,
    pub policy: Arc<PolicyStore>,
    pub datapath: Option<Datapath>,
    pub transport: Transport,
    pub limits: WriteLimits,
    /// The membership the identity checks use (member nodes may forward writes).
    pub members: Members,
    /// What `Stats` reports (the metrics endpoint's families).
    pub stats: Arc<crate::metrics::Sources>,
    /// What the Raft peers last said about the commands they apply (`api::write` reads it).
    pub levels: crate::raft::network::PeerLevels,
}

impl std::fmt::Debug for ControlService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlService")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

const LIST_DEFAULT: usize = 1000;
const LIST_MAX: usize = 100_000;

pub(crate) fn role_to_proto(r: Role) -> i32 {
    match r {
        Role::Gateway => v1::NodeRole::Gateway as i32,
        Role::Witness => v1::NodeRole::Witness as i32,
    }
}

fn state_to_proto(s: ServerState) -> i32 {
    (match s {
        ServerState::Leader => v1::RaftState::Leader,
        ServerState::Follower => v1::RaftState::Follower,
        ServerState::Candidate => v1::RaftState::Candidate,
        ServerState::Learner => v1::RaftState::Learner,
        ServerState::Shutdown => v1::RaftState::Shutdown,
    }) as i32
}

fn ha_role_to_proto(ha: Option<&HaHandle>) -> i32 {
    (match ha.map(HaHandle::role) {
        None => v1::HaRole::Standalone,
        Some(HaRole::Syncing) => v1::HaRole::Syncing,
        Some(HaRole::Standby) => v1::HaRole::Standby,
        Some(HaRole::Active) => v1::HaRole::Active,
        Some(HaRole::Fault) => v1::HaRole::Fault,
    }) as i32
}

fn version_to_proto(p: &PolicyRecord, with_text: bool) -> v1::PolicyVersion {
    v1::PolicyVersion {
        version: p.version,
        text: if with_text {
            p.text.clone()
        } else {
            String::new()
        },
        sha256: p.sha256.clone(),
        author: p.author.clone(),
        comment: p.comment.clone(),
        proposed_at_unix_ms: p.proposed_at_unix_ms,
        rolled_back_from: p.rolled_back_from,
        authorised_by: p.authorised_by.clone().unwrap_or_default(),
        rule_counters: vec![],
        counters_node: String::new(),
        enforced_version: 0,
    }
}

impl ControlService {
    /// This node's per-rule counters of `v`, when its datapath enforces that version.
    fn add_counters(&self, v: &mut v1::PolicyVersion) {
        v.counters_node = self.me.name.clone();
        if let Some((enforced, rules)) = self.stats.rule_counters() {
            v.enforced_version = enforced;
            if enforced == v.version {
                v.rule_counters = rules;
            }
        }
    }

    /// May the caller of `req` do what needs `role`? (PERMISSION_DENIED naming the role.)
    fn allow<T>(&self, req: &Request<T>, role: OperatorRole) -> Result<(), Status> {
        tls::require_role(req, &self.members, role)
    }

    fn datapath(&self) -> Result<&Datapath, Status> {
        self.datapath.as_ref().ok_or_else(|| {
            Status::failed_precondition(format!(
                "node {} is a witness: it has no datapath and no connection table; ask a gateway",
                self.me.name
            ))
        })
    }

    fn now(dp: &Datapath) -> Timestamp {
        Timestamp::from_millis(dp.origin.elapsed().as_millis() as u64)
    }

    /// The membership as this node knows it.
    fn members(&self) -> v1::MembersReply {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let matched = m.replication.as_ref();
        let members = membership
            .nodes()
            .map(|(id, node)| v1::Member {
                id: *id,
                name: node.name.clone(),
                addr: node.addr.clone(),
                role: role_to_proto(node.role),
                voter: is_voter(membership, id),
                matched_index: matched
                    .and_then(|r| r.get(id))
                    .and_then(|l| l.as_ref())
                    .map(|l| l.index),
            })
            .collect();
        v1::MembersReply {
            members,
            leader_id: m.current_leader.unwrap_or(0),
            joint: membership.get_joint_config().len() > 1,
        }
    }
}

/// openraft 0.9 keeps `Membership::is_voter` crate-private.
pub(crate) fn is_voter(ms: &openraft::Membership<NodeId, Member>, id: &NodeId) -> bool {
    ms.voter_ids().any(|v| v == *id)
}

fn bad(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusReply>, Status> {
        self.allow(&request, OperatorRole::Read)?;
        let m = self.raft.metrics().borrow().clone();
        let leader_addr = m
            .current_leader
            .and_then(|l| m.membership_config.membership().get_node(&l).cloned())
            .map(|n| n.addr)
            .unwrap_or_default();
        let initialized = m.membership_config.membership().nodes().next().is_some();
        let stopped = crate::raft::stopped(&m);
        // A stopped core's last metrics still name the leader it knew: it knows none.
        let (leader_id, leader_addr) = match stopped {
            Some(_) => (0, String::new()),
            None => (m.current_leader.unwrap_or(0), leader_addr),
        };
        let raft = v1::RaftStatus {
            state: state_to_proto(m.state),
            term: m.current_term,
            leader_id,
            leader_addr,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied_index: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            millis_since_quorum_ack: m.millis_since_quorum_ack,
            initialized,
            stopped: stopped.unwrap_or_default(),
        };
        let active = self.policy.current();
        let sha = self
            .sm
            .read()
            .state
            .policy(active.version)
            .map(|p| p.sha256.clone())
            .unwrap_or_else(|| crate::raft::state::sha256_hex(&active.text));
        let policy = v1::PolicySummary {
            version: active.version,
            sha256: sha,
            rules: active.compiled.rule_count() as u32,
            origin: active.origin.clone(),
            warnings: active.warnings.clone(),
        };
        let ha = self.sm.read().state.ha.clone();
        let (connections, expectations, datapath) = match &self.datapath {
            Some(dp) => {
                let c = (dp.counters)();
                let mut exp = 0;
                for i in 0..dp.ct.shard_count() {
                    exp += dp.ct.lock(i).expectation_count() as u64;
                }
                let counters = v1::DatapathCounters {
                    packets: c.packets,
                    accepted: c.accepted,
                    dropped: c.dropped,
                    rejected: c.rejected,
                    invalid: c.invalid,
                };
                (dp.ct.len() as u64, exp, Some(counters))
            }
            None => (0, 0, None),
        };
        Ok(Response::new(v1::StatusReply {
            node_id: self.id,
            node_name: self.me.name.clone(),
            role: role_to_proto(self.me.role),
            addr: self.me.addr.clone(),
            raft: Some(raft),
            policy: Some(policy),
            ha_role: ha_role_to_proto(self.datapath.as_ref().and_then(|d| d.ha.as_ref())),
            ha_settings: Some(v1::HaSettings {
                preferred_active: ha.preferred_active,
                require_quorum: ha.require_quorum,
            }),
            connections,
            expectations,
            datapath,
            version: env!("CARGO_PKG_VERSION").into(),
            plaintext: self.transport.is_plaintext(),
        }))
    }

    async fn get_policy(
        &self,
        request: Request<v1::GetPolicyRequest>,
    ) -> Result<Response<v1::PolicyVersion>, Status> {
        self.allow(&request, OperatorRole::Read)?;
        let req = request.into_inner();
        if req.counters {
            // A witness judges no packet: it has no counters.
            self.datapath()?;
        }
        let want = req.version;
        let sm = self.sm.read();
        let found = match want {
            Some(v) => sm.state.policy(v),
            None => sm.state.current(),
        };
        match (found, want) {
            (Some(p), _) => {
                let mut v = version_to_proto(p, true);
                if req.counters {
                    self.add_counters(&mut v);
                }
                Ok(Response::new(v))
            }
            (None, None) => Err(Status::not_found(
                "no policy has been committed yet; use `fwctl policy apply FILE`",
            )),
            (None, Some(v)) => Err(Status::not_found(format!(
                "policy version {v} is not in the history (current: {})",
                sm.state.version()
            ))),
        }
    }

    async fn apply_policy(
        &self,
        request: Request<v1::ApplyPolicyRequest>,
    ) -> Result<Response<v1::ApplyPolicyReply>, Status> {
        self.allow(&request, OperatorRole::Admin)?;
        self.apply_policy_write(request).await.map(Response::new)
    }

    async fn rollback_policy(
        &self,
        request: Request<v1::RollbackPolicyRequest>,
    ) -> Result<Response<v1::ApplyPolicyReply>, Status> {
        self.allow(&request, OperatorRole::Admin)?;
        self.rollback_write(request).await.map(Response::new)
    }

    async fn policy_history(
        &self,
        request: Request<v1::PolicyHistoryRequest>,
    ) -> Result<Response<v1::PolicyHistoryReply>, Status> {
        self.allow(&request, OperatorRole::Read)?;
        let sm = self.sm.read();
        Ok(Response::new(v1::PolicyHistoryReply {
            versions: sm
                .state
                .policies
                .iter()
                .map(|p| version_to_proto(p, false))
                .collect(),
            current: sm.state.version(),
        }))
    }

    async fn cluster_init(
        &self,
        request: Request<v1::ClusterInitRequest>,
    ) -> Result<Response<v1::MembersReply>, Status> {
        self.allow(&request, OperatorRole::Admin)?;
        self.init().await.map(Response::new)
    }

    async fn cluster_members(
        &self,
        request: Request<v1::MembersRequest>,
    ) -> Result<Response<v1::MembersReply>, Status> {
        self.allow(&request, OperatorRole::Read)?;
        Ok(Response::new(self.members()))
    }

    async fn cluster_add(
        &self,
        request: Request<v1::ClusterAddRequest>,
    ) -> Result<Response<v1::MembersReply>, Status> {
        self.allow(&request, OperatorRole::Admin)?;
        self.add_write(request).await.map(Response::new)
    }

    async fn cluster_promote(
        &self,
        request: Request<v1::ClusterPromoteRequest>,
    ) -> Result<Response<v1::MembersReply>, Status> {
        self.allow(&request, OperatorRole::Admin)?;
        self.promote_write(request).await.map(Response::new)
    }

    async fn cluster_remove(
        &self,
        request: Request<v1::ClusterRemoveRequest>,
    ) -> Result<Response<v1::MembersReply>, Status> {
        self.allow(&request, OperatorRole::Admin)?;
        self.remove_write(request).await.map(Response::new)
    }

    async fn set_ha_settings(
        &self,
        request: Request<v1::SetHaSettingsRequest>,
    ) -> Result<Response<v1::HaSettings>, Status> {
        self.allow(&request, OperatorRole::Admin)?;
        self.set_ha_write(request).await.map(Response::new)
    }

    async fn ha_move(
        &self,
        request: Request<v1::HaMoveRequest>,
    ) -> Result<Response<v1::HaMoveReply>, Status> {
        self.allow(&request, OperatorRole::Admin)?;
        self.ha_move_write(request).await.map(Response::new)
    }

    async fn list_connections(
        &self,
        request: Request<v1::ListConnectionsRequest>,
    ) -> Result<Response<v1::ListConnectionsReply>, Status> {
        self.allow(&request, OperatorRole::Read)?;
        let dp = self.datapath()?;
        let r = request.into_inner();
        let f = conntrack::Filter::parse(r.filter).map_err(bad)?;
        let limit = match r.limit {
            0 => LIST_DEFAULT,
            n => (n as usize).min(LIST_MAX),
        };
        let (ct, now, token) = (dp.ct.clone(), Self::now(dp), r.page_token);
        // Off the runtime that drives Raft: a page of snapshots is real work.
        let (connections, next_page_token) =
            tokio::task::spawn_blocking(move || conntrack::list(&ct, now, &f, limit, token))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(v1::ListConnectionsReply {
            connections,
            truncated: next_page_token != 0,
            next_page_token,
        }))
    }

    async fn count_connections(
        &self,
        request: Request<v1::CountConnectionsRequest>,
    ) -> Result<Response<v1::CountConnectionsReply>, Status> {
        self.allow(&request, OperatorRole::Read)?;
        let dp = self.datapath()?;
        let f = conntrack::Filter::parse(request.into_inner().filter).map_err(bad)?;
        let (ct, now) = (dp.ct.clone(), Self::now(dp));
        let count = tokio::task::spawn_blocking(move || conntrack::count(&ct, now, &f))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(v1::CountConnectionsReply {
            count,
            max: u64::from(dp.ct.max_entries()),
        }))
    }

    /// Needs the admin role, like every other change (`read` may only look).
    async fn delete_connections(
        &self,
        request: Request<v1::DeleteConnectionsRequest>,
    ) -> Result<Response<v1::DeleteConnectionsReply>, Status> {
        self.allow(&request, OperatorRole::Admin)?;
        let dp = self.datapath()?;
        let who = tls::caller(&request)
            .map(|c| format!("{c:?}"))
            .unwrap_or_default();
        let r = request.into_inner();
        let f = conntrack::Filter::parse(r.filter).map_err(bad)?;
        let filter = format!("{f:?}");
        let (ct, now, all) = (dp.ct.clone(), Self::now(dp), r.all);
        // Off the runtime that drives Raft: the walk visits every shard.
        let (connections, expectations) =
            tokio::task::spawn_blocking(move || conntrack::delete(&ct, now, &f, all))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(bad)?;
        tracing::info!(
            connections,
            expectations,
            all,
            %filter,
            caller = %who,
            "an operator deleted connections (replicated to the peers as kills)"
        );
        Ok(Response::new(v1::DeleteConnectionsReply {
            connections,
            expectations,
        }))
    }

    async fn sync_status(
        &self,
        request: Request<v1::SyncStatusRequest>,
    ) -> Result<Response<v1::SyncStatusReply>, Status> {
        self.allow(&request, OperatorRole::Read)?;
        let dp = self.datapath()?;
        Ok(Response::new(
            dp.sync.as_ref().map(|s| (s.status)()).unwrap_or_default(),
        ))
    }

    async fn sync_resync(
        &self,
        request: Request<v1::SyncResyncRequest>,
    ) -> Result<Response<v1::SyncStatusReply>, Status> {
        self.allow(&request, OperatorRole::Admin)?;
        let dp = self.datapath()?;
        let Some(s) = &dp.sync else {
            return Err(Status::failed_precondition(
                "replication is off on this node (no [sync] section)",
            ));
        };
        (s.resync)();
        Ok(Response::new((s.status)()))
    }

    async fn list_expectations(
        &self,
        request: Request<v1::ListExpectationsRequest>,
    ) -> Result<Response<v1::ListExpectationsReply>, Status> {
        self.allow(&request, OperatorRole::Read)?;
        let dp = self.datapath()?;
        let (ct, now) = (dp.ct.clone(), Self::now(dp));
        let expectations = tokio::task::spawn_blocking(move || conntrack::expectations(&ct, now))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(v1::ListExpectationsReply { expectations }))
    }

    async fn stats(
        &self,
        request: Request<v1::StatsRequest>,
    ) -> Result<Response<v1::StatsReply>, Status> {
        self.allow(&request, OperatorRole::Read)?;
        let (stats, raft) = (self.stats.clone(), self.raft.clone());
        // Off the runtime that drives Raft: the per-state counts visit every shard.
        let reply = tokio::task::spawn_blocking(move || stats.stats_reply(Some(&raft)))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(reply))
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn the_ha_role_is_standalone_without_ha_and_the_machine_s_role_with_it() {
        assert_eq!(ha_role_to_proto(None), v1::HaRole::Standalone as i32);
        let h = HaHandle::new(false);
        assert_eq!(ha_role_to_proto(Some(&h)), v1::HaRole::Syncing as i32);
        h.set_synced(true);
        assert_eq!(ha_role_to_proto(Some(&h)), v1::HaRole::Standby as i32);
        h.promote();
        assert_eq!(ha_role_to_proto(Some(&h)), v1::HaRole::Active as i32);
        h.fault();
        assert_eq!(ha_role_to_proto(Some(&h)), v1::HaRole::Fault as i32);
    }

    /// The largest `ct list` answer (LIST_MAX entries of the longest kind) fits one message.
    #[test]
    fn the_largest_connection_list_fits_the_message_limit() {
        let c = v1::Connection {
            protocol: 255,
            src: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".into(),
            dst: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".into(),
            src_port: 65535,
            dst_port: 65535,
            state: "ESTABLISHED".into(),
            assured: true,
            seen_reply: true,
            related: true,
            from_peer: true,
            expires_in_ms: u64::from(u32::MAX),
            helper: "ftp".into(),
        };
        let reply = v1::ListConnectionsReply {
            connections: vec![c; LIST_MAX],
            truncated: true,
            next_page_token: u64::MAX,
        };
        let len = reply.encoded_len();
        assert!(len < keepstate_proto::MAX_MESSAGE_BYTES / 2, "{len}");
    }
}
